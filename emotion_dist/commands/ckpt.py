"""`emotion-dist ckpt inspect PATH`: the way to check a checkpoint someone sent you. It checks the
whole file as every command that loads it does (modelio.checkpoint_findings: metadata, tensor types
and shapes against EmotionNet, NaN/inf) and lists every problem, one line each, exit 2; a sound file
gets its metadata and how a config differs from the one it was trained with (by default the
checkpoint's own config with your overrides on top). --json: the same as one JSON document."""

from __future__ import annotations

import sys

from emotion_dist.config import apply_overrides, config_diff, config_from_dict, load_config, validate
from emotion_dist.errors import EXIT_USAGE
from emotion_dist.modelio import checkpoint_findings, load_checkpoint, read_meta
from emotion_dist.utils.output import MARKER, check_json_out, emit, text_stream


def describe(path: str, config_path: str | None, overrides: list[str], state: dict | None = None) -> dict:
    """The checkpoint's metadata and the config diff (checkpoint -> current), as one JSON-able dict."""
    state = load_checkpoint(path) if state is None else state
    meta = read_meta(state, path)
    sampler = state.get("sampler") if isinstance(state.get("sampler"), dict) else {}
    saved = config_from_dict(meta.config)
    if config_path:
        current, _ = load_config(config_path, [*overrides, "run.resume=never"])
    else:  # the run's own config, changed by the overrides given
        current = config_from_dict(meta.config)
        apply_overrides(current, [*overrides, "run.resume=never", "model.init_from=null"])
        validate(current)
    train = meta.config.get("train") if isinstance(meta.config.get("train"), dict) else {}
    history = state.get("history")
    last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], dict) else {}
    return {
        MARKER: "ckpt inspect", "checkpoint": str(path), "format_version": meta.format_version,
        "epoch": state.get("epoch"), "samples_into_next_epoch": sampler.get("consumed", 0),
        "samples_per_epoch": sampler.get("n"), "global_step": state.get("global_step"),
        "world_size": meta.world_size, "strategy": meta.strategy, "nodes": meta.num_nodes,
        "classes": meta.classes, "image_size": meta.image_size, "in_channels": meta.in_channels,
        "label_mode": meta.label_mode, "best_val_macro_f1": state.get("best_metric"),
        "best_epoch": state.get("best_epoch"), "last_loss": state.get("loss"),
        "parameters": sum(v.numel() for k, v in state["model_state_dict"].items()
                          if "running" not in k and "num_batches" not in k),
        "run_id": meta.run_id,
        "ema": {"decay": train.get("ema_decay"), "updates": state.get("ema_updates")}
        if state.get("ema_state_dict") else None,
        "last_epoch": {k: last.get(k) for k in ("val_accuracy", "val_macro_f1")} if last else None,
        "config_diff": [{"key": k, "checkpoint": a, "current": b} for k, a, b in config_diff(saved, current)],
        "checked": f"metadata, {len(state['model_state_dict'])} tensors fit EmotionNet(in_channels={meta.in_channels}, "
                   f"{len(meta.classes)} classes){' (and the EMA)' if state.get('ema_state_dict') else ''}, "
                   f"all finite",
        "problems": [],
    }


def _f(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "nan" if value is None else repr(value)


def print_description(d: dict, file) -> None:
    lines = [
        f"checkpoint      {d['checkpoint']}",
        f"format version  {d['format_version']}",
        f"epoch           {d['epoch'] if d['epoch'] is not None else '?'} done, {d['samples_into_next_epoch']}/"
        f"{d['samples_per_epoch'] or '?'} samples into the next",
        f"global step     {d['global_step'] if d['global_step'] is not None else '?'}",
        f"world size      {d['world_size']}   strategy {d['strategy']}   nodes {d['nodes']}",
        f"classes         {', '.join(d['classes'])}",
        f"image size      {d['image_size']}   channels {d['in_channels']}   label mode {d['label_mode']}",
        f"best val macro-F1 {_f(d['best_val_macro_f1'])} (epoch {d['best_epoch']})",
        f"last loss       {_f(d['last_loss'])}",
        f"parameters      {d['parameters']:,}",
        f"checked         {d['checked']}",
    ]
    if d["run_id"]:
        lines.append(f"run id          {d['run_id']}")
    if d["ema"]:
        lines.append(f"EMA             decay {d['ema']['decay']}, {d['ema']['updates']} updates "
                     f"(evaluate/predict/export use it)")
    if d["last_epoch"]:
        lines.append(f"last epoch      val accuracy {_f(d['last_epoch']['val_accuracy'])}  "
                     f"val macro-F1 {_f(d['last_epoch']['val_macro_f1'])}")
    diff = d["config_diff"]
    lines.append("config diff (checkpoint -> current):" if diff else "config: same as the checkpoint's")
    lines += [f"  {c['key']}: {c['checkpoint']!r} -> {c['current']!r}" for c in diff]
    print("\n".join(lines), file=file, flush=True)


def inspect(args) -> int:
    """Exit 0 with the description, or 2 with every problem found (one line each on stderr)."""
    check_json_out(args, inputs=[args.path])
    state = load_checkpoint(args.path)
    problems = checkpoint_findings(state, args.path)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr, flush=True)
        emit(args, {MARKER: "ckpt inspect", "checkpoint": str(args.path), "problems": problems})
        return EXIT_USAGE
    d = describe(args.path, args.config, args.overrides, state=state)
    print_description(d, text_stream(args))
    emit(args, d)
    return 0
