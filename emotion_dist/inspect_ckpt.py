"""`emotion-dist ckpt inspect PATH`: a checkpoint's metadata, and how a config differs from the one
it was trained with (by default the checkpoint's own config with your overrides on top)."""

from __future__ import annotations

from .checkpoint import load_checkpoint, read_meta
from .config import apply_overrides, config_from_dict, load_config, validate


def inspect(path: str, config_path: str | None, overrides: list[str]) -> int:
    state = load_checkpoint(path)
    meta = read_meta(state, path)
    sampler = state.get("sampler", {})
    lines = [
        f"checkpoint      {path}",
        f"format version  {meta.format_version}",
        f"epoch           {state.get('epoch', '?')} done, {sampler.get('consumed', 0)}/{sampler.get('n', '?')} samples into the next",
        f"global step     {state.get('global_step', '?')}",
        f"world size      {meta.world_size}   strategy {meta.strategy}   nodes {meta.num_nodes}",
        f"classes         {', '.join(meta.classes)}",
        f"image size      {meta.image_size}   channels {meta.in_channels}   label mode {meta.label_mode}",
        f"best val macro-F1 {state.get('best_metric', float('nan')):.4f} (epoch {state.get('best_epoch')})",
        f"last loss       {state.get('loss', float('nan')):.4f}",
        f"parameters      {sum(v.numel() for k, v in state['model_state_dict'].items() if 'running' not in k and 'num_batches' not in k):,}",
    ]
    if meta.run_id:
        lines.append(f"run id          {meta.run_id}")
    if "ema_state_dict" in state:
        decay = meta.config.get("train", {}).get("ema_decay")
        lines.append(f"EMA             decay {decay}, {state['ema_updates']} updates (evaluate/predict/export use it)")
    if state.get("history"):
        h = state["history"][-1]
        lines.append(f"last epoch      val accuracy {h.get('val_accuracy', float('nan')):.4f}  "
                     f"val macro-F1 {h.get('val_macro_f1', float('nan')):.4f}")
    print("\n".join(lines))
    saved = config_from_dict(meta.config)
    if config_path:
        current, _ = load_config(config_path, [*overrides, "run.resume=never"])
    else:  # the run's own config, changed by the overrides given
        current = config_from_dict(meta.config)
        apply_overrides(current, [*overrides, "run.resume=never", "model.init_from=null"])
        validate(current)
    saved, current = saved.flat(), current.flat()
    diff = [(k, saved[k], current[k]) for k in saved if saved[k] != current[k] and k not in ("run.resume", "model.init_from")]
    print("config diff (checkpoint -> current):" if diff else "config: same as the checkpoint's")
    for k, a, b in diff:
        print(f"  {k}: {a!r} -> {b!r}")
    return 0
