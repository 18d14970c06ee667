"""`emotion-dist` command line. Heavy modules (torch, ultralytics) are imported inside the
commands so `--help` and config errors answer at once."""

from __future__ import annotations

import argparse
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
    _config_args(dsub.add_parser("cache", help="decode the configured data set into its cache ahead of training "
                                              "(e.g. in a Slurm job of its own) and report the cost"))

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

    b = sub.add_parser("bench", help="throughput of loaders, model step and end-to-end training (see docs/benchmarks.md)")
    b.add_argument("--images", type=int, default=2000, help="synthetic training images")
    b.add_argument("--image-size", type=int, default=96)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--steps", type=int, default=20, help="timed steps per row (after 2 warm-up steps)")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--workers", type=int, default=2, help="DataLoader workers for the classic pipeline")
    b.add_argument("--epochs", type=int, default=2, help="epochs for the ultralytics comparison")
    b.add_argument("--compile", action="store_true", help="torch.compile the model")
    b.add_argument("--ultralytics", action="store_true", help="also run ultralytics' trainer on the same images")
    b.add_argument("--cache-dir", default=".cache/emotion-dist")
    b.add_argument("--workdir", default=None, help="keep the bench's run folders here")
    b.add_argument("--json", default=None, help="write the results as JSON to this file")

    c = sub.add_parser("ckpt", help="checkpoint tools")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    i = csub.add_parser("inspect", help="print a checkpoint's metadata")
    i.add_argument("path")
    _config_args(i)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .errors import Interrupted, TrainingAborted

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import run_training

            return run_training(args.config, args.overrides)
        if args.command == "data" and args.data_command == "cache":
            from .cache import run_data_cache

            return run_data_cache(args.config, args.overrides)
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
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.command == "ckpt":
            from .inspect_ckpt import inspect

            return inspect(args.path, args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    except TrainingAborted as e:
        return _fail(str(e), 1)
    except Interrupted as e:  # a stop signal while preparing data: nothing half-built is kept; exit 0 to requeue
        print(f"stopped by {e.signame} while preparing data; run the command again to carry on", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
