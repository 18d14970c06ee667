"""sbatch of the project's own scripts on a real single-node Slurm cluster (CPU, gloo)."""

import json
import os
import sys
import time

import pytest

from emotion_dist.checkpoint import load_checkpoint
from conftest import ROOT
from slurm_cluster import Cluster, available

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        print(f"skipping Slurm tests: {reason}")
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def _submit(cluster, tmp_path, name, *overrides, script="slurm/train.sbatch", tasks=2, extra=()):
    out = tmp_path / f"{name}.out"
    env = {"CONFIG": "configs/default.yaml", "PYTHON": sys.executable, "RUN_DIR": str(tmp_path / name), "GPUS_PER_NODE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    jid = cluster.sbatch(f"--job-name={name}", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--output={out}", *extra, script, *overrides, env=env, cwd=ROOT)
    return jid, out, tmp_path / name


def test_sbatch_two_tasks_completes(cluster, tmp_path, fast_overrides):
    jid, out, run_dir = _submit(cluster, tmp_path, "two", *fast_overrides[:-2], "train.epochs=1")
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "launcher slurm | world size 2 | backend gloo" in log
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 1 and len(state["rng_states"]) == 2
    assert len([l for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]) >= 1


def test_preemption_saves_requeues_and_resumes(cluster, tmp_path, fast_overrides):
    jid, out, run_dir = _submit(cluster, tmp_path, "preempt", *fast_overrides[:-2], "train.epochs=2",
                                "ckpt.every_steps=3", "log.sample_ids=true")
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("step-*.pt")):
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        assert cluster.job(jid)["JobState"] in ("PENDING", "RUNNING"), out.read_text()[-3000:]
        time.sleep(0.2)
    assert cluster.run("scancel", "--signal=USR1", "--batch", str(jid)).returncode == 0
    cluster.wait(jid, until=lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING", timeout=120)
    stopped = load_checkpoint(ckpts / "last.pt")
    # Release the requeued job early (Slurm would hold it ~2 min), but not within the second its
    # old credential was revoked: slurmd compares whole seconds and would refuse the relaunch
    # ("Job credential revoked"), failing the job.
    deadline = time.monotonic() + 60
    while cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    assert cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now").returncode == 0
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and "stop requested: saving at step" in log
    assert f"resumed from {ckpts / 'last.pt'}: epoch {stopped['epoch'] + 1}, step {stopped['global_step']}" in log
    final = load_checkpoint(ckpts / "last.pt")
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    for epoch in (0, 1):  # every sample of every epoch exactly once, the interrupted one included
        ids = [i for f in run_dir.glob("sample_ids.rank*.jsonl")
               for r in map(json.loads, f.read_text().splitlines()) if r["epoch"] == epoch for i in r["ids"]]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == stopped["sampler"]["n"]


def test_bad_config_fails_with_one_line(cluster, tmp_path):
    jid, out, _ = _submit(cluster, tmp_path, "bad", "train.lr=-1", tasks=1)
    info = cluster.wait(jid)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"].split(":")[0] != "0"
    errors = [l for l in out.read_text().splitlines() if l.startswith("error:")]
    assert errors == ["error: train.lr=-1.0 must be > 0"]


def test_multinode_script_runs_torchrun_under_srun(cluster, tmp_path, fast_overrides):
    jid, out, run_dir = _submit(cluster, tmp_path, "mn", *fast_overrides[:-2], "train.epochs=1",
                                script="slurm/multinode.sbatch", tasks=1, extra=("--nodes=1", "--cpus-per-task=2"))
    # one node here; GPUS_PER_NODE=2 processes on CPU
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "world size 2 | backend gloo" in log
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["world_size"] == 2


def test_multinode_script_accelerate_variant(cluster, tmp_path, fast_overrides):
    jid, out, run_dir = _submit(cluster, tmp_path, "mnacc", *fast_overrides[:-2], "train.epochs=1",
                                script="slurm/multinode.sbatch", tasks=1, extra=("--nodes=1", "--cpus-per-task=2",
                                                                                 "--export=ALL,LAUNCHER=accelerate"))
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "launcher accelerate | world size 2 | backend gloo" in log
