"""The run-directory lease, with real processes: a second job refused with one
line, stale leases taken over (dead pid; no heartbeat, seen from another PID namespace), a restart
of the same job taking over its own lease, racing starts with exactly one winner, release."""

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, env_for_child

from emotion_dist.distributed.lease import LEASE_NAME, RunDirLease

HOLDER = str(ROOT / "tests" / "helpers" / "lease_holder.py")


def _env(**extra) -> dict:
    return env_for_child(PYTHONPATH=str(ROOT), **extra)


class Holder:
    """tests/helpers/lease_holder.py in a process of its own."""

    def __init__(self, run_dir, heartbeat_s=0.2, stale_s=30.0, prefix=(), **env):
        self.proc = subprocess.Popen([*prefix, sys.executable, HOLDER, str(run_dir), str(heartbeat_s), str(stale_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=_env(**env))
        self.line = self.proc.stdout.readline()
        self.held = self.line.startswith("held ")
        if not self.held:  # refused or failed: collect its output
            self.out, self.err = self.proc.communicate(timeout=60)
            self.rc = self.proc.returncode
        else:
            self.pid, self.token = int(self.line.split()[1]), self.line.split()[2]

    def release(self):
        self.out, self.err = self.proc.communicate("", timeout=60)
        self.rc = self.proc.returncode
        return self

    def kill(self, reap=True):
        self.proc.kill()
        if reap:
            self.proc.wait(timeout=60)
            return
        stat = Path(f"/proc/{self.proc.pid}/stat")  # dead but not yet reaped by its parent: a zombie
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)


def _record(run_dir) -> dict:
    return json.loads((Path(run_dir) / LEASE_NAME).read_text())


def test_second_job_is_refused_with_one_line_naming_holder_and_fix(tmp_path):
    first = Holder(tmp_path, SLURM_JOB_ID="111", SLURM_ARRAY_JOB_ID="110", SLURM_ARRAY_TASK_ID="1")
    assert first.held, first.line
    second = Holder(tmp_path, SLURM_JOB_ID="222")
    assert not second.held and second.rc == 2
    lines = second.err.strip().splitlines()
    assert len(lines) == 1, second.err
    line = lines[0]
    assert line.startswith(f"error: run.dir={tmp_path} is in use by another job: ")
    for part in (f"pid {first.pid}", "Slurm job 111 (array task 110_1)", "heartbeat ", "s ago",
                 "set run.dir to another folder", f"remove {tmp_path / LEASE_NAME}"):
        assert part in line, (part, line)
    assert _record(tmp_path)["token"] == first.token  # the refused job touched nothing

    # the same in-process, as rank 0 before its broadcast
    msg = RunDirLease(tmp_path, env={}).try_acquire()
    assert msg.startswith(f"run.dir={tmp_path} is in use") and "\n" not in msg
    assert first.release().rc == 0 and not (tmp_path / LEASE_NAME).exists()
    with RunDirLease(tmp_path, env={}) as lease:  # free again
        assert _record(tmp_path)["token"] == lease.me.token


def test_lease_of_a_dead_process_is_taken_over_at_once_with_a_warning(tmp_path, caplog):
    dead = Holder(tmp_path, heartbeat_s=10.0, stale_s=60.0)  # a fresh heartbeat: only the pid tells
    assert dead.held
    dead.kill(reap=False)  # a zombie still answers kill(pid, 0)
    with caplog.at_level(logging.WARNING, logger="emotion_dist"):
        with RunDirLease(tmp_path, env={}) as lease:
            assert _record(tmp_path)["token"] == lease.me.token
    assert "taking over a stale lease: host" in caplog.text and f"no process {dead.pid} on this host" in caplog.text
    assert not (tmp_path / LEASE_NAME).exists()
    dead.proc.wait(timeout=60)


def test_old_heartbeat_of_another_host_is_stale(tmp_path, caplog):
    dead = Holder(tmp_path)
    dead.kill()
    path = tmp_path / LEASE_NAME
    rec = _record(tmp_path)
    rec["host"] = "elsewhere"  # a holder whose pid cannot be checked from here: the heartbeat decides
    path.write_text(json.dumps(rec))
    assert "is in use" in RunDirLease(tmp_path, interval_s=0.2, stale_after_s=1.0, env={}).try_acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="emotion_dist"):
        assert RunDirLease(tmp_path, interval_s=0.2, stale_after_s=1.0, env={}).try_acquire() is None
    assert "host elsewhere" in caplog.text and "has not beaten for 100 s" in caplog.text


