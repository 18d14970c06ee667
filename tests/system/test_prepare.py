"""Preparing data once per node or job (emotion_dist/data/prepare.py, topology.py) with real processes:
torchrun agents posing as nodes, ranks launched by hand (RANK/WORLD_SIZE, GROUP_RANK for the node),
a preparer that dies, a stop signal while waiting, and training with dist.timeout_s=2."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, env_for_child, run, torchrun_cmd

from emotion_dist.data.prepare import decode_error, encode_error
from emotion_dist.distributed.topology import from_identities, host_name, node_identity
from emotion_dist.errors import DataError, Interrupted, TrainingAborted

PROBE = str(ROOT / "tests" / "helpers" / "prepare_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(text: str) -> dict:
    return next(json.loads(line) for line in text.splitlines() if line.startswith("{"))


# ---------------------------------------------------------------- in-process
def test_nodes_come_from_the_launcher_before_the_host_name():
    assert node_identity({"GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "r"})[0] == "agent:r:1"
    assert node_identity({"SLURM_NODEID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_ID": "7",
                          "SLURMD_NODENAME": "n4"}) == ("slurm:7:3", "n4")
    assert node_identity({"SLURM_NODEID": "3"})[0].startswith("host:")  # a batch script, not an srun task
    # two torchrun agents on one host name: two nodes, told apart in their names
    topo = from_identities(2, 0, [("agent:r:0", "vm"), ("agent:r:0", "vm"), ("agent:r:1", "vm"), ("agent:r:1", "vm")])
    assert topo.node_ranks == ((0, 1), (2, 3)) and topo.node == 1 and topo.leader(1) == 2
    assert topo.describe() == "2 nodes (vm#0, vm#1) x 2 processes"
    uneven = from_identities(0, 0, [("slurm:1:0", "n1"), ("slurm:1:1", "n2"), ("slurm:1:1", "n2")])
    assert uneven.describe() == "2 nodes (n1, n2) with 1 + 2 processes" and uneven.is_node_leader


def test_a_failure_crosses_to_the_other_ranks_as_the_same_line():
    e = decode_error(encode_error(DataError("class folders differ; fix them"), 0, "the data"))
    assert type(e) is DataError and str(e) == "class folders differ; fix them"
    assert decode_error(encode_error(Interrupted("SIGUSR1"), 1, "x")).signame == "SIGUSR1"
    bug = decode_error(encode_error(KeyError("labels"), 2, "the decoded images"))
    assert type(bug) is TrainingAborted and str(bug) == ("rank 2 failed while preparing the decoded images: "
                                                         "KeyError: 'labels'")


# ---------------------------------------------------------------- real processes
def _two_ranks(scenario: str, *overrides: str, groups=(None, None), **env) -> list[subprocess.Popen]:
    """Two ranks launched by hand (env://, rank 0 hosts the store); GROUP_RANK makes them two nodes."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        extra = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env}
        if groups[rank] is not None:
            extra["GROUP_RANK"] = groups[rank]
        procs.append(subprocess.Popen([sys.executable, PROBE, scenario, *overrides], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env_for_child(**extra), cwd=ROOT))
    return procs


def _finish(procs, timeout=240) -> list[tuple[int, str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.slow
def test_node_scope_or_job_scope_follows_what_two_torchrun_agents_see(tmp_path):
    """Two torchrun agents on this host are two nodes (--nnodes=2). One run.cache_dir for both:
    shared, so rank 0 prepares once for the job. A folder of its own per agent: node-local, so
    each node's first rank prepares for its node."""
    for case, dirs in (("shared", ("same", "same")), ("local", ("node0", "node1"))):
        port = _free_port()
        agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={case}", "--max-restarts=0", PROBE, "scope",
             f"run.cache_dir={tmp_path / case / d}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env_for_child(), cwd=ROOT) for d in dirs]
        outs = _finish(agents)
        assert [rc for rc, _, _ in outs] == [0, 0], [err[-2000:] for _, _, err in outs]
        res = sorted((_results(out) for _, out, _ in outs), key=lambda r: r["rank"])
        assert [r["node"] for r in res] == [0, 1]
        assert res[0]["topology"] == f"2 nodes ({host_name()}#0, {host_name()}#1) x 1 process"
        if case == "shared":
            assert [r["scope"] for r in res] == ["job", "job"] and [r["marker"] for r in res] == ["made", "found"]
            assert (tmp_path / case / "same" / "marker").read_text() == "0"
        else:
            assert [r["scope"] for r in res] == ["node", "node"] and [r["marker"] for r in res] == ["made", "made"]
        assert not [p.name for p in (tmp_path / case).rglob(".prepare-scope-*")]  # the probes are gone


def test_job_scope_on_node_local_folders_ends_every_rank_with_the_same_line(tmp_path):
    """data.prepare_scope=job while each "node" has its own run.cache_dir: node 1 cannot see the
    cache node 0 built; its error ends both ranks, one line each, exit 2."""
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            (data / c / f"{i}.pgm").write_bytes(b"P5 8 8 255\n" + bytes([40 * i]) * 64)
    procs = _two_ranks("build", "data.prepare_scope=job", groups=(0, 1), PROBE_DATA=data,
                       PROBE_CACHE_DIRS=f"{tmp_path / 'node0'}|{tmp_path / 'node1'}")
    outs = _finish(procs)
    assert [rc for rc, _, _ in outs] == [2, 2], [err[-2000:] for _, _, err in outs]
    lines = {_last_line(err) for _, _, err in outs}
    assert len(lines) == 1
    (line,) = lines
    assert "is not in" in line and "set data.prepare_scope=node" in line and str(tmp_path / "node1") in line


def test_a_dead_preparer_is_one_line_on_the_waiting_ranks(tmp_path):
    # the preparer is rank 0, which also hosts the store (env:// launch): the store goes with it
    (_, _, _), (rc, _, err) = _finish(_two_ranks("die", f"run.cache_dir={tmp_path / 'a'}"))
    assert rc == 1 and _last_line(err).startswith("error: lost the process group's store while preparing")
    # the preparer of node 1 (rank 1): rank 0 notices that its heartbeat stopped
    (rc, _, err), (rc1, _, _) = _finish(_two_ranks("die", f"run.cache_dir={tmp_path / 'b'}", "data.prepare_scope=node",
                                                   groups=(0, 1), PROBE_VICTIM=1, PROBE_STALE_S=3))
    assert rc1 == -signal.SIGKILL and rc == 1
    assert _last_line(err).startswith("error: rank 1 on ") and "stopped responding (no heartbeat for 3 s)" in err


def test_a_stop_signal_while_waiting_stops_every_rank_with_exit_0(tmp_path):
    procs = _two_ranks("slow", f"run.cache_dir={tmp_path}", PROBE_SLOW_S=8)
    for line in procs[0].stdout:  # rank 0 logs its plan, then sleeps as the preparer
        if "the slow data: prepared once by rank 0" in line:
            break
    time.sleep(0.5)  # rank 1 entered the step with rank 0 and waits in it by now
    procs[1].send_signal(signal.SIGUSR1)
    outs = _finish(procs)
    assert [rc for rc, _, _ in outs] == [0, 0], [err[-2000:] for _, _, err in outs]
    assert [_last_line(err) for _, _, err in outs] == ["stopped by SIGUSR1", "stopped by SIGUSR1"]
    assert "slept" not in outs[0][1]  # rank 0 finished its sleep, then stopped instead of going on


def test_a_cold_cache_with_dist_timeout_2_trains_on_two_processes(tmp_path):
    """Rank 0 draws 1,500 synthetic faces (seconds, far beyond dist.timeout_s=2) while rank 1 waits
    on the store; then both ranks decode the cache together. Before, rank 1 died in gloo's recv."""
    cache = tmp_path / "cache"
    proc = run(torchrun_cmd(2, "data.synthetic_train=1500", "data.synthetic_test=14", "data.image_size=32",
                            "train.batch_size=8", "train.max_steps=1", "train.eval_test=false",
                            "train.channels_last=false", "dist.timeout_s=2", f"run.cache_dir={cache}",
                            f"run.dir={tmp_path / 'run'}"), timeout=400)
    assert "the dataset: prepared once by rank 0" in proc.stdout
    assert "the decoded images: prepared once by the 2 ranks" in proc.stdout
    metas = [json.loads(p.read_text()) for p in (cache / "decoded").glob("*[0-9a-f].json")]
    train = next(m for m in metas if m["build"]["images"] == 1500)
    assert [r["images"] for r in train["build"]["per_rank"]] == [750, 750]  # the node's ranks shared the work


def test_waiting_longer_than_data_prepare_timeout_s_is_one_line_on_every_rank(tmp_path):
    outs = _finish(_two_ranks("slow", f"run.cache_dir={tmp_path}", "data.prepare_timeout_s=2", PROBE_SLOW_S=6))
    assert [rc for rc, _, _ in outs] == [2, 2], [err[-2000:] for _, _, err in outs]
    lines = {_last_line(err) for _, _, err in outs}
    assert lines == {"error: waited 2 s (data.prepare_timeout_s) for rank 0 on "
                     f"{host_name()} to prepare the slow data; raise data.prepare_timeout_s, or build the cache "
                     "ahead with `emotion-dist data cache`"}
