"""Many nodes on one machine: a real two-node Slurm cluster (slurm_cluster.py) and torchrun agents
as nodes (nodes.py). Every node has its own host name and its own node-local scratch at the same
path, so what only one node prepared is missing on the other, as on a real cluster.

CPU and gloo, OMP_NUM_THREADS=1, 160 training images of 32x32 (whole micro-batches at world sizes
1, 2 and 4). A world-size-4 run on one node is the reference: the same run over two nodes must end
with the same weights, bit for bit (same ranks, same gloo reduction order, same data order).

Node loss is made deterministic with the product's fault hook: the rank on the node to be lost
hangs at the first step after a checkpoint (EMOTION_DIST_FAULT=RANK:STEP:hang), the test waits for
that checkpoint and then kills the node whole. So no step after the checkpoint is ever logged, and
the sample-id audit can demand every sample of the epoch exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import nodes
import pytest
from conftest import ROOT, env_for_child, epoch_sample_ids, run, torchrun_cmd
from nodes import TorchrunNode, free_port, hosts_file, torchrun_args
from test_train import assert_same_training_state

from emotion_dist.modelio import load_checkpoint

pytestmark = pytest.mark.slow
N_TRAIN = 160  # data.limit
AUDIT_SITE = ROOT / "tests" / "helpers" / "fileaudit"
STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def overrides(data: Path, cache: Path, *extra: str) -> list[str]:
    return ["data.source=folder", f"data.root={data}", "data.image_size=32", "data.val_fraction=0.2",
            f"data.limit={N_TRAIN}", "train.batch_size=8", "train.epochs=1", "train.eval_test=false",
            "log.every_steps=1", "train.channels_last=false", "log.sample_ids=true", "log.pictures=false",
            f"run.cache_dir={cache}", *extra]


def audit_env(record: Path, under: Path) -> dict:
    """Environment that makes every Python process record the image files it opens (fileaudit)."""
    return {"PYTHONPATH": f"{ROOT}:{AUDIT_SITE}", "EMOTION_DIST_TEST_AUDIT": str(record),
            "EMOTION_DIST_TEST_AUDIT_UNDER": str(under)}


def reads_per_node_image(record: Path) -> dict[str, Counter]:
    """Per node (host name), how often each image file was opened for reading."""
    out = defaultdict(Counter)
    for line in (record.read_text().splitlines() if record.is_file() else []):
        node, _, m, path = line.split(" ", 3)
        if m == "r":
            out[node][path] += 1
    return out


def wait_until(condition, timeout: float, what: str, alive=lambda: True):
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.2)


def checkpointed(run_dir: Path, step: int):
    """True once a step checkpoint at `step` or later is on disk (written atomically)."""
    ckpts = run_dir / "checkpoints"
    return lambda: ckpts.is_dir() and any(int(m.group(1)) >= step for p in ckpts.iterdir()
                                          if (m := STEP_FILE.search(p.name)))


def error_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("error:")]


def assert_every_sample_once(run_dir: Path, epoch: int = 0) -> None:
    ids = epoch_sample_ids(run_dir, epoch)
    assert len(ids) == len(set(ids)) == N_TRAIN, (len(ids), len(set(ids)))


@pytest.fixture(scope="module")
def namespaces():
    """Nodes need root and unshare: CI fails without them, elsewhere the tests skip, saying why."""
    reason = nodes.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-node tests: {reason}")
        pytest.skip(reason)


# ---------------------------------------------------------------- the reference: 4 processes, one node
@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reference")
    run(torchrun_cmd(4, *overrides(tiny_data, d / "cache", "train.max_steps=3", f"run.dir={d / 'run'}")))
    return d / "run"


# ---------------------------------------------------------------- two-node Slurm jobs, world size 4
LAYOUTS = {  # name: (script, sbatch options, environment)
    "torchrun": ("slurm/multinode.sbatch", ("--nodes=2",), {"GPUS_PER_NODE": "2"}),
    "accelerate": ("slurm/multinode.sbatch", ("--nodes=2",), {"GPUS_PER_NODE": "2", "LAUNCHER": "accelerate"}),
    "srun": ("slurm/train.sbatch", ("--nodes=2", "--ntasks-per-node=2"), {}),
}


@pytest.fixture(scope="module")
def two_node_jobs(slurm_session, tiny_data, tmp_path_factory):
    """The three two-node layouts, submitted at once (they queue: each takes both nodes), each with
    run.cache_dir on node-local scratch and every image file opening recorded."""
    cluster = slurm_session
    cluster.heal()
    folder = tmp_path_factory.mktemp("two-node")
    jobs = {}
    for name, (script, options, env) in LAYOUTS.items():
        args = overrides(tiny_data, cluster.scratch / f"two-node-{name}", "train.max_steps=3")
        jobs[name] = cluster.submit(script, folder, f"two-node-{name}", *args, options=options,
                                    env={**env, **audit_env(folder / f"{name}.audit", tiny_data)})
    yield SimpleNamespace(cluster=cluster, jobs=jobs, audit=lambda name: folder / f"{name}.audit")
    cluster.heal()


def finished(two_node_jobs, name):
    job = two_node_jobs.jobs[name]
    info = two_node_jobs.cluster.wait(job.id, timeout=400)
    assert info["JobState"] == "COMPLETED", job.log()[-4000:]
    return job


@pytest.mark.slurm
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_node_slurm_job_equals_one_node(two_node_jobs, reference, name):
    job = finished(two_node_jobs, name)
    log = job.log()
    assert "2 nodes (n[1-2])" in log
    launcher = "accelerate" if name == "accelerate" else "torchrun" if name == "torchrun" else "slurm"
    assert f"launcher {launcher} | world size 4 | backend gloo" in log
    assert_same_training_state(reference, job.run_dir)


@pytest.mark.slurm
@pytest.mark.parametrize("name", ["torchrun", "srun"])
def test_each_node_prepares_its_data_once(two_node_jobs, name):
    """run.cache_dir is node-local: each node builds its own cache once, its ranks sharing the work
    (one cache per node, built by the whole node), never once per rank: every image is
    opened on each node at most twice (a header read for its size, then the decode), and the
    other node's files are never read for it."""
    job = finished(two_node_jobs, name)
    reads = reads_per_node_image(two_node_jobs.audit(name))
    assert set(reads) == {"n1", "n2"}, job.log()[-2000:]
    for node, per_image in reads.items():
        assert len(per_image) == 210 + 63 and max(per_image.values()) <= 2, (node, max(per_image.values()))
    for node in ("n1", "n2"):  # and each node's scratch holds its own cache
        cache = two_node_jobs.cluster.node_path(node, two_node_jobs.cluster.scratch / f"two-node-{name}")
        assert any(p.is_file() for p in cache.rglob("*")), node


