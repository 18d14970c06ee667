"""`emotion-dist evaluate`: a checkpoint on the test split (or any folder via data.root), on one
process or many (exact distributed evaluation), with a table, JSON and a confusion matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from emotion_dist.config import ConfigError, parse_override
from emotion_dist.distributed import interrupts
from emotion_dist.errors import Interrupted
from emotion_dist.modelio import checkpoint_config, load_checkpoint, read_meta
from emotion_dist.utils.fsutil import atomic_write_json, guard_output, json_written_by_us, with_proof
from emotion_dist.utils.paths import check_outside_data, data_paths

REPORT_MARKER = "emotion_dist"  # top-level key of every JSON report emotion-dist writes


def default_tta(state: dict, overrides: list[str], split: str = "test") -> tuple[str, str]:
    """The TTA mode when --tta is not given, and where it came from, as the checkpoint's recipe
    measured that split: a train.test_tta override, else for the test split the checkpoint's
    train.test_tta (its training run's test pass used it), for the val split none (training
    validates without TTA). A checkpoint from before test_tta was recorded: none."""
    for o in reversed(overrides):
        key, value = parse_override(o)
        if key == "train.test_tta":
            return str(value), "train.test_tta on the command line"
    if split == "val":
        return "none", "as training validated"
    recorded = (state.get("config") or {}).get("train", {}).get("test_tta")
    if recorded in ("none", "flip", "tencrop"):
        return recorded, "the checkpoint's train.test_tta, as its training run's test pass"
    return "none", "the checkpoint records no train.test_tta"


def report_dir(args) -> Path:
    """Plots go next to the report, never over the training run's own confusion_test.png."""
    if args.out:
        return Path(args.out)
    if args.json_out and args.json_out != "-":
        return Path(args.json_out).parent
    model = Path(args.checkpoint[0]).resolve()
    if model.is_dir():  # an export --format hf folder: beside it, never inside what may be uploaded
        return model.parent / f"{model.name}-eval"
    return model.parent.parent / "eval"


def check_outputs(args, cfg=None) -> Path:
    """Before any work: the JSON report path and the plot folder (neither inside the data that
    `cfg` reads)."""
    data = data_paths(cfg.data.root, cfg.data.ferplus) if cfg is not None else []
    if args.json_out and args.json_out != "-":
        guard_output(Path(args.json_out), what="the JSON report", suffixes=(".json",),
                     inputs=[Path(c) for c in args.checkpoint], ours=lambda p: json_written_by_us(p, REPORT_MARKER),
                     option="--json-out", data=data)
    out = report_dir(args)
    check_outside_data(out, data, option="--out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the confusion-matrix PNG")
    return out


def load_models(paths: list[str]) -> list[tuple]:
    """The checkpoints of an evaluation (several: an ensemble), which must take the same input."""
    loaded = [(state, read_meta(state, p)) for p in paths for state in [load_checkpoint(p)]]
    first = loaded[0][1]
    for p, (_, meta) in zip(paths[1:], loaded[1:]):
        if (meta.in_channels, meta.image_size) != (first.in_channels, first.image_size):
            raise ConfigError(f"{p} takes {meta.in_channels}-channel {meta.image_size} px images but {paths[0]} "
                              f"takes {first.in_channels}-channel {first.image_size} px; an ensemble needs one input")
    return loaded


def class_maps(data_classes: list[str], metas) -> list:
    """Per model, None when it predicts the data's classes as they are, else the mapping of its classes
    onto the data's (an FER model on FER+ data); one line when the classes have nothing in common."""
    from emotion_dist.data.labels import class_mapping

    maps = []
    for meta in metas:
        if meta.classes == data_classes:
            maps.append(None)
            continue
        mapping = class_mapping(meta.classes, data_classes)
        if all(m is None for m in mapping):
            raise ConfigError(f"the data's classes {data_classes} differ from the checkpoint's {meta.classes}")
        maps.append(mapping)
    return maps


def stop_between_batches(model, world_size: int) -> None:
    """One process: a stop signal ends the pass at its next forward (the check runs before each).
    Several: the ranks must leave together, or one waits in the next collective for a rank that
    left; the evaluation loop agrees on a stop between batches for them (training/validation.py)."""
    if world_size == 1:
        model.register_forward_pre_hook(lambda module, inputs: interrupts.check())


