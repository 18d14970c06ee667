"""`emotion-dist` command line. Heavy modules (torch, ultralytics) are imported inside the
commands so `--help` and config errors answer at once.

Every command that takes a config takes dotted `key=value` overrides anywhere on its line (before
or after --config, between flags); every command that reports takes --json / --json-out (output.py)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from emotion_dist import __version__
from emotion_dist.errors import EXIT_USAGE
from emotion_dist.utils.output import add_output_args

EXIT_CODES = """exit codes:
  0    done, or stopped by a scheduler's signal (SIGTERM/SIGUSR1) after saving: it may requeue
  1    training failed or was aborted (non-finite steps, a failed checkpoint write, a lost peer)
  2    bad input: config, data, checkpoint, launch environment or output path (one line on stderr)
  130  stopped by Ctrl-C (SIGINT) after saving: the same command resumes; `train && export` stops"""
# a dotted config key with a value: train.epochs=3, log.wandb_tags=a,b
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _config_args(p: argparse.ArgumentParser) -> None:
    """--config and key=value overrides (which main() also collects from anywhere on the line)."""
    p.add_argument("--config", default=None, metavar="YAML", action="append",
                   help="YAML config (default: the built-in defaults, the same as configs/default.yaml); give it "
                        "several times to merge files in order (a later file's keys win; the start line says "
                        "which file set what)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides anywhere on the line, e.g. train.epochs=3 "
                        "(all keys: emotion-dist config keys)")


def _cam_layer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cam-layer", default="backbone.6", metavar="LAYER",
                   help="the layer Grad-CAM reads (default backbone.6, stride 16; backbone.8 is coarser)")


def _sub(sub, name: str, help: str, *, description: str | None = None, epilog: str | None = None, **kw):
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


TRAIN_EPILOG = f"""config keys (the sections data, model, train, dist, run, ckpt, log):
  emotion-dist config keys            every key with its type, default and meaning
  emotion-dist config keys train.     only the keys starting with train.
  emotion-dist train --config X ... --print-config     the resolved config as YAML, nothing started

run directory: run.dir=PATH, else runs/NAME (run.name, default `default`): an unfinished run there
resumes; when it holds a finished run, the next free runs/NAME2, runs/NAME3, ... unless
run.exist_ok=true or run.resume=auto is given (then a finished run says so and does nothing).