@pytest.mark.slurm
@pytest.mark.parametrize("name", ["torchrun", "srun"])
def test_launch_line_names_the_nodes_and_the_checkpoint_counts_them(two_node_jobs, name):
    job = finished(two_node_jobs, name)
    assert "2 nodes (n1, n2) x 2 processes" in job.log()
    state = load_checkpoint(job.run_dir / "checkpoints/last.pt")
    assert state["world_size"] == 4 and state.get("num_nodes") == 2


# ---------------------------------------------------------------- two torchrun agents as two nodes
def test_two_torchrun_agents_equal_one_node(namespaces, tiny_data, reference, tmp_path):
    (tmp_path / "scratch").mkdir()
    hosts = hosts_file(tmp_path / "hosts", ["nodeA", "nodeB"])
    endpoint = f"nodeA:{free_port()}"
    args = overrides(tiny_data, tmp_path / "scratch" / "cache", "train.max_steps=3", f"run.dir={tmp_path / 'run'}")
    agents = [TorchrunNode(name, tmp_path / "scratch", hosts, torchrun_args("2", 2, endpoint, "two-agents", *args),
                           tmp_path / f"{name}.log") for name in ("nodeA", "nodeB")]
    try:
        for agent in agents:
            assert agent.wait(300) == 0, agent.output()[-4000:]
    finally:
        for agent in agents:
            agent.close()
    assert "world size 4" in agents[0].output()
    assert_same_training_state(reference, tmp_path / "run")


# ---------------------------------------------------------------- preemption of a two-node job
@pytest.mark.slurm
def test_two_node_job_preempted_checkpoints_requeues_and_resumes_on_two_nodes(cluster, tiny_data, tmp_path):
    args = overrides(tiny_data, cluster.scratch / "preempt2", "train.epochs=2")
    job = cluster.submit("slurm/multinode.sbatch", tmp_path, "preempt2", *args, options=("--nodes=2",),
                         env={"GPUS_PER_NODE": "1"})
    live = lambda: cluster.job(job.id)["JobState"] in ("PENDING", "RUNNING")  # noqa: E731
    wait_until(lambda: "] step 2 (" in job.log(), 300, "second training step", alive=live)
    assert cluster.run("scancel", "--signal=USR1", "--batch", str(job.id)).returncode == 0
    cluster.requeued(job.id)
    stopped = load_checkpoint(job.run_dir / "checkpoints/last.pt")
    cluster.release(job.id)
    info = cluster.wait(job.id, timeout=300)
    log = job.log()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert log.count("2 nodes (n[1-2])") == 2  # both runs on both nodes
    saves = re.findall(r"stop requested \([^)]*\): saving at step (\d+)", log)
    assert saves == [str(stopped["global_step"])], log[-4000:]  # one agreed step boundary
    assert f"step {stopped['global_step']}, " in log and "(saved on world size 2 with ddp)" in log
    final = load_checkpoint(job.run_dir / "checkpoints/last.pt")
    assert final["epoch"] == 2 and final["world_size"] == 2
    for epoch in (0, 1):  # the interrupted epoch included
        assert_every_sample_once(job.run_dir, epoch)