def run_evaluate(args) -> int:
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) before the last batch: one line, exit 0, no report
    and no confusion matrix written (figures over part of a split would pass for the split's).
    One that comes after it lets the finished report be written (well under a second)."""
    interrupts.install()
    try:
        return _evaluate(args)
    except Interrupted as e:
        print(f"stopped by {e.signame} before the evaluation finished; no report or confusion matrix written",
              file=sys.stderr, flush=True)
        return 0


def _evaluate(args) -> int:
    loaded = load_models(args.checkpoint)
    state, meta = loaded[0]
    cfg = checkpoint_config(state, args.overrides)
    if (any(parse_override(o)[0] == "model.in_channels" for o in args.overrides)
            and cfg.model.in_channels != meta.in_channels):
        raise ConfigError(f"{args.checkpoint[0]} takes in_channels={meta.in_channels} images; drop "
                          f"model.in_channels={cfg.model.in_channels} (evaluate uses the checkpoint's)")
    out_dir = check_outputs(args, cfg)
    if args.tta is None:
        args.tta, tta_from = default_tta(state, args.overrides, args.split)
    else:
        tta_from = "--tta"
    from emotion_dist.data.augment import BatchTransform
    from emotion_dist.distributed import process_group
    from emotion_dist.inference import tta
    from emotion_dist.modelio import model_from_state
    from emotion_dist.training.build import prepare_data
    from emotion_dist.training.loggers import setup_logging
    from emotion_dist.training.metrics import plot_confusion
    from emotion_dist.training.validation import Evaluator

    interrupts.check()  # after the checkpoints and the heavy imports, before the process group
    info = process_group.detect_launch()
    env = process_group.init_distributed(cfg, info)
    setup_logging(env.rank, sys.stderr)
    ok = False
    try:
        if env.is_main:
            print(f"TTA {args.tta} ({tta_from}; --tta none|flip|tencrop chooses)", file=sys.stderr, flush=True)
        ds = prepare_data(cfg, env, check_classes=False)
        maps = class_maps(ds.classes, [m for _, m in loaded])
        split = ds.test if args.split == "test" else ds.val
        if split is None:
            raise ConfigError(f"{ds.root} has no test split (test/ or val/ folder); pass --split val or data.root=PATH")
        if not len(split):
            raise ConfigError(f"the {args.split} split of {ds.root} holds no images; evaluate another split "
                              f"(--split) or data set (data.root=PATH)")
        models = [model_from_state(s, p).to(env.device) for (s, _), p in zip(loaded, args.checkpoint)]  # no DDP
        for m in models:
            stop_between_batches(m, env.world_size)
        interrupts.check()
        if args.cam:
            from emotion_dist.inference.cam import check_layer

            check_layer(models[0], args.cam_layer)  # a typo is one line before the evaluation, not after
        transform = BatchTransform(ds.channels, cfg.data.image_size, env.device, cfg.train.seed)
        if env.is_main:  # on stderr: with --json, stdout holds the report alone
            print(f"evaluating {len(split)} {args.split} images (TTA {args.tta}, {len(models)} model(s), "
                  f"{env.world_size} process(es))", file=sys.stderr, flush=True)
        evaluator = Evaluator(transform=transform, env=env, classes=ds.classes, batch_size=cfg.train.batch_size,
                              precision=cfg.train.precision)
        res, cm = evaluator.evaluate(models[0], split, tta=args.tta, extra_models=models[1:],
                                     class_maps=maps if any(m is not None for m in maps) else None)
        names = [str(c) for c in args.checkpoint]
        report = {REPORT_MARKER: "evaluate", "checkpoint": names[0] if len(names) == 1 else names,
                  "split": args.split, "data": ds.root, "tta": args.tta, "tta_from": tta_from,
                  "tta_views": tta.describe(args.tta, meta.data_size, cfg.data.image_size),
                  "models": len(models), "world_size": env.world_size, "loss": res["loss"],
                  **{k: res[k] for k in ("accuracy", "macro_f1", "count", "per_class")},
                  "confusion_matrix": cm.cpu().tolist()}
        if env.is_main:
            png = out_dir / f"confusion_{args.split}.png"
            plot_confusion(cm.cpu(), ds.classes, png, f"{args.split}: {Path(names[0]).name}"
                           + (f" + {len(names) - 1} more" if len(names) > 1 else ""))
            report["confusion_png"] = str(png)
            if args.cam:
                from emotion_dist.inference.cam import evaluate_cams

                cams = evaluate_cams(models[0], split, transform, ds.classes, per_class=args.cam,
                                     layer=args.cam_layer, out_dir=out_dir)
                report["cam"] = {"method": "Grad-CAM (torchcam)", "layer": args.cam_layer, "per_class": args.cam,
                                 "files": [str(c) for c in cams]}
            report = with_proof(report)  # printed and written alike; the proof lets a re-run replace the file
            to_stdout = args.json or args.json_out == "-"
            print_table(report, sys.stderr if to_stdout else sys.stdout)
            if to_stdout:
                print(json.dumps(report, indent=1), flush=True)
            if args.json_out and args.json_out != "-":
                atomic_write_json(Path(args.json_out), report)
        ok = True
        return 0
    finally:
        process_group.close_distributed(clean=ok)


def print_table(report: dict, file) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['split']} split: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
                    f"({report['count']} images; TTA {report['tta']}, {report['models']} model(s))")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="right")
    for name, m in report["per_class"].items():
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    Console(file=file, width=100).print(t)
