"""Exit paths that need a real process: a busy run directory under a real two-process torchrun
(every rank ends with the same one line and exit 2), and a real full disk (a tmpfs) while the
synthetic faces are generated (one line naming the folder and the space, nothing left behind)."""

import os
import re

import pytest
from conftest import cli_cmd, mounted_tmpfs, run, torchrun_cmd

from emotion_dist.distributed.lease import LEASE_NAME, RunDirLease


def test_a_busy_run_dir_under_torchrun_is_one_line_and_exit_2_on_every_rank(tmp_path, fast_overrides):
    run_dir = tmp_path / "run"
    with RunDirLease(run_dir, env={}) as holder:  # another live job (this test's process) holds the run directory
        proc = run(torchrun_cmd(2, *fast_overrides, f"run.dir={run_dir}"), check=False)
        lease = (run_dir / LEASE_NAME).read_text()
        left = sorted(os.listdir(run_dir))
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert sorted(line.split("]")[0] for line in errors) == ["error: [rank 0", "error: [rank 1"], proc.stderr[-3000:]
    assert len({line.split("] ", 1)[1] for line in errors}) == 1  # the same line on each rank
    assert f"run.dir={run_dir} is in use by another job: " in errors[0]
    assert "rank 0 failed" not in proc.stderr
    # the ranks' own tracebacks are gone; what remains is torchrun's summary of their exit codes
    assert proc.stderr.count("Traceback") <= 1 and "emotion_dist" not in proc.stderr.split("Traceback")[-1]
    # torchrun's summary: the first rank to exit reports 2; the agent then stops the other at once
    # (SIGTERM), unless it had exited with its own 2 in the same instant
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", proc.stderr))
    assert set(codes) == {"0", "1"} and "2" in codes.values() and set(codes.values()) <= {"2", "-15"}, \
        proc.stderr[-3000:]
    assert proc.returncode != 0
    assert left == [LEASE_NAME] and holder.me.token in lease  # the holder's lease, untouched


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path, "1m")


def test_a_full_disk_while_generating_synthetic_faces_is_one_line_naming_folder_and_space(tiny_disk):
    proc = run(cli_cmd("data", "synthetic", "--out", str(tiny_disk / "syn"), "--train", "700", "--test", "70"),
               check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on device while writing the synthetic faces in {tiny_disk} "
                               f"(about 3.2 MB for 770 images, "), lines[0]
    assert "MB free); free space, or generate them on a larger disk" in lines[0]
    assert os.listdir(tiny_disk) == []  # the temp folder is gone