precedence: key=value on the command line > the launcher's settings (accelerate --mixed_precision,
--use_fsdp, --dynamo_backend, --cpu) and WANDB_* variables > the --config files (merged in
order: a later file's keys win) > the defaults; the
start line says when one overruled another.

{EXIT_CODES}"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emotion-dist", epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Distributed training harness for EmotionNet (facial expressions).")
    p.add_argument("--version", action="version", version=f"emotion-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = _sub(sub, "train", "train (same as launch/train.py; works under torchrun/accelerate/srun)", epilog=TRAIN_EPILOG,
             description="Train EmotionNet. Rank 0 prints one start line (launcher, world size, device, precision,\n"
                         "strategy, batch, and where the environment set a value) and writes into run.dir.")
    _config_args(t)
    # launch/train.py is `emotion-dist train`: its --version must answer too
    t.add_argument("--version", action="version", version=f"emotion-dist {__version__}")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, environment, overrides) as YAML and exit; nothing is written")
    add_output_args(t, "the final result (steps, best validation macro-F1, test figures)")

    c = _sub(sub, "config", "config tools")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    k = _sub(csub, "keys", "list every config key with its type, default and meaning")
    k.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. train. or log.wandb")
    k.add_argument("--markdown", action="store_true", help="as the Markdown table in docs/configuration.md")
    add_output_args(k, "the keys")

    d = _sub(sub, "data", "dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = _sub(dsub, "synthetic", "write the synthetic face dataset in the Kaggle layout")
    s.add_argument("--out", required=True, help="the folder to write (train/train/<class>, test/test/<class>)")
    s.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    s.add_argument("--test", type=int, default=700, help="test images (default 700)")
    s.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_output_args(s, "where the data set went and its sizes")
    fc = _sub(dsub, "faces", "turn a folder of photos into an aligned face data set that training reads",
              description="Detects the faces in RAW (class folders, or train/ + test/ with class folders), crops "
                          "each at data.face_crop's geometry (aligned by 5 landmarks) and writes one image per face "
                          "into --out in the same layout, plus faces_report.json. RAW is only read. Run it again to "
                          "carry on after a stop: crops already written are kept.")
    fc.add_argument("--from", dest="raw", required=True, metavar="RAW",
                    help="the photos: class folders or train/ + test/")
    fc.add_argument("--out", required=True, metavar="DIR", help="the face data set to write (not inside RAW)")
    fc.add_argument("--multi", choices=["largest", "all", "skip"], default="largest",
                    help="a photo with several faces: keep the largest (default), all, or skip the photo")
    fc.add_argument("--size", type=_positive_int, default=112, metavar="PX",
                    help="side of the square crops in pixels (default 112)")
    fc.add_argument("--detector", choices=["retinaface", "haar"], default="retinaface",
                    help="retinaface (default, aligned crops) or haar (box crops)")
    fc.add_argument("--face-crop", default=None, metavar="SPEC",
                    help="the crop geometry, margin=M,eye_y=Y,eye_distance=D (default: data.face_crop's default); "
                         "train on the result with the same data.face_crop")
    fc.add_argument("--min-size", type=_positive_int, default=24, metavar="PX",
                    help="ignore faces whose box is smaller than this many pixels (default 24)")
    fc.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                    help="photos processed at once (default: the CPU count, at most 8)")
    add_output_args(fc, "the report (counts, files with no face or several faces)")
    dc = _sub(dsub, "cache", "decode the configured data set into its cache ahead of training (e.g. in a Slurm job "
                             "of its own) and report images, seconds, img/s per core, size on disk and peak memory")
    _config_args(dc)

    e = _sub(sub, "evaluate", "evaluate a checkpoint (test split by default)",
             description="Evaluate a checkpoint (or an ensemble: --checkpoint several times) on its data's test "
                         "split, or --split val, on one process or under torchrun. Prints a per-class table "
                         "and writes the confusion matrix as a PNG. By default it uses the test-time "
                         "augmentation the checkpoint's recipe used (its train.test_tta) and says which; "
                         "--tta chooses another.", epilog=EXIT_CODES)
    e.add_argument("--checkpoint", required=True, action="append",
                   help="a .pt checkpoint; give it several times to evaluate an ensemble (probabilities averaged)")
    e.add_argument("--split", choices=["test", "val"], default="test", help="which split (default test)")
    e.add_argument("--json", action="store_true",
                   help="print the report as one JSON document on stdout (the table goes to stderr)")
    e.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON report to FILE")
    e.add_argument("--tta", nargs="?", const="flip", default=None, choices=["none", "flip", "tencrop"],
                   help="test-time augmentation: none, flip (the image and its mirror; the default of a bare --tta) "
                        "or tencrop (4 corner + centre crops, 40 of 48 px, and their mirrors); probabilities "
                        "averaged (default: the checkpoint's train.test_tta, none if it records none)")
    e.add_argument("--out", default=None, help="folder for the confusion-matrix PNG (default: next to the JSON report, "
                                                "else RUN_DIR/eval)")
    e.add_argument("--cam", type=_positive_int, default=None, metavar="N",
                   help="also write Grad-CAM figures, cam_<class>.png: for each class N test images predicted right "
                        "beside N predicted wrong")
    _cam_layer_arg(e)
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the checkpoint's config, e.g. data.root=PATH to evaluate on another folder")

    ch = _sub(sub, "checks", "report this machine's environment and what the config needs that is missing",
              description="Versions (python, torch, torchvision, ultralytics, OpenCV, onnxruntime, ...), CUDA "
                          "and NCCL, the GPUs, Slurm (commands on PATH, SLURM_* seen), the launcher environment "
                          "this process sees, and free space in run.cache_dir and the run directory. Exit 2 "
                          "when something the config needs is missing (train.device=cuda with no GPU, a "
                          "tracker without its package, ...).", epilog=EXIT_CODES)
    _config_args(ch)
    add_output_args(ch, "the environment report")

    sw = _sub(sub, "sweep", "run a grid of overrides x seeds, each point its own run directory",
              description="FILE is YAML: `name`, `base` (overrides every point gets), `grid` (key: [values, ...]), "
                          "`seeds` ([0, 1, 2]). Each point runs as `emotion-dist train` in SWEEP_DIR/<point>; "
                          "finished points are skipped and interrupted ones resume, so the same command carries "
                          "a sweep on. slurm/sweep.sbatch runs the same points as a Slurm array "
                          "(--list, --point). See docs/experiments.md.", epilog=EXIT_CODES)
    sw.add_argument("file", metavar="FILE", help="the sweep's YAML file")
    sw.add_argument("--list", action="store_true", help="print the points (index, run dir, overrides) and exit")
    sw.add_argument("--point", type=int, default=None, metavar="I",
                    help="run only point I (0-based; a Slurm array task: --point $SLURM_ARRAY_TASK_ID)")
    sw.add_argument("--args", action="store_true",
                    help="with --point: print that point's `train` arguments, one per line, and exit (for "
                         "slurm/sweep.sbatch, which starts them with srun)")
    sw.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                    help="points run N at a time, each a process of its own (default 1: one after another)")
    sw.add_argument("--out", default=None, metavar="SWEEP_DIR", help="the sweep folder (default: sweeps/<name>)")
    sw.add_argument("--search", choices=["optuna"], default=None,
                    help="instead of the grid: Optuna (TPE) over the file's `search:` space, trials pruned on "
                         "validation macro-F1; its journal (SWEEP_DIR/optuna.log) lets several workers share a "
                         "study with no database (needs the search extra: pip install 'emotion-dist[search]')")
    sw.add_argument("--trials", type=_positive_int, default=20, metavar="N",
                    help="--search: trials in the study in all, over every worker (default 20)")
    add_output_args(sw, "the points and their results")

    pr = sub.add_parser(
        "predict", help="detect faces in photos, a video or a camera and classify their expression",
        description="Still images: one line per face on stdout (--json: one JSON document). A video or a camera: "
                    "faces tracked across frames, one record per frame and face (--json: JSON Lines as the stream "
                    "goes; --csv). Status and fps go to stderr. Exit 0: done or stopped by a signal; 1: no face "
                    "found anywhere; 2: bad input (one line saying what to fix).")
    pr.add_argument("--checkpoint", required=True, help="a .pt checkpoint or an exported .onnx model")
    pr.add_argument("inputs", nargs="*", metavar="IMAGE_DIR_OR_VIDEO",
                    help="images and folders of images, or one video file (.mp4, .avi, .mov, .mkv, ...)")
    pr.add_argument("--source", default=None, metavar="CAMERA_OR_URL",
                    help="read a camera (0 = the first webcam) or a stream URL / video file instead of inputs")
    pr.add_argument("--out", default=None,
                    help="images: a folder for annotated copies (NAME_pred.png); video/camera: an annotated .mp4")
    pr.add_argument("--json", action="store_true",
                    help="stdout holds only JSON: one document for images, JSON Lines (one record per frame and "
                         "face) for a video or camera")
    pr.add_argument("--json-out", default=None, metavar="FILE",
                    help="also write the JSON to FILE (.json for images, .jsonl for a video or camera)")
    pr.add_argument("--csv", default=None, metavar="FILE",
                    help="video/camera: write the records as CSV to FILE.csv ('-' = stdout, not with --json)")
    pr.add_argument("--every", type=_positive_int, default=None, metavar="N",
                    help="video/camera: process every N-th frame (default 1 = all); the annotated video holds "
                         "the processed frames at fps/N")
    pr.add_argument("--smooth", type=_positive_int, default=None, metavar="N",
                    help="video/camera: report each face's probabilities averaged over its last N processed "
                         "frames (default 5; 1 = raw)")
    pr.add_argument("--no-detect", action="store_true",
                    help="each image (or frame) is one face crop (FER-style inputs)")
    pr.add_argument("--detector", choices=["retinaface", "haar"], default="retinaface",
                    help="the face detector: retinaface (default; 5 landmarks, faces aligned by them) or haar "
                         "(OpenCV's cascade, boxes only)")
    pr.add_argument("--no-align", action="store_true",
                    help="crop the detector's box grown by the model's face_crop margin even where there are "
                         "landmarks (default: aligned by the landmarks)")
    pr.add_argument("--boxes", default=None, metavar="FILE.json",
                    help='images: the faces already found, a JSON list of {"file": PATH, "box": [x, y, w, h]}; '
                         "detection is skipped and the files come from the list")
    pr.add_argument("--detect-every", type=_positive_int, default=None, metavar="N",
                    help="video/camera: run the detector on every N-th processed frame and hold the faces it "
                         "found in between (default 1 = every processed frame)")
    pr.add_argument("--cam", action="store_true",
                    help="images, with --out: also write Grad-CAM overlays, NAME_faceK_cam.png on each face crop and "
                         "NAME_cam.png on the photo (a .pt or an export --format hf folder)")
    _cam_layer_arg(pr)

    x = _sub(sub, "export", "export a checkpoint to ONNX (verified with onnxruntime), safetensors, or a Hugging "
                            "Face model folder with a model card",
             description="Export a .pt checkpoint to ONNX (dynamic batch; its outputs checked against PyTorch's "
                         "with onnxruntime before anything is written; --int8 for a calibrated int8 model), "
                         "safetensors, each with a JSON sidecar (classes, sizes, channels, normalization, the "
                         "preprocessing recipe) so predict needs neither torch nor this repository's config, or a "
                         "Hugging Face folder with a model card (--format hf, --push-to-hub).", epilog=EXIT_CODES)
    x.add_argument("--checkpoint", required=True, help="a .pt checkpoint")
    x.add_argument("--format", choices=["onnx", "safetensors", "hf"], required=True,
                   help="the file format; hf: a folder (config.json, model.safetensors, README.md model card, "
                        "confusion_test.png) that EmotionNet.from_pretrained and --checkpoint DIR read")
    x.add_argument("--out", default=None, help="output file, or the folder for --format hf (default: next to the "
                                                "checkpoint)")
    x.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="--format hf: upload the folder to the Hugging Face Hub as OWNER/NAME (token: HF_TOKEN or "
                        "`hf auth login`)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    x.add_argument("--license", default="unknown", help="--format hf: the model card's license (default unknown)")
    x.add_argument("--int8", action="store_true",
                   help="--format onnx: a static int8 (QDQ, per-channel) model calibrated on training images, "
                        "checked against fp32 on the test split (default out: NAME.int8.onnx)")
    x.add_argument("--calibration", type=_positive_int, default=300, metavar="N",
                   help="--int8: calibration images from the training split (default 300)")
    x.add_argument("--min-agreement", type=float, default=0.98, metavar="FRACTION",
                   help="--int8: refuse when int8 and fp32 agree on fewer test images than this (default 0.98)")
    x.add_argument("--force", action="store_true", help="--int8: write even below --min-agreement")
    x.add_argument("overrides", nargs="*", metavar="key=value",
                   help="--int8: change the checkpoint's config for the data it reads, e.g. data.root=PATH")

    dm = _sub(sub, "demo", "serve a web page (upload or camera) and a JSON API that box each face with its expression",
              description="Serve the web demo: a page where a person uploads a photo or turns on their own camera\n"
                          "and sees each face boxed with its expression, and a JSON API beside it (POST /api/predict,\n"
                          "GET /api/model, GET /healthz, /docs). Works offline: the page loads nothing from outside.\n"
                          "Binds 127.0.0.1 unless --host says otherwise. Ctrl-C stops it. See docs/demo.md.",
              epilog=EXIT_CODES)
    dm.add_argument("--checkpoint", required=True, help="a .pt checkpoint or an exported .onnx model (then no torch)")
    dm.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    dm.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port, named at start)")
    dm.add_argument("--max-upload-mb", type=float, default=10, metavar="MB",
                    help="uploads over this many MB get 413 (default 10)")
    dm.add_argument("--save", default=None, metavar="DIR",
                    help="keep each upload and its JSON result in DIR (default: nothing is written)")
    _cam_layer_arg(dm)  # the page's Grad-CAM toggle (a PyTorch model)

    from emotion_dist.commands.bench import rows_arg  # torch-free at import

    b = _sub(sub, "bench", help="throughput of loaders, model step and end-to-end training (see docs/benchmarks.md)",
             description="Times training's own parts on your data and settings: --config and key=value are "
                         "train's (data.root, data.image_size, train.batch_size, train.precision, dist.strategy, "
                         "train.compile, data.on_device, ...); under torchrun every rank takes part. The flags "
                         "are bench's own.", epilog=EXIT_CODES)
    _config_args(b)
    b.add_argument("--steps", type=_positive_int, default=20, help="timed steps per row (default 20)")
    b.add_argument("--warmup", type=_positive_int, default=2,
                   help="warm-up steps per row, after the model step's first call (default 2)")
    b.add_argument("--rows", type=rows_arg, default="abcde",
                   help="which rows, as letters (default abcde): a classic loader, b fast loader, c model step, "
                        "d end-to-end classic, e end-to-end fast")
    b.add_argument("--compile", action="store_true",
                   help="train.compile=true; "
                        "with --ultralytics, ultralytics trains with compile=train.compile_mode too")
    b.add_argument("--ultralytics", action="store_true",
                   help="also rows f and g: ultralytics' own trainer and our fit() on the same images")
    b.add_argument("--epochs", type=_positive_int, default=2, help="epochs of the --ultralytics comparison (default 2)")
    b.add_argument("--workdir", default=None, help="keep the bench's run folders here (default: a temporary folder)")
    add_output_args(b, "the bench report")

    sm = _sub(sub, "summarize", "mean ± std of test accuracy and macro-F1 over runs (seeds) or a sweep's points",
              description="Mean ± sample std of the recorded test accuracy and macro-F1 over run directories "
                          "(their metrics.jsonl) or evaluate --json-out reports: one recipe over seeds. It "
                          "warns when the runs' settings differ in more than the seed. Given a sweep folder "
                          "(emotion-dist sweep), one row per point of the grid, sorted by --metric.",
              epilog=EXIT_CODES)
    sm.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, evaluate --json-out reports, or "
                                                               "one sweep folder")
    sm.add_argument("--metric", choices=["macro_f1", "accuracy"], default="macro_f1",
                    help="a sweep's points sorted by this test metric's mean, best first (default macro_f1)")
    add_output_args(sm, "the summary")

    ck = _sub(sub, "ckpt", "checkpoint tools")
    cksub = ck.add_subparsers(dest="ckpt_command", required=True, metavar="SUBCOMMAND")
    i = _sub(cksub, "inspect", "print a checkpoint's metadata and how a config differs from its own")
    i.add_argument("path", help="a .pt checkpoint")
    _config_args(i)
    add_output_args(i, "the metadata and the config diff")
    return p


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped command gets a did-you-mean (argparse 3.11 lists the choices only)."""
    import difflib

    if not argv or argv[0].startswith("-"):
        return
    choices = _subparsers(parser)
    if argv[0] not in choices:
        close = difflib.get_close_matches(argv[0], list(choices), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"the commands are {', '.join(choices)}"
        parser.error(f"unknown command {argv[0]!r}; {hint}")


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub-)parser that argv's command words select: `config keys` -> its own parser."""
    p, i = parser, 0
    while i < len(argv) and any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
        choices = _subparsers(p)
        if argv[i] not in choices:
            break
        p, i = choices[argv[i]], i + 1
    return p


