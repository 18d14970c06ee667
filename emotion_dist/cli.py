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
from emotion_dist.utils.output import add_output_args

EXIT_USAGE = 2
EXIT_CODES = """exit codes:
  0  done, or stopped by a signal (SIGTERM/SIGINT/SIGUSR1) after saving: a scheduler may requeue
  1  training failed or was aborted (non-finite steps, a failed checkpoint write, a lost peer)
  2  bad input: config, data, checkpoint, launch environment or output path (one line on stderr)"""
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
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML config (default: the built-in defaults, the same as configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides anywhere on the line, e.g. train.epochs=3 (all keys: emotion-dist config keys)")


def _sub(sub, name: str, help: str, description: str | None = None, epilog: str | None = None, **kw):
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


TRAIN_EPILOG = f"""config keys (the sections data, model, train, dist, run, ckpt, log):
  emotion-dist config keys            every key with its type, default and meaning
  emotion-dist config keys train.     only the keys starting with train.
  emotion-dist train --config X ... --print-config     the resolved config as YAML, nothing started

precedence: key=value on the command line > the launcher's settings (accelerate --mixed_precision,
--use_fsdp, --dynamo_backend, --cpu) and WANDB_* variables > the --config file > the defaults; the
start line says when one overruled another.

{EXIT_CODES}"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emotion-dist", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    k.add_argument("--markdown", action="store_true", help="as the Markdown table in README.md")
    add_output_args(k, "the keys")

    d = _sub(sub, "data", "dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = _sub(dsub, "synthetic", "write the synthetic face dataset in the Kaggle layout")
    s.add_argument("--out", required=True, help="the folder to write (train/train/<class>, test/test/<class>)")
    s.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    s.add_argument("--test", type=int, default=700, help="test images (default 700)")
    s.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_output_args(s, "where the data set went and its sizes")
    dc = _sub(dsub, "cache", "decode the configured data set into its cache ahead of training (e.g. in a Slurm job "
                             "of its own) and report images, seconds, img/s per core, size on disk and peak memory")
    _config_args(dc)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint (test split by default)")
    e.add_argument("--checkpoint", required=True, action="append",
                   help="a .pt checkpoint; give it several times to evaluate an ensemble (probabilities averaged)")
    e.add_argument("--split", choices=["test", "val"], default="test", help="which split (default test)")
    e.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout (the table goes to stderr)")
    e.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON report to FILE")
    e.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "tencrop"],
                   help="test-time augmentation: flip (the image and its mirror; the default of a bare --tta) or "
                        "tencrop (4 corner + centre crops, 40 of 48 px, and their mirrors); probabilities averaged")
    e.add_argument("--out", default=None, help="folder for the confusion-matrix PNG (default: next to the JSON report, "
                                                "else RUN_DIR/eval)")
    e.add_argument("--cam", type=_positive_int, default=None, metavar="N",
                   help="also write Grad-CAM figures, cam_<class>.png: for each class N test images predicted right "
                        "beside N predicted wrong")
    e.add_argument("--cam-layer", default="backbone.6", metavar="LAYER",
                   help="the layer Grad-CAM reads (default backbone.6)")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the checkpoint's config, e.g. data.root=PATH to evaluate on another folder")

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
    pr.add_argument("--cam", action="store_true",
                    help="images, with --out: also write Grad-CAM overlays, NAME_faceK_cam.png on each face crop and "
                         "NAME_cam.png on the photo (a .pt or an export --format hf folder)")
    pr.add_argument("--cam-layer", default="backbone.6", metavar="LAYER",
                    help="the layer Grad-CAM reads (default backbone.6, stride 16; backbone.8 is coarser)")

    x = sub.add_parser("export", help="export a checkpoint to ONNX (verified with onnxruntime), safetensors, or a "
                                      "Hugging Face model folder with a model card")
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
                   help="train.compile=true; with --ultralytics, ultralytics trains with compile=train.compile_mode too")
    b.add_argument("--ultralytics", action="store_true",
                   help="also rows f and g: ultralytics' own trainer and our fit() on the same images")
    b.add_argument("--epochs", type=_positive_int, default=2, help="epochs of the --ultralytics comparison (default 2)")
    b.add_argument("--workdir", default=None, help="keep the bench's run folders here (default: a temporary folder)")
    add_output_args(b, "the bench report")

    sm = sub.add_parser("summarize", help="mean ± std of test accuracy and macro-F1 over runs (seeds)")
    sm.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or evaluate --json reports")
    add_output_args(sm, "the summary")

    ck = _sub(sub, "ckpt", "checkpoint tools")
    cksub = ck.add_subparsers(dest="ckpt_command", required=True, metavar="SUBCOMMAND")
    i = _sub(cksub, "inspect", "print a checkpoint's metadata and how a config differs from its own")
    i.add_argument("path", help="a .pt checkpoint")
    _config_args(i)
    add_output_args(i, "the metadata and the config diff")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus key=value overrides anywhere on the line for the commands that take them
    (argparse gives a positional list only one contiguous run)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    found = [a for a in argv[:end] if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv[:end] if not OVERRIDE.match(a)] + argv[end:])
    if not hasattr(args, "overrides"):  # a command without a config: its own arguments, as written
        return parser.parse_args(argv) if found else args
    args.overrides = [*found, *args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    from emotion_dist.errors import EXIT_FAILURE, EXIT_OK, Interrupted, TrainingAborted, UserError

    # file names that are not valid UTF-8 print as \xNN instead of raising mid-output
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        return _fail(str(e))
    except TrainingAborted as e:  # e.g. a data preparation that another rank aborted
        return _fail(str(e), EXIT_FAILURE)
    except Interrupted as e:  # a stop signal while preparing data: nothing half-built is kept; exit 0 to requeue
        print(f"stopped by {e.signame} while preparing data; run the command again to carry on",
              file=sys.stderr, flush=True)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args) -> int:
    from emotion_dist.utils.output import MARKER, check_json_out, emit, human

    if args.command == "train":
        from emotion_dist.commands.train import run_training

        return run_training(args.config, args.overrides, args)
    if args.command == "config":
        return _config_keys(args)
    if args.command == "data" and args.data_command == "cache":
        from emotion_dist.commands.data import run_data_cache

        return run_data_cache(args.config, args.overrides)
    if args.command == "data":
        from emotion_dist.distributed import interrupts
        from emotion_dist.data.readers.synthetic import generate

        check_json_out(args)
        interrupts.install()  # a stop signal mid-generation removes the temp folder and exits 0
        out = generate(args.out, args.train, args.test, args.seed)
        print(f"synthetic dataset ready: {out}", file=human(args))
        emit(args, {MARKER: "data synthetic", "root": str(out), "train": args.train, "test": args.test,
                    "seed": args.seed})
        return 0
    if args.command == "evaluate":
        from emotion_dist.commands.evaluate import run_evaluate

        return run_evaluate(args)
    if args.command == "predict":
        from emotion_dist.inference.video import run_predict

        return run_predict(args)
    if args.command == "export":
        from emotion_dist.commands.export import run_export

        return run_export(args)
    if args.command == "bench":
        from emotion_dist.commands.bench import run_bench

        return run_bench(args)
    if args.command == "summarize":
        from emotion_dist.commands.summarize import run_summarize

        return run_summarize(args)
    if args.command == "ckpt":
        from emotion_dist.commands.ckpt import inspect

        return inspect(args)
    return 0


def _config_keys(args) -> int:
    from emotion_dist.config import describe_keys, format_default, keys_markdown
    from emotion_dist.utils.output import MARKER, emit, human

    rows = [k for k in describe_keys() if k.key.startswith(args.prefix)]
    if not rows:
        return _fail(f"no config key starts with {args.prefix!r}; the sections are data, model, train, dist, run, "
                     f"ckpt, log")
    out = human(args)
    if args.markdown:
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