def test_a_taker_killed_between_claim_and_rename_does_not_block_the_lease(tmp_path, caplog):
    dead = Holder(tmp_path / "run")
    dead.kill()
    token = _record(tmp_path / "run")["token"]
    taker = Holder(tmp_path / "elsewhere")  # its record, left as the claim on the dead lease
    taker.kill()
    claim = tmp_path / "run" / f".{LEASE_NAME}.takeover.{token}"
    shutil.copy(tmp_path / "elsewhere" / LEASE_NAME, claim)
    old = time.time() - 100
    os.utime(claim, (old, old))
    with caplog.at_level(logging.WARNING, logger="emotion_dist"):
        with RunDirLease(tmp_path / "run", env={}) as lease:
            assert _record(tmp_path / "run")["token"] == lease.me.token
    assert f"no process {dead.pid}" in caplog.text
    assert not list((tmp_path / "run").iterdir())  # the dead claim and ours are gone with the lease


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -p (root or user namespaces)")
def test_other_pid_namespace_trusts_the_heartbeat_not_the_pid(tmp_path):
    """Seen from another PID namespace on the same host (two torchrun agents, each in a namespace of
    its own), the holder's pid does not exist: a pid check would call a live job dead. Only the heartbeat counts:
    a live holder is refused to another job and to a second launch of its own job; once it is
    SIGKILLed, a restart of its job takes over as soon as the beats stop, before the staleness."""
    other_ns = ("unshare", "-p", "-f", "--mount-proc", "--kill-child")
    job = {"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "0"}
    holder = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, **job)
    assert holder.held
    other = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, prefix=other_ns)
    assert other.rc == 2 and "in use by another job" in other.err and f"pid {holder.pid}" in other.err, other.err
    twin = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, prefix=other_ns, **job)
    assert twin.rc == 2 and "in use by another live process of this same job" in twin.err, twin.err
    holder.kill()
    other = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, prefix=other_ns)
    assert other.rc == 2 and "in use by another job" in other.err, other.err  # not stale yet
    restart = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, prefix=other_ns,
                     **{**job, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert restart.held, restart.err
    restart.release()
    assert restart.rc == 0 and "taking over the lease of this job's earlier run" in restart.err
    assert "stopped beating" in restart.err and not (tmp_path / LEASE_NAME).exists()


@pytest.mark.parametrize("job, restart", [
    ({"SLURM_JOB_ID": "77"}, {"SLURM_RESTART_COUNT": "1"}),  # scontrol requeue
    ({"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "0"}, {"TORCHELASTIC_RESTART_COUNT": "1"}),
])
def test_restart_of_the_same_job_takes_over_its_lease_without_waiting(tmp_path, job, restart):
    first = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, **job)
    assert first.held
    for env in (job, {**job, **restart}):  # alive on this host: a second launch, or an earlier run still going
        again = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, **env)
        assert again.rc == 2 and "in use by another live process of this same job" in again.err, again.err
    first.kill()
    # as if it ran on a node that was lost: its heartbeat is fresh and its pid cannot be checked
    path = tmp_path / LEASE_NAME
    rec = _record(tmp_path)
    rec["host"] = "node2"
    path.write_text(json.dumps(rec))
    other = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0)
    assert other.rc == 2 and "in use by another job" in other.err, other.err
    second = Holder(tmp_path, heartbeat_s=0.2, stale_s=60.0, **{**job, **restart})
    assert second.held, second.err
    assert _record(tmp_path)["token"] == second.token
    second.release()
    assert second.rc == 0 and "taking over the lease of this job's earlier run: host node2" in second.err
    assert not path.exists()


def test_frozen_holder_finds_its_lease_taken_and_never_deletes_the_new_one(tmp_path, caplog):
    first = Holder(tmp_path, heartbeat_s=0.2, stale_s=1.0)
    assert first.held
    os.kill(first.pid, signal.SIGSTOP)  # a paused VM, a process stuck longer than the staleness
    path = tmp_path / LEASE_NAME
    while time.time() - path.stat().st_mtime <= 1.5:
        time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="emotion_dist"):
        second = RunDirLease(tmp_path, interval_s=0.2, stale_after_s=1.0, env={}).acquire()
    assert "has not beaten for" in caplog.text
    os.kill(first.pid, signal.SIGCONT)
    first.release()
    assert first.rc == 0 and f"lost: lost the lease on run.dir={tmp_path}: it is now held by host" in first.out
    assert _record(tmp_path)["token"] == second.me.token
    second.release()
    assert not path.exists()


def _race(run_dir, barrier, done, results, die):
    lease = RunDirLease(run_dir, interval_s=0.2, stale_after_s=30.0, env={})
    barrier.wait()
    msg = lease.try_acquire()
    results.put((os.getpid(), msg))
    results.close()
    results.join_thread()  # flushed before a winner's os._exit below
    done.wait()
    if msg is None and die:
        os._exit(0)  # killed while holding: the next round races to take the stale lease over
    lease.release()


def test_racing_starts_end_with_exactly_one_holder(tmp_path):
    """Rounds of 6 processes released by one barrier: round 0 races to create the lease, later
    rounds to take over the lease of the previous round's winner, which died holding it."""
    ctx = multiprocessing.get_context("fork")
    n, rounds = 6, 4
    for r in range(rounds):
        barrier, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(tmp_path, barrier, done, results, r < rounds - 1)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        winners = [pid for pid, msg in got if msg is None]
        assert len(winners) == 1, got
        for _pid, msg in got:
            if msg is not None:
                assert msg.startswith(f"run.dir={tmp_path} is in use by another job") and f"pid {winners[0]}," in msg
        if r < rounds - 1:
            assert _record(tmp_path)["pid"] == winners[0]  # left behind by a dead holder
    assert not (tmp_path / LEASE_NAME).exists()  # the last winner released it
    assert not [p for p in tmp_path.iterdir()]  # no claim or temp file left
