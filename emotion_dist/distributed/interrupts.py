"""Stop signals for the whole process: SIGTERM (kill, torchrun, Slurm at the time limit), SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's preemption warning, `--signal=B:USR1@120`).

One handler from the start of a command to its end. The first signal only sets a flag, which each
phase reads at its safe points: the training loop at a step boundary (all ranks agree, rank 0
checkpoints), data preparation between images or chunks (`check()` raises Interrupted; temp files
are removed on the way out). SIGINT exits 130 after saving, the others 0 (`exit_code`). A second
signal means the user insists: the process ends at once with
the default action. Without this, USR1 would kill a process still preparing data (rc 138) and
Slurm would never requeue it.

The bound: a stop signal is acted on within one unit of work of the phase it arrives in (one
training step, one evaluation batch, one image or chunk of images, one video frame) and within
2 s of waiting (rendezvous, peers, the store). A call that cannot return to Python until it is done
(the process group's rendezvous, which torch retries in C++ for dist.timeout_s) runs inside
`stop_at_once`: a watcher thread that sees the signal while Python's own handler cannot run ends
the process with one line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from emotion_dist.errors import Interrupted, stop_exit_code

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


@contextmanager
def handlers_restored() -> Iterator[None]:
    """Around one command run in a process that goes on afterwards (a notebook, `cli.main` called
    from Python, a test worker): the handlers found on entry are put back and the stop flag cleared
    on exit, so one command's signal never stops the next."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        global _installed, _requested
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _installed, _requested = False, None


def uninstall() -> None:
    global _installed, _requested
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _installed, _requested = False, None


def exit_code(signame: Optional[str] = None) -> int:
    """The exit code of a command stopped by `signame` (default: the signal received)."""
    return stop_exit_code(signame or _requested)


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


@contextmanager
def stop_at_once(doing: str) -> Iterator[None]:
    """Around a blocking call that holds no state worth saving (joining the process group): a
    stop signal ends the process within milliseconds, printing one line, exit 0 (nothing was
    written, so a scheduler may requeue).

    Python runs signal handlers only between bytecodes of the main thread, so a rendezvous stuck in
    C++ would wait out its timeout. The C-level handler still writes the signal's number to the
    wakeup fd (signal.set_wakeup_fd), and torch releases the GIL while it retries, so a thread
    blocked on that fd sees the signal at once. Main thread only (Python's rule for the wakeup fd)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _requested is not None:  # a signal came before the call: do not start it
        raise Interrupted(_requested)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if done.is_set() or not data:
                return
            names = [signal.Signals(b).name for b in data if b in set(int(s) for s in STOP_SIGNALS)]
            if names:
                break
        try:
            print(f"stopped by {names[0]} while {doing}; nothing was written", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(0)

    watcher = threading.Thread(target=watch, name="emotion-dist stop watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        os.write(write_fd, b"\0")  # wake the watcher so that it returns
        watcher.join(timeout=1)
        os.close(write_fd)
        os.close(read_fd)
    check()  # a signal that came as the call returned