# ---------------------------------------------------------------- losing a Slurm node
@pytest.fixture(scope="module")
def lost_slurm_node(slurm_session, tiny_data, tmp_path_factory):
    """A two-node job (one torchrun per node, one process each) loses n2 mid-epoch: its slurmd and
    every process of the job on it are killed. Then n2 is set DOWN (what slurmctld does after
    SlurmdTimeout, or an admin), and the requeued job (--nodes=1-2) runs on n1 alone."""
    cluster = slurm_session
    cluster.heal()
    folder = tmp_path_factory.mktemp("lost-node")
    args = overrides(tiny_data, cluster.scratch / "lost-node", "ckpt.every_steps=2")
    job = cluster.submit("slurm/multinode.sbatch", folder, "lost-node", *args, options=("--nodes=1-2",),
                         env={"GPUS_PER_NODE": "1", "EMOTION_DIST_FAULT": "1:5:hang",
                              "EMOTION_DIST_FAULT_ONCE": str(folder / "fired")})
    try:
        live = lambda: cluster.job(job.id)["JobState"] in ("PENDING", "RUNNING")  # noqa: E731
        wait_until(checkpointed(job.run_dir, 4), 300, "checkpoint at step 4", alive=live)
        assert cluster.job(job.id)["NodeList"] == "n[1-2]"
        cluster.kill_node("n2")
        # dist.timeout_s is 300 s: a survivor that stops within 90 s noticed the loss itself
        try:
            wait_until(lambda: error_lines(job.log()), 90, "error line from the survivor")
            stopped = True
        except AssertionError:
            stopped = False
        first_run = job.log()
        cluster.set_state("n2", "DOWN", "killed by the test")  # Slurm requeues the job (--requeue)
        cluster.requeued(job.id)
        cluster.release(job.id)
        info = cluster.wait(job.id, timeout=300)
        yield SimpleNamespace(job=job, info=info, stopped=stopped, first_run=first_run)
    finally:
        cluster.heal()


@pytest.mark.slurm
def test_lost_node_stops_the_survivors_at_once_naming_it(lost_slurm_node):
    assert lost_slurm_node.stopped, lost_slurm_node.first_run[-3000:]
    (line,) = error_lines(lost_slurm_node.first_run)  # one line from the one survivor
    assert re.search(r"\bn2\b|\brank 1\b", line), f"the line does not name the lost node or rank: {line}"


@pytest.mark.slurm
def test_lost_node_job_requeued_resumes_on_the_remaining_node(lost_slurm_node):
    job, log = lost_slurm_node.job, lost_slurm_node.job.log()
    assert lost_slurm_node.info["JobState"] == "COMPLETED", log[-4000:]
    assert "(restart 1): 1 nodes (n1)" in log
    assert re.search(r"resumed from .*: epoch 1, step 4, 64/160 samples .*saved on world size 2", log), log[-3000:]
    final = load_checkpoint(job.run_dir / "checkpoints/last.pt")
    assert final["epoch"] == 1 and final["world_size"] == 1
    assert_every_sample_once(job.run_dir)


# ---------------------------------------------------------------- elastic torchrun loses an agent
# Prompt re-rendezvous: a node missing 3 keep-alives (1 s apart) is dropped, and once min nodes are
# there the round closes after 1 s. The agent whose host name is the endpoint's hosts the store;
# losing that one cannot be survived (the store dies with it), so the test loses the other.
ELASTIC = ("--max-restarts=2", "--monitor-interval=0.5",
           "--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3")


