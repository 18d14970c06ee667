"""Hooks for proving the harness's promises in real processes: fault injection
(EMOTION_DIST_FAULT), phase markers and slowed evaluation (EMOTION_DIST_PHASE_FILE,
EMOTION_DIST_EVAL_DELAY_S: a test sends a real signal in a known phase) and the sample-id audit log
(`log.sample_ids=true`)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np


def inject_fault(rank: int, step: int) -> bool:
    """Test hook for real failures in real processes: EMOTION_DIST_FAULT=RANK:STEP:KIND, KIND one of
    raise | kill (SIGKILL itself) | hang | nan (poison the loss from STEP on) | nan1 (at STEP only) |
    SIGINT, SIGTERM or SIGUSR1 (the process sends itself that signal, as Ctrl-C or a scheduler would).
    EMOTION_DIST_FAULT_ONCE=FILE makes it fire once (the file records that it did). Returns True
    when this step's loss is to be poisoned."""
    spec = os.environ.get("EMOTION_DIST_FAULT")
    if not spec:
        return False
    f_rank, f_step, kind = spec.split(":")
    if int(f_rank) != rank or step < int(f_step) or (kind != "nan" and step != int(f_step)):
        return False
    if kind in ("nan", "nan1"):  # nan: from STEP on; nan1: at STEP only
        return True
    once = os.environ.get("EMOTION_DIST_FAULT_ONCE")
    if once and Path(once).exists():
        return False
    if once:
        Path(once).write_text(spec)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(10**6)
    if kind in ("SIGINT", "SIGTERM", "SIGUSR1"):
        os.kill(os.getpid(), getattr(signal, kind))
    return False


def entered_phase(name: str) -> None:
    """EMOTION_DIST_PHASE_FILE=FILE: append the phase the run enters (validation, test pass)."""
    path = os.environ.get("EMOTION_DIST_PHASE_FILE")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


def evaluation_batch() -> None:
    """EMOTION_DIST_EVAL_DELAY_S=SECONDS: each evaluation batch takes at least that long; with
    EMOTION_DIST_PHASE_FILE each is also marked there (`eval batch`), so a test counts the batches
    run after its signal."""
    entered_phase("eval batch")
    delay = os.environ.get("EMOTION_DIST_EVAL_DELAY_S")
    if delay:
        time.sleep(float(delay))


class SampleIdLog:
    """Each rank appends the dataset indices of the real samples of every step it trains to
    `sample_ids.rankN.jsonl`: the proof that an epoch saw every sample exactly once across stops,
    resumes and world-size changes."""

    def __init__(self, run_dir: Path, rank: int, index: np.ndarray):
        self.path = Path(run_dir) / f"sample_ids.rank{rank}.jsonl"
        self.index = index

    def record(self, epoch: int, step: int, positions) -> None:
        ids = self.index[np.asarray(positions)].tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")
