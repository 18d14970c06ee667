"""`emotion-dist` command line. Heavy modules (torch, ultralytics) are imported inside the
commands so `--help` and config errors answer at once."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emotion-dist", description="Distributed training harness for EmotionNet (facial expressions).")
    sub = p.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train (same as launch/train.py; works under torchrun/accelerate/srun)"))

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synthetic", help="write the synthetic face dataset in the Kaggle layout")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=4000)
    s.add_argument("--test", type=int, default=700)
    s.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint (test split by default)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout (the table goes to stderr)")
    e.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON report to FILE")
    e.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    e.add_argument("--out", default=None, help="folder for the confusion-matrix PNG (default: next to the JSON report, "
                                                "else RUN_DIR/eval)")
    e.add_argument("overrides", nargs="*", metavar="key=value")

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

    x = sub.add_parser("export", help="export a checkpoint to ONNX (verified with onnxruntime) or safetensors")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    x.add_argument("--out", default=None, help="output file (default: next to the checkpoint)")

    from .bench import rows_arg  # torch-free at import

    b = sub.add_parser(
        "bench", help="throughput of loaders, model step and end-to-end training (see docs/benchmarks.md)",
        description="Times training's own parts on your data and settings: --config and key=value are train's "
                    "(data.root, data.image_size, train.batch_size, train.precision, dist.strategy, train.compile, "
                    "data.on_device, ...); under torchrun every rank takes part. The flags below are bench's own.")
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
    b.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout (the table "
                                                       "goes to stderr)")
    b.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON report to FILE")

    sm = sub.add_parser("summarize", help="mean ± std of test accuracy and macro-F1 over runs (seeds)")
    sm.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or evaluate --json reports")
    sm.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = sub.add_parser("ckpt", help="checkpoint tools")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    i = csub.add_parser("inspect", help="print a checkpoint's metadata")
    i.add_argument("path")
    _config_args(i)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import EXIT_OK, Interrupted, UserError

    # file names that are not valid UTF-8 print as \xNN instead of raising mid-output
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        return _fail(str(e))
    except Interrupted as e:
        print(f"stopped by {e.signame}; nothing half-written was kept", file=sys.stderr, flush=True)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args) -> int:
    if args.command == "train":
        from .train import run_training

        return run_training(args.config, args.overrides)
    if args.command == "data":
        from . import interrupts
        from .synthetic import generate

        interrupts.install()  # a stop signal mid-generation removes the temp folder and exits 0
        out = generate(args.out, args.train, args.test, args.seed)
        print(f"synthetic dataset ready: {out}")
        return 0
    if args.command == "evaluate":
        from .evaluate import run_evaluate

        return run_evaluate(args)
    if args.command == "predict":
        from .predict import run_predict

        return run_predict(args)
    if args.command == "export":
        from .export import export

        path = export(args.checkpoint, args.format, args.out)
        print(f"exported {path} (+ {path.with_suffix('.json').name})")
        return 0
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    if args.command == "summarize":
        from .summary import run_summarize

        return run_summarize(args)
    if args.command == "ckpt":
        from .inspect_ckpt import inspect

        return inspect(args.path, args.config, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
