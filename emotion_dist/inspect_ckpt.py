"""`emotion-dist ckpt inspect PATH`: a checkpoint's metadata and its config diff."""

from __future__ import annotations

from .checkpoint import load_checkpoint
from .config import config_from_dict, load_config


def inspect(path: str, config_path: str | None, overrides: list[str]) -> int:
    state = load_checkpoint(path)
    sampler = state.get("sampler", {})
    lines = [
        f"checkpoint      {path}",
        f"format version  {state.get('format_version')}",
        f"epoch           {state['epoch']} done, {sampler.get('consumed', 0)}/{sampler.get('n', '?')} samples into the next",
        f"global step     {state['global_step']}",
        f"world size      {state.get('world_size')}   strategy {state.get('strategy')}",
        f"classes         {', '.join(state.get('class_names', []))}",
        f"image size      {state.get('image_size')}   channels {state.get('in_channels')}",
        f"best val macro-F1 {state.get('best_metric', float('nan')):.4f} (epoch {state.get('best_epoch')})",
        f"last loss       {state.get('loss', float('nan')):.4f}",
        f"parameters      {sum(v.numel() for k, v in state['model_state_dict'].items() if 'running' not in k and 'num_batches' not in k):,}",
    ]
    if "ema_state_dict" in state:
        decay = state.get("config", {}).get("train", {}).get("ema_decay")
        lines.append(f"EMA             decay {decay}, {state['ema_updates']} updates (evaluate/predict/export use it)")
    if state.get("history"):
        h = state["history"][-1]
        lines.append(f"last epoch      val accuracy {h.get('val_accuracy', float('nan')):.4f}  "
                     f"val macro-F1 {h.get('val_macro_f1', float('nan')):.4f}")
    print("\n".join(lines))
    saved = config_from_dict(state.get("config", {})).flat()
    current, _ = load_config(config_path, [*overrides, "run.resume=never"])
    current = current.flat()
    diff = [(k, saved[k], current[k]) for k in saved if saved[k] != current[k] and k != "run.resume"]
    print("config diff (checkpoint -> current):" if diff else "config: same as the current one")
    for k, a, b in diff:
        print(f"  {k}: {a!r} -> {b!r}")
    return 0
