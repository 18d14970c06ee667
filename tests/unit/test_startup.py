"""Start-up before the process group exists: an unresolvable MASTER_ADDR is one line naming it
(not torch's warning a second for dist.timeout_s), and an error rank 0 decides reaches every rank
as the same one-line error class (a busy run directory: ConfigError, exit 2 everywhere)."""

import pytest

from emotion_dist import errors
from emotion_dist.distributed import interrupts, process_group
from emotion_dist.distributed.lease import RunDirBusy
from emotion_dist.distributed.process_group import LaunchInfo, _error_box, _raise_box, wait_for_master_addr


def _info(addr: str) -> LaunchInfo:
    return LaunchInfo("torchrun", 1, 2, 0, addr, 29500)


def test_an_unresolvable_master_addr_is_one_line_naming_it(capsys):
    with pytest.raises(errors.LaunchError) as e:
        wait_for_master_addr(_info("no-such-host.invalid"), timeout_s=0)
    msg = str(e.value)
    assert msg.startswith("MASTER_ADDR=no-such-host.invalid does not resolve") and "set MASTER_ADDR" in msg
    assert "\n" not in msg


def test_a_resolvable_master_addr_passes_at_once():
    wait_for_master_addr(_info("127.0.0.1"), timeout_s=0)


def test_a_stop_signal_while_waiting_for_master_addr_ends_the_wait(monkeypatch):
    monkeypatch.setattr(process_group, "RESOLVE_RETRY_S", 0.01)
    interrupts.request("SIGUSR1")
    try:
        with pytest.raises(errors.Interrupted):
            wait_for_master_addr(_info("no-such-host.invalid"), timeout_s=60)
    finally:
        interrupts.clear()


@pytest.mark.parametrize("error, cls", [
    (RunDirBusy("run.dir=/r is in use by job 7 on node1 (pid 42)"), errors.ConfigError),
    (errors.DataError("bad data"), errors.DataError),
    (errors.TrainingAborted("too many bad steps"), errors.TrainingAborted),
])
def test_rank0s_error_reaches_the_other_ranks_as_the_same_one_line_error(error, cls):
    box = _error_box(error)
    with pytest.raises(cls) as e:
        _raise_box(box)
    assert type(e.value) is cls and str(e.value) == str(error)


def test_an_unexpected_error_still_names_rank_0():
    with pytest.raises(RuntimeError, match="rank 0 failed: KeyError"):
        _raise_box(_error_box(KeyError("x")))


def test_a_command_run_in_process_leaves_no_stop_flag_and_its_callers_handlers():
    """cli.main in a process that goes on (a notebook, a test worker): the signal one command took
    neither stops the next command nor replaces the caller's Ctrl-C handler."""
    import signal

    from emotion_dist import cli

    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["config", "keys"]) == 0  # a command that installs nothing
    with interrupts.handlers_restored():
        interrupts.install()
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, taken by the command's handler
        assert interrupts.requested() == "SIGINT"
    assert interrupts.requested() is None
    assert signal.getsignal(signal.SIGINT) is before