def _check_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A flag the command does not have gets its hint before argparse's own checks (which would
    first complain about a required flag the typo was meant to be)."""
    sub = _command_parser(parser, argv)
    if sub is parser:
        return
    known = [o for a in sub._actions for o in a.option_strings]
    for token in argv[:argv.index("--")] if "--" in argv else argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0]
        if name in known or len([o for o in known if o.startswith(name)]) == 1:  # argparse takes unique prefixes
            continue
        i = argv.index(token)
        value = argv[i + 1] if i + 1 < len(argv) else None
        sub.error(f"unrecognized argument {token}; "
                  f"{_unknown_flag_hint(token, value, sub, any(a.dest == 'overrides' for a in sub._actions))}")


def _unknown_flag_hint(flag: str, value: str | None, sub: argparse.ArgumentParser, takes_overrides: bool) -> str:
    """What a person typing `--epochs 3` meant: a config key as key=value, or one of the command's flags."""
    import difflib

    from emotion_dist.config import describe_keys

    name = flag.lstrip("-").split("=", 1)[0]
    if "=" in flag:
        value = flag.split("=", 1)[1]
    keys = [k.key for k in describe_keys()]
    wanted = name.replace("-", "_")
    exact = [k for k in keys if k.split(".", 1)[1] == wanted or k == wanted]
    shown = value if value is not None and not value.startswith("-") else "VALUE"
    if takes_overrides and exact:
        return f"config keys are set as key=value: use {' or '.join(f'{k}={shown}' for k in exact)}"
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag.split("=", 1)[0], flags, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    near = difflib.get_close_matches(wanted, keys + [k.split(".", 1)[1] for k in keys], n=1, cutoff=0.6)
    if takes_overrides and near:
        key = near[0] if "." in near[0] else next(k for k in keys if k.split(".", 1)[1] == near[0])
        return f"config keys are set as key=value: did you mean {key}={shown}?"
    return f"{sub.prog} --help lists its flags"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus key=value overrides anywhere on the line for the commands that take them
    (argparse gives a positional list only one contiguous run), a did-you-mean for a mistyped
    command, and for a flag the command does not have (`--epochs 3`) the key=value it meant."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_command(parser, argv)
    _check_flags(parser, argv)
    end = argv.index("--") if "--" in argv else len(argv)
    found = [a for a in argv[:end] if OVERRIDE.match(a)]
    rest = [a for a in argv[:end] if not OVERRIDE.match(a)] + argv[end:]
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        sub = _subparsers(parser)[args.command]
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        if flag.startswith("-"):
            i = rest.index(flag)
            value = rest[i + 1] if i + 1 < len(rest) else None
            sub.error(f"unrecognized argument {flag}; "
                      f"{_unknown_flag_hint(flag, value, sub, hasattr(args, 'overrides'))}")
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "overrides"):  # a command without a config: its own arguments, as written
        return parser.parse_args(argv) if found else args
    if any(not OVERRIDE.match(o) and "=" not in o for o in args.overrides):  # `--epochs 3`'s 3, or a stray word
        sub = _subparsers(parser)[args.command]
        word = next(o for o in args.overrides if "=" not in o)
        i = rest.index(word)
        before = rest[i - 1] if i > 0 else ""
        if before.startswith("--") and before not in [o for a in sub._actions for o in a.option_strings]:
            sub.error(f"unrecognized argument {before}; {_unknown_flag_hint(before, word, sub, True)}")
    args.overrides = [*found, *args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    from emotion_dist.distributed.interrupts import handlers_restored
    from emotion_dist.errors import EXIT_OK, Interrupted, TrainingAborted, UserError, exit_code_for

    # file names that are not valid UTF-8 print as \xNN instead of raising mid-output
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    try:
        with handlers_restored():
            return _run(args)
    except (UserError, TrainingAborted) as e:
        return _fail(str(e), exit_code_for(e))
    except Interrupted as e:  # a stop signal while preparing data: nothing half-built is kept; exit 0 to requeue
        print(f"stopped by {e.signame} while preparing data; run the command again to carry on",
              file=sys.stderr, flush=True)
        return exit_code_for(e)  # 130 for Ctrl-C
    except KeyboardInterrupt as e:
        return exit_code_for(e)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args) -> int:
    from emotion_dist.utils.output import MARKER, check_json_out, emit, text_stream

    if args.command == "train":
        from emotion_dist.commands.train import run_training

        return run_training(args.config, args.overrides, args)
    if args.command == "config":
        return _config_keys(args)
    if args.command == "data" and args.data_command == "faces":
        from emotion_dist.commands.faces import run_data_faces

        return run_data_faces(args)
    if args.command == "data" and args.data_command == "cache":
        from emotion_dist.commands.data import run_data_cache

        return run_data_cache(args.config, args.overrides)
    if args.command == "data":
        from emotion_dist.data.readers.synthetic import generate
        from emotion_dist.distributed import interrupts

        check_json_out(args, data=[("--out", args.out)])  # never a file inside the set it writes
        interrupts.install()  # a stop signal mid-generation removes the temp folder and exits 0
        out = generate(args.out, args.train, args.test, args.seed)
        print(f"synthetic dataset ready: {out}", file=text_stream(args))
        emit(args, {MARKER: "data synthetic", "root": str(out), "train": args.train, "test": args.test,
                    "seed": args.seed})
        return 0
    if args.command == "evaluate":
        from emotion_dist.distributed import interrupts

        interrupts.install()  # before torch is imported: a signal from here on is one line and exit 0
        from emotion_dist.commands.evaluate import run_evaluate

        return run_evaluate(args)
    if args.command == "predict":
        from emotion_dist.commands.predict import run_predict

        return run_predict(args)
    if args.command == "export":
        from emotion_dist.distributed import interrupts
        from emotion_dist.errors import Interrupted, exit_code_for

        interrupts.install()  # a stop signal ends the export at its next phase, before anything is written
        try:
            from emotion_dist.commands.export import run_export  # torch: seconds

            return run_export(args)
        except Interrupted as e:
            print(f"stopped by {e.signame} before the export was written; nothing written", file=sys.stderr, flush=True)
            return exit_code_for(e)
    if args.command == "demo":
        from emotion_dist.commands.demo import run_demo

        return run_demo(args)
    if args.command == "bench":
        from emotion_dist.commands.bench import run_bench

        return run_bench(args)
    if args.command == "summarize":
        from emotion_dist.commands.summarize import run_summarize

        return run_summarize(args)
    if args.command == "checks":
        from emotion_dist.commands.checks import run_checks

        return run_checks(args)
    if args.command == "sweep" and args.search == "optuna":
        from emotion_dist.commands.search import run_search

        return run_search(args)
    if args.command == "sweep":
        from emotion_dist.commands.sweep import run_sweep

        return run_sweep(args)
    if args.command == "ckpt":
        from emotion_dist.commands.ckpt import inspect

        return inspect(args)
    return 0


