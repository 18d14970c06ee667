"""`emotion-dist evaluate`: a checkpoint on the test split (or any folder via data.root), on one
process or many (exact distributed evaluation), with a table, JSON and a confusion matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import load_checkpoint, read_meta
from .config import ConfigError, apply_overrides, config_from_dict, parse_override, validate
from .fsutil import atomic_write_json, guard_output, json_written_by_us

REPORT_MARKER = "emotion_dist"  # top-level key of every JSON report emotion-dist writes


def checkpoint_config(state: dict, overrides: list[str]):
    """The checkpoint's own config, with the user's overrides on top (validated as usual). A new
    data.root without a data.source is read as whatever it is (auto), never written to."""
    cfg = config_from_dict(state.get("config", {}))
    cfg.run.resume = "never"
    cfg.model.init_from = None
    keys = apply_overrides(cfg, overrides)
    if "data.root" in keys and "data.source" not in keys:
        cfg.data.source = "auto"
    validate(cfg)
    return cfg


def report_dir(args) -> Path:
    """Plots go next to the report, never over the training run's own confusion_test.png."""
    if args.out:
        return Path(args.out)
    if args.json_out:
        return Path(args.json_out).parent
    return Path(args.checkpoint).resolve().parent.parent / "eval"


def check_outputs(args) -> Path:
    """Before any work: the JSON report path and the plot folder."""
    if args.json_out and args.json_out != "-":
        guard_output(Path(args.json_out), what="the JSON report", suffixes=(".json",), inputs=[Path(args.checkpoint)],
                     ours=lambda p: json_written_by_us(p, REPORT_MARKER), option="--json-out")
    out = report_dir(args)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the confusion-matrix PNG")
    return out


def run_evaluate(args) -> int:
    state = load_checkpoint(args.checkpoint)
    meta = read_meta(state, args.checkpoint)
    cfg = checkpoint_config(state, args.overrides)
    if any(parse_override(o)[0] == "model.in_channels" for o in args.overrides) and cfg.model.in_channels != meta.in_channels:
        raise ConfigError(f"{args.checkpoint} takes in_channels={meta.in_channels} images; drop "
                          f"model.in_channels={cfg.model.in_channels} (evaluate uses the checkpoint's)")
    out_dir = check_outputs(args)
    from . import distributed as D
    from .augment import BatchTransform
    from .build import prepare_data
    from .export import model_from_state
    from .loggers import setup_logging
    from .metrics import plot_confusion
    from .validation import evaluate_split

    info = D.detect_launch()
    env = D.init_distributed(cfg, info)
    setup_logging(env.rank)
    ok = False
    try:
        ds = prepare_data(cfg, env)
        if ds.classes != meta.classes:
            raise ConfigError(f"the data's classes {ds.classes} differ from the checkpoint's {meta.classes}")
        split = ds.test if args.split == "test" else ds.val
        if split is None:
            raise ConfigError(f"{ds.root} has no test split (test/ or val/ folder); pass --split val or data.root=PATH")
        model = model_from_state(state, args.checkpoint).to(env.device)  # no DDP wrapper: no gradient sync
        transform = BatchTransform(ds.channels, cfg.data.image_size, env.device, cfg.train.seed)
        res, cm = evaluate_split(model, split, transform, env, ds.classes, cfg.train.batch_size, cfg.train.precision,
                                 tta=args.tta)
        report = {REPORT_MARKER: "evaluate", "checkpoint": str(args.checkpoint), "split": args.split,
                  "data": ds.root, "tta": args.tta, "world_size": env.world_size, "loss": res["loss"],
                  **{k: res[k] for k in ("accuracy", "macro_f1", "count", "per_class")},
                  "confusion_matrix": cm.cpu().tolist()}
        if env.is_main:
            png = out_dir / f"confusion_{args.split}.png"
            plot_confusion(cm.cpu(), ds.classes, png, f"{args.split}: {Path(args.checkpoint).name}")
            report["confusion_png"] = str(png)
            print_table(report, sys.stderr if args.json or args.json_out == "-" else sys.stdout)
            if args.json or args.json_out == "-":
                print(json.dumps(report, indent=1), flush=True)
            if args.json_out and args.json_out != "-":
                atomic_write_json(Path(args.json_out), report)
        ok = True
        return 0
    finally:
        D.close_distributed(clean=ok)


def print_table(report: dict, file) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['split']} split: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
                    f"({report['count']} images)")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="right")
    for name, m in report["per_class"].items():
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    Console(file=file, width=100).print(t)
