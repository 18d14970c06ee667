"""Checkpoint files: atomic writes (temp file + fsync + os.replace), keep the last N step
checkpoints plus last.pt and best.pt, load with weights_only=True, find the newest loadable."""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError
from .fsutil import atomic_write_bytes

log = logging.getLogger("emotion_dist")
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"step-(\d+)\.pt$")


def serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains pickled objects that are not plain tensors/containers and was "
                f"refused (weights_only=True); re-save it from emotion-dist or export its state_dict"
            ) from None
        raise CheckpointError(f"checkpoint {path} is unreadable ({str(e)[:80]}); it may be truncated") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); it may be truncated") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path} is not an emotion-dist checkpoint (no model_state_dict)")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this emotion-dist ({FORMAT_VERSION}); upgrade emotion-dist"
        )
    return state


def inference_weights(state: dict) -> dict:
    """The weights to evaluate, predict with and export: the EMA when training kept one."""
    return state.get("ema_state_dict") or state["model_state_dict"]


class Checkpointer:
    """Rank 0 writes; `checkpoints/step-XXXXXXXX.pt` (the last `keep`), `last.pt`, `best.pt`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def save(self, state: dict, step: int, is_best: bool = False) -> None:
        data = serialize({**state, "format_version": FORMAT_VERSION})
        atomic_write_bytes(self.dir / f"step-{step:08d}.pt", data)
        atomic_write_bytes(self.last, data)
        if is_best:
            atomic_write_bytes(self.best, data)
        steps = sorted(self._step_files(), key=lambda p: int(_STEP_RE.search(p.name).group(1)))
        for old in steps[: -self.keep]:
            old.unlink(missing_ok=True)

    def _step_files(self) -> list[Path]:
        return [p for p in self.dir.glob("step-*.pt") if _STEP_RE.search(p.name)] if self.dir.is_dir() else []

    def newest_loadable(self) -> Optional[tuple[Path, dict]]:
        """The newest checkpoint that loads, reading as few files as possible: last.pt unless a
        step file is newer (its name says so: a failed last.pt write leaves one behind) or it is
        unreadable; then step files newest first. Unreadable ones are skipped with a warning."""
        steps = sorted(self._step_files(), key=lambda p: -int(_STEP_RE.search(p.name).group(1)))
        last = self._try(self.last) if self.last.is_file() else None
        last_step = last[1].get("global_step", 0) if last else -1
        for path in steps:
            if int(_STEP_RE.search(path.name).group(1)) <= last_step:
                break
            found = self._try(path)
            if found:
                return found
        return last

    @staticmethod
    def _try(path: Path) -> Optional[tuple[Path, dict]]:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            return None
