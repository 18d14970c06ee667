"""The run-directory lease's decisions, in-process: bad settings and a foreign lease file are one
line; the heartbeat advances and the lease is released on an exception."""

import json
import time
from pathlib import Path

import pytest
from conftest import ROOT

from emotion_dist.distributed.lease import LEASE_NAME, RunDirBusy, RunDirLease
from emotion_dist.errors import ConfigError

HOLDER = str(ROOT / "tests" / "helpers" / "lease_holder.py")


def _record(run_dir) -> dict:
    return json.loads((Path(run_dir) / LEASE_NAME).read_text())






def test_heartbeat_advances_and_release_on_exception(tmp_path):
    path = tmp_path / LEASE_NAME
    with pytest.raises(RuntimeError, match="boom"):
        with RunDirLease(tmp_path, interval_s=0.05, stale_after_s=1.0, env={}) as lease:
            first = path.stat().st_mtime_ns
            deadline = time.monotonic() + 30
            while path.stat().st_mtime_ns == first and time.monotonic() < deadline:
                time.sleep(0.02)
            assert path.stat().st_mtime_ns > first  # the daemon thread refreshed it
            raise RuntimeError("boom")
    assert not path.exists() and not lease.held
    assert lease._thread is None


def test_bad_settings_and_a_foreign_lease_file_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="run.lease_stale_s=1.0 must be at least 3 heartbeats"):
        RunDirLease(tmp_path, interval_s=1.0, stale_after_s=1.0)
    with pytest.raises(ConfigError, match="must be a positive number"):
        RunDirLease(tmp_path, interval_s=float("nan"))
    (tmp_path / LEASE_NAME).write_text("my notes\n")
    with pytest.raises(ConfigError, match="is not a lease emotion-dist wrote"):
        RunDirLease(tmp_path, env={}).acquire()
    assert (tmp_path / LEASE_NAME).read_text() == "my notes\n"
    assert issubclass(RunDirBusy, ConfigError)  # exit code 2 wherever ConfigError is handled
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in RunDirLease(tmp_path / "file", env={}).try_acquire()
