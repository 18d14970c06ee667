"""`emotion-dist evaluate`: a checkpoint on the test split (or any folder via data.root), on one
process or many (exact distributed evaluation), with a rich table, JSON and a confusion matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import ConfigError, config_from_dict


def checkpoint_config(state: dict, overrides: list[str]):
    """The checkpoint's own config, with the user's overrides on top (validated as usual)."""
    from .config import apply_overrides, validate

    cfg = config_from_dict(state["config"])
    cfg.run.resume = "never"
    cfg.model.init_from = None
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def run_evaluate(args) -> int:
    state = load_checkpoint(args.checkpoint)
    cfg = checkpoint_config(state, args.overrides)
    from . import distributed as D
    from .augment import BatchTransform
    from .data import dataset_root, load_datasets
    from .engine import evaluate
    from .export import model_from_state
    from .metrics import plot_confusion, summarize
    from .prepare import Preparation
    from .report import setup_logging

    info = D.detect_launch()
    env = D.init_distributed(cfg, info)
    setup_logging(env.rank)
    ok = False
    try:
        prep = Preparation.start(cfg, env)
        root = prep.once("the dataset", lambda: dataset_root(cfg))
        ds = prep.once("the decoded images", lambda: load_datasets(cfg, root), together=True)
        if ds.classes != state["class_names"]:
            raise ConfigError(f"the data's classes {ds.classes} differ from the checkpoint's {state['class_names']}")
        split = ds.test if args.split == "test" else ds.val
        if split is None:
            raise ConfigError(f"{root} has no test split (test/ or val/ folder); pass --split val or data.root=PATH")
        model = model_from_state(state, args.checkpoint).to(env.device)  # no DDP wrapper: no gradient sync
        transform = BatchTransform(ds.channels, cfg.data.image_size, env.device, cfg.train.seed)
        res, cm = evaluate(model, split, transform, env, len(ds.classes), cfg.train.batch_size,
                           cfg.train.precision, tta=args.tta)
        report = {"checkpoint": str(args.checkpoint), "split": args.split, "data": str(root), "tta": args.tta,
                  "world_size": env.world_size, "loss": res["loss"], **summarize(cm.cpu(), ds.classes),
                  "confusion_matrix": cm.cpu().tolist()}
        if env.is_main:
            out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent
            png = out / f"confusion_{args.split}.png"
            plot_confusion(cm.cpu(), ds.classes, png, f"{args.split}: {Path(args.checkpoint).name}")
            report["confusion_png"] = str(png)
            print_table(report)
            if args.json_out == "-":
                print(json.dumps(report, indent=1))
            elif args.json_out:
                Path(args.json_out).write_text(json.dumps(report, indent=1))
        ok = True
        return 0
    finally:
        D.close_distributed(clean=ok)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['split']} split: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
                    f"({report['count']} images)")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="right")
    for name, m in report["per_class"].items():
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    Console(file=sys.stdout, width=100).print(t)