@pytest.fixture(scope="module")
def elastic_loses_an_agent(namespaces, tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic")
    (d / "scratch").mkdir()
    hosts = hosts_file(d / "hosts", ["nodeA", "nodeB"])
    args = overrides(tiny_data, d / "scratch" / "cache", "ckpt.every_steps=2", f"run.dir={d / 'run'}")
    argv = torchrun_args("1:2", 1, f"nodeA:{free_port()}", "elastic", *args, extra=ELASTIC)
    env = env_for_child(EMOTION_DIST_FAULT="1:5:hang", EMOTION_DIST_FAULT_ONCE=d / "fired")  # rank 1 = nodeB
    a, b = (TorchrunNode(name, d / "scratch", hosts, argv, d / f"{name}.log", env=env) for name in ("nodeA", "nodeB"))
    try:
        wait_until(checkpointed(d / "run", 4), 300, "checkpoint at step 4", alive=lambda: a.proc.poll() is None)
        b.kill()
        rc = a.wait(300)
        yield SimpleNamespace(rc=rc, out=a.output(), run_dir=d / "run")
    finally:
        a.close()
        b.close()


def test_elastic_survivor_resumes_at_world_size_one(elastic_loses_an_agent):
    e = elastic_loses_an_agent
    assert e.rc == 0, e.out[-4000:]
    assert re.search(r"resumed from .*: epoch 1, step 4, 64/160 samples .*saved on world size 2", e.out), e.out[-3000:]
    final = load_checkpoint(e.run_dir / "checkpoints/last.pt")
    assert final["epoch"] == 1 and final["world_size"] == 1
    assert_every_sample_once(e.run_dir)


def test_elastic_survivor_names_the_lost_rank(elastic_loses_an_agent):
    lines = error_lines(elastic_loses_an_agent.out)
    assert len(lines) == 1, lines  # the one survivor, once
    assert re.search(r"\bnodeB\b|\brank 1\b", lines[0]), f"the line does not name the lost node or rank: {lines[0]}"


# ---------------------------------------------------------------- odd world sizes
def test_odd_world_sizes_resume_4_3_2_and_evaluate_exactly(tiny_data, reference, tmp_path):
    """4 -> 3 -> 2 processes within one epoch (the reference stopped at step 3 on 4), then the
    3-process evaluation of the result equals the 1-process one (43 validation images: uneven shards)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("step-*.pt"))
    cache = reference.parent / "cache"
    args = overrides(tiny_data, cache, f"run.dir={run_dir}")
    out3 = run(torchrun_cmd(3, *args, "train.max_steps=5")).stdout  # steps 4-5: 24 images each
    assert "saved on world size 4" in out3 and "world size 3" in out3
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["sampler"]["consumed"] == 3 * 32 + 2 * 24
    out2 = run(torchrun_cmd(2, *args)).stdout  # the last 16 images, then the epoch ends
    assert "saved on world size 3" in out2
    final = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert final["epoch"] == 1 and final["world_size"] == 2
    assert_every_sample_once(run_dir)

    common = ["evaluate", "--checkpoint", str(run_dir / "checkpoints/last.pt"), "--split", "val",
              "--out", str(tmp_path), f"run.cache_dir={cache}"]
    run([sys.executable, "-m", "emotion_dist.cli", *common, "--json-out", str(tmp_path / "one.json")])
    run(torchrun_cmd(3, *common, "--json-out", str(tmp_path / "three.json"), extra=("-m",), script="emotion_dist.cli"))
    one, three = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "three.json"))
    assert three["world_size"] == 3 and one["count"] == three["count"] == 43
    assert one["confusion_matrix"] == three["confusion_matrix"]
    assert one["accuracy"] == three["accuracy"] and one["macro_f1"] == three["macro_f1"]
    assert abs(one["loss"] - three["loss"]) < 1e-5  # float32 per-batch sums over other batch splits


# ---------------------------------------------------------------- one job per run directory
@pytest.mark.slurm
def test_second_job_on_a_live_run_dir_exits_2_naming_the_holder(cluster, tiny_data, tmp_path):
    """Job A holds the run dir (it waits, alive, at step 3); job B on the same run dir must refuse
    at once with one line naming A, while A runs on."""
    args = overrides(tiny_data, cluster.scratch / "lease", "train.max_steps=5")
    one_node = ("--nodes=1", "--ntasks-per-node=1")
    holder = cluster.submit("slurm/train.sbatch", tmp_path, "lease", *args, options=one_node,
                            env={"EMOTION_DIST_FAULT": "0:3:hang"})
    live = lambda: cluster.job(holder.id)["JobState"] in ("PENDING", "RUNNING")  # noqa: E731
    wait_until(lambda: "] step 2 (" in holder.log(), 300, "holder training", alive=live)
    second = cluster.submit("slurm/train.sbatch", tmp_path, "lease", *args,
                            options=(*one_node, f"--output={tmp_path / 'second.out'}"))
    try:
        info = cluster.wait(second.id, timeout=120)
        log = (tmp_path / "second.out").read_text()
        assert cluster.job(holder.id)["JobState"] == "RUNNING"
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log[-3000:]
        (line,) = error_lines(log)
        assert str(holder.id) in line, line
    finally:  # the holder sleeps in the fault hook: SIGTERM would wait out KillWait
        cluster.run("scancel", "--full", "--signal=KILL", str(holder.id), str(second.id))
