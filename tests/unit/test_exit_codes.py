"""The one mapping from an error to an exit code, which cli.main and the train command both return
through: 2 for input the user can fix, 1 for a failed run, 130 for Ctrl-C, 0 for a scheduler's
stop signal (so Slurm requeues and torchrun restarts)."""

import pytest

from emotion_dist import errors
from emotion_dist.distributed import interrupts


@pytest.mark.parametrize("error, code", [
    (errors.ConfigError("bad key"), 2),
    (errors.CheckpointError("bad file"), 2),
    (errors.DataError("bad rows"), 2),
    (errors.LaunchError("bad MASTER_ADDR"), 2),
    (errors.TrainingAborted("too many bad steps"), 1),
    (RuntimeError("a bug"), 1),
    (errors.Interrupted("SIGINT"), 130),
    (errors.Interrupted("SIGTERM"), 0),
    (errors.Interrupted("SIGUSR1"), 0),
    (KeyboardInterrupt(), 130),
])
def test_each_error_maps_to_its_exit_code(error, code):
    assert errors.exit_code_for(error) == code


def test_the_signal_exit_code_is_the_same_mapping():
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        assert interrupts.exit_code(name) == errors.exit_code_for(errors.Interrupted(name))


def test_cli_main_returns_the_mapped_code_for_a_bad_input(capsys):
    from emotion_dist import cli

    assert cli.main(["train", "train.epochs=zero", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.epochs" in err and "\n" not in err
