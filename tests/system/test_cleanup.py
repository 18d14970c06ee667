"""Stopping the test run (a CI timeout's SIGTERM, Ctrl-C) still stops the daemons a test started:
tests/slurm_cluster.py's register_cleanup, on a stand-in daemon (a `sleep` in its own session, as
slurmctld forks away from pytest). The Slurm cluster itself is not started here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

OWNER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    sys.path.insert(0, {tests!r})
    from slurm_cluster import register_cleanup

    daemon = subprocess.Popen(["sleep", "120"], start_new_session=True)  # not in our process group
    register_cleanup(lambda: os.kill(daemon.pid, signal.SIGTERM))
    print(daemon.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stopped_test_run_stops_the_daemons_it_started(sig):
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(tests=str(TESTS))], stdout=subprocess.PIPE,
                             text=True)
    daemon = int(owner.stdout.readline())
    try:
        assert _alive(daemon)
        owner.send_signal(sig)
        owner.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(daemon), f"the stand-in daemon outlived its owner stopped by {sig.name}"
        # the signal still did what it does: the owner ended by it (or, for SIGINT, KeyboardInterrupt)
        assert owner.returncode != 0
    finally:
        owner.kill()
        if _alive(daemon):
            os.kill(daemon, signal.SIGKILL)