def train_in_process(config, overrides: list[str], out: argparse.Namespace) -> int:
    """`emotion-dist train` called from Python (emotion_dist.api.train): the same function the
    command runs; its final JSON document is left on `out.document`."""
    from emotion_dist.commands.train import run_training

    return run_training(config, list(overrides), out)


def _config_keys(args) -> int:
    from emotion_dist.config import describe_keys, format_default, keys_markdown
    from emotion_dist.utils.output import MARKER, check_json_out, emit, text_stream

    check_json_out(args)  # never over a JSON file emotion-dist cannot prove it wrote
    rows = [k for k in describe_keys() if k.key.startswith(args.prefix)]
    if not rows:
        return _fail(f"no config key starts with {args.prefix!r}; the sections are data, model, train, dist, run, "
                     f"ckpt, log")
    out = text_stream(args)
    if args.json:  # stdout holds the document; the table would only repeat it on stderr
        pass
    elif args.markdown:
        out.write(keys_markdown())
    else:
        width = max(len(k.key) for k in rows)
        for k in rows:
            print(f"{k.key:<{width}}  {k.type}  (default {format_default(k.default)})\n{'':<{width}}  {k.help}",
                  file=out)
    emit(args, {MARKER: "config keys", "keys": [{"key": k.key, "type": k.type, "default": k.default, "help": k.help}
                                               for k in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
