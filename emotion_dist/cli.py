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
    e.add_argument("--json", dest="json_out", default=None, help="write the report as JSON to this file ('-' = stdout)")
    e.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    e.add_argument("--out", default=None, help="folder for the confusion-matrix PNG (default: next to the checkpoint's run)")
    e.add_argument("overrides", nargs="*", metavar="key=value")

    pr = sub.add_parser("predict", help="detect faces in photos and classify their expression")
    pr.add_argument("--checkpoint", required=True, help="a .pt checkpoint or an exported .onnx model")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--out", default=None, help="write annotated copies (boxes + labels) here")
    pr.add_argument("--json", action="store_true", help="print JSON instead of one line per face")
    pr.add_argument("--no-detect", action="store_true", help="each image is one face crop (FER-style inputs)")

    x = sub.add_parser("export", help="export a checkpoint to ONNX (verified with onnxruntime) or safetensors")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    x.add_argument("--out", default=None, help="output file (default: next to the checkpoint)")

    c = sub.add_parser("ckpt", help="checkpoint tools")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    i = csub.add_parser("inspect", help="print a checkpoint's metadata")
    i.add_argument("path")
    _config_args(i)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import run_training

            return run_training(args.config, args.overrides)
        if args.command == "data":
            from .synthetic import generate

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
        if args.command == "ckpt":
            from .inspect_ckpt import inspect

            return inspect(args.path, args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
