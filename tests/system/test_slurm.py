"""sbatch of the project's own scripts on a real Slurm cluster (CPU, gloo): one node here; the
two-node forms are in test_multinode.py. The cluster (two nodes, tests/slurm_cluster.py) is
started once per session by conftest's `cluster` fixture."""

import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, epoch_sample_ids

from emotion_dist.modelio import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
ONE_NODE = ("--nodes=1",)


def _submit(cluster, tmp_path, name, *overrides, script="slurm/train.sbatch", tasks=2, extra=()):
    job = cluster.submit(script, tmp_path, name, *overrides, options=(*ONE_NODE, f"--ntasks-per-node={tasks}", *extra),
                         env={"GPUS_PER_NODE": "2"})
    return job.id, job.out, job.run_dir


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
    cluster.requeued(jid)
    stopped = load_checkpoint(ckpts / "last.pt")
    cluster.release(jid)
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and re.search(r"stop requested \([^)]*\): saving at step", log)
    assert f"resumed from {ckpts / 'last.pt'}: epoch {stopped['epoch'] + 1}, step {stopped['global_step']}" in log
    final = load_checkpoint(ckpts / "last.pt")
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    for epoch in (0, 1):  # every sample of every epoch exactly once, the interrupted one included
        ids = epoch_sample_ids(run_dir, epoch)
        assert sorted(ids) == sorted(set(ids)) and len(ids) == stopped["sampler"]["n"]


def test_bad_config_fails_with_one_line(cluster, tmp_path):
    jid, out, _ = _submit(cluster, tmp_path, "bad", "train.lr=-1", tasks=1)
    info = cluster.wait(jid)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"].split(":")[0] != "0"
    errors = [l for l in out.read_text().splitlines() if l.startswith("error:")]
    assert errors == ["error: train.lr=-1.0 must be > 0"]


def _fresh_checkout(dest):
    """The repository's files as `git clone` would give them (tracked and new, nothing ignored:
    no runs/, no .cache/), so the scripts run as on a fresh checkout of this tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_scripts_run_on_a_fresh_checkout_with_their_own_defaults(cluster, tmp_path, fast_overrides):
    """No --output, no --cpus-per-task: the scripts' own #SBATCH lines must fit a small (2-CPU) node
    and write their log where a fresh checkout has a folder for it."""
    repo = _fresh_checkout(tmp_path / "checkout")
    assert not (repo / "runs").exists()
    env = {"CONFIG": "configs/default.yaml", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": "1",
           "PYTHONPATH": str(repo), "WANDB_MODE": "offline"}
    args = [*fast_overrides[:-2], "train.max_steps=1"]
    jobs = {script: cluster.sbatch("--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=1", f"slurm/{script}.sbatch",
                                   *args, env=env, cwd=repo) for script in ("train", "multinode")}
    for script, jid in jobs.items():
        info = cluster.wait(jid, timeout=180, until=lambda j: j.get("Reason") == "PartitionConfig")
        assert info.get("Reason") != "PartitionConfig", (f"{script}.sbatch asks more than a 2-CPU node has "
                                                         "(pending forever)")
        logs = list(repo.glob(f"slurm-*-{jid}.out"))
        assert logs, f"{script}.sbatch wrote no output file ({info['JobState']}, {info.get('Reason')})"
        assert info["JobState"] == "COMPLETED", logs[0].read_text()[-3000:]
        assert "train.max_steps=1 reached" in logs[0].read_text()
        assert (repo / "runs/slurm" / info["JobName"] / "checkpoints/last.pt").is_file()
