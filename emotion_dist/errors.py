"""The errors a user sees, and the exit codes they map to. A leaf module: it imports nothing of
the package, so every module (config, checkpoint, data, the commands) can raise these.

- UserError (and its kinds ConfigError, CheckpointError, DataError, LaunchError): bad input that
  the user can fix. One line on stderr naming the fix, exit code 2.
- TrainingAborted: training stopped on purpose (non-finite steps, a failed checkpoint write, a lost
  peer). One line, exit code 1; what was written stays.
- Interrupted: a stop signal (SIGTERM, SIGINT, SIGUSR1) arrived outside the training loop (data
  preparation, download, cache build); temp files are gone, exit code 0 so schedulers requeue, 130
  for Ctrl-C.

`exit_code_for` is the one mapping from these to exit codes; every command returns through it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # training failed or was aborted; nothing already written is lost
EXIT_USAGE = 2  # bad input: config, data, checkpoint, launch environment, output path
# Ctrl-C at a terminal is a person stopping the command: the shell's convention (128 + SIGINT) tells
# `train && export` not to go on. A scheduler's signal (SIGTERM at the time limit, SIGUSR1 before
# preemption) keeps 0, so Slurm's requeue and torchrun's restarts treat the saved state as resumable.
EXIT_INTERACTIVE_STOP = 130


def one_line(message: str) -> str:
    """A message quoting user input (a key with a line break, a file name) stays one line."""
    return "\\n".join(str(message).splitlines())


class UserError(ValueError):
    """Bad user input: one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class ConfigError(UserError):
    """A config key or value, or anything the config points at."""


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, unreadable, foreign or does not fit."""


class DataError(ConfigError):
    """A data set that cannot be read as asked (layout, classes, CSV format, changed on resume)."""


class LaunchError(ConfigError):
    """The launch environment (RANK/WORLD_SIZE/MASTER_*, devices, ports, peers)."""


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many bad steps, checkpoint write failure, a lost peer)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class Interrupted(BaseException):
    """A stop signal outside the training loop. BaseException, like KeyboardInterrupt, so generic
    `except Exception` handlers (a corrupt image, a failed decode) never swallow it."""

    def __init__(self, signame: str = "a stop signal"):
        super().__init__(signame)
        self.signame = signame


def stop_exit_code(signame: str | None) -> int:
    """The exit code of a command stopped by the signal `signame` ("SIGINT", "SIGTERM", ...)."""
    return EXIT_INTERACTIVE_STOP if signame == "SIGINT" else EXIT_OK


def exit_code_for(error: BaseException) -> int:
    """The exit code a command ends with after `error`: 2 for input the user can fix, 1 for a run
    that failed, 130 for Ctrl-C, 0 for a scheduler's stop signal (the saved state resumes)."""
    if isinstance(error, UserError):
        return EXIT_USAGE
    if isinstance(error, Interrupted):
        return stop_exit_code(error.signame)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERACTIVE_STOP
    return EXIT_FAILURE
