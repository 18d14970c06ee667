"""Stop signals for the whole process: SIGTERM (kill, torchrun, Slurm at the time limit), SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's preemption warning, `--signal=B:USR1@120`).

One handler from the start of a command to its end. The first signal only sets a flag, which each
phase reads at its safe points: the training loop at a step boundary (all ranks agree, rank 0
checkpoints), data preparation between images or chunks (`check()` raises Interrupted; temp files
are removed on the way out). SIGINT exits 130 after saving, the others 0 (`exit_code`). A second signal means the user insists: the process ends at once with
the default action. Without this, USR1 would kill a process still preparing data (rc 138) and
Slurm would never requeue it.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from emotion_dist.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_requested: Optional[str] = None
_installed = False


def _handler(signum, frame) -> None:
    global _requested
    if _requested is not None:  # a second signal: leave now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _requested = signal.Signals(signum).name


def install() -> None:
    """Idempotent; main thread only (Python's rule for signal handlers)."""
    global _installed
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    _installed = True


def uninstall() -> None:
    global _installed, _requested
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _installed, _requested = False, None


# Ctrl-C at a terminal is a person stopping the command: the shell's convention (128 + SIGINT) tells
# `train && export` not to go on. A scheduler's signal (SIGTERM at the time limit, SIGUSR1 before
# preemption) keeps 0, so Slurm's requeue and torchrun's restarts treat the saved state as resumable.
INTERACTIVE_EXIT = 128 + signal.SIGINT


def exit_code(signame: Optional[str] = None) -> int:
    """The exit code of a command stopped by `signame` (default: the signal received)."""
    signame = signame or _requested
    return INTERACTIVE_EXIT if signame == "SIGINT" else 0


def requested() -> Optional[str]:
    """The name of the first stop signal received (SIGTERM, ...), or None."""
    return _requested


def request(name: str = "SIGTERM") -> None:
    """Ask for a stop from inside the process (as a signal would)."""
    global _requested
    _requested = _requested or name


def clear() -> None:
    global _requested
    _requested = None


def check() -> None:
    """Raise Interrupted at a safe point if a stop signal arrived."""
    if _requested is not None:
        raise Interrupted(_requested)
