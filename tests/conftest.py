import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# one torch thread per pytest-xdist worker (as in every child, env_for_child): four workers on two
# cores would otherwise each start two intra-op threads and spend time switching between them
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("YOLO_OFFLINE", "1")


def env_for_child(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                "SLURM_", "ACCELERATE_", "TORCHELASTIC"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True, cwd=ROOT):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or env_for_child(), cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"{cmd} timed out after {timeout}s\n--- stdout\n{out[-4000:]}"
                             f"\n--- stderr\n{err[-4000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


# The tests' training runs write no pictures unless they say log.pictures=true (later overrides win):
# matplotlib costs seconds a run, and test_use and the Quick start test check the pictures.
NO_PICTURES = "log.pictures=false"


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, TRAIN, NO_PICTURES, *overrides]


def torchrun_cmd(nproc: int, *overrides: str, extra: tuple = (), script: str = TRAIN) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            script, *([NO_PICTURES] if script == TRAIN else []), *overrides]


def without(overrides: list[str], *keys: str) -> list[str]:
    """The overrides minus those setting the given keys (or key prefixes)."""
    return [o for o in overrides if not o.startswith(keys)]


def states_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            states_equal(a[k], b[k])
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def assert_same_training_state(run_a, run_b):
    """Two runs' last.pt hold the same weights, optimizer, EMA, schedule and progress."""
    from emotion_dist.modelio import load_checkpoint

    a, b = load_checkpoint(run_a / "checkpoints/last.pt"), load_checkpoint(run_b / "checkpoints/last.pt")
    states_equal(a["model_state_dict"], b["model_state_dict"])
    states_equal(a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"])
    assert ("ema_state_dict" in a) == ("ema_state_dict" in b)
    if "ema_state_dict" in a:
        states_equal(a["ema_state_dict"], b["ema_state_dict"])
        assert a["ema_updates"] == b["ema_updates"] == a["global_step"]
    assert a["scheduler_state_dict"] == b["scheduler_state_dict"]
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    return a, b


CLUSTER_TESTS = ("tests/system/test_slurm.py", "tests/system/test_multinode.py")


def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`-n 2`): every test is a unit of its own, except the Slurm and multinode
    tests, which run on one worker so that one Slurm cluster serves the session (two clusters on one
    host share munge and the node names). xdist's own `xdist_group` marks did not group under pytest 9."""
    from xdist.scheduler import LoadScopeScheduling

    class ClusterTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if nodeid.startswith(CLUSTER_TESTS) else nodeid

    return ClusterTestsTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The Slurm and multinode tests first (under xdist one long unit on one worker, which should
    start at once), then the ones marked slow, then the rest (a stable sort): the long tests are
    handed out while the short ones still remain to fill the other workers, so no worker ends with
    a long test after the others have gone idle."""
    items.sort(key=lambda item: (not item.nodeid.startswith(CLUSTER_TESTS), item.get_closest_marker("slow") is None))


UNIT = ROOT / "tests" / "unit"


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """tests/unit runs in-process: a test there that starts a child process fails, naming it."""
    if not Path(str(request.node.fspath)).is_relative_to(UNIT):
        return
    import torch  # noqa: F401  its first import runs `ldconfig -p` (cuda.pathfinder): torch's, not the test's


    def refuse(self, args, *a, **k):
        raise AssertionError(f"a unit test started a process ({args!r}); move the test to tests/system")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "emotion_dist.cli", *args]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that one pytest-xdist worker builds and every worker then reads (pytest-xdist's
    recipe for session fixtures that should run once: a file lock in the base temp the workers
    share). Without xdist, the session's own base temp. Tests must treat it as read-only."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    d, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            d.mkdir(exist_ok=True)
            build(d)
            done.write_text("")
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Kaggle layout, shared by the whole session."""
    from emotion_dist.data.readers.synthetic import generate

    return built_once(tmp_path_factory, "data", lambda d: generate(d / "synthetic", 210, 63, seed=3)) / "synthetic"


def quick_overrides(tiny_data: Path, folder: Path) -> list[str]:
    """Overrides for quick real runs on CPU: tiny images and data, no final test pass, no pictures
    (matplotlib costs seconds a run; test_use checks the pictures); cache and run under `folder`."""
    return [
        "data.source=folder", f"data.root={tiny_data}", "data.image_size=32", "data.val_fraction=0.2",
        "train.batch_size=8", "train.epochs=2", "train.eval_test=false", "log.every_steps=1", "log.pictures=false",
        f"run.cache_dir={folder / 'cache'}", f"run.dir={folder / 'run'}", "train.channels_last=false",
    ]


@pytest.fixture
def fast_overrides(tiny_data, tmp_path) -> list[str]:
    return quick_overrides(tiny_data, tmp_path)


@pytest.fixture
def base_overrides(fast_overrides) -> list[str]:
    """fast_overrides without run.dir: for tests that run several runs side by side."""
    return without(fast_overrides, "run.dir")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_data) -> Path:
    """The uninterrupted run of fast_overrides (one process, 2 epochs, 42 steps) that the stopped and
    resumed runs are compared with, trained once for the session; its run directory (read-only)."""
    d = built_once(tmp_path_factory, "reference_run", lambda d: run(train_cmd(*quick_overrides(tiny_data, d))))
    return d / "run"


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory, tiny_data) -> Path:
    """One epoch of fast_overrides (21 steps), trained once for the session: its last.pt (read-only)."""
    d = built_once(tmp_path_factory, "one_epoch_run",
                   lambda d: run(train_cmd(*quick_overrides(tiny_data, d), "train.epochs=1")))
    return d / "run/checkpoints/last.pt"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_data):
    """A real checkpoint from a four-step training run on tiny_data (no warm-up and a high lr, so
    its outputs depend on the picture at all), and its ONNX export: `.pt` and `.onnx` (+ .json)."""
    from types import SimpleNamespace

    def build(d: Path) -> None:
        run(train_cmd("data.source=folder", f"data.root={tiny_data}", "data.image_size=32", "train.batch_size=16",
                      "train.max_steps=4", "train.warmup_epochs=0", "train.lr=0.01", "train.label_smoothing=0",
                      "train.eval_test=false", "log.wandb=off", f"run.dir={d}/run", f"run.cache_dir={d}/cache"))
        run([sys.executable, "-m", "emotion_dist.cli", "export", "--checkpoint", str(d / "run/checkpoints/last.pt"),
             "--format", "onnx", "--out", str(d / "model.onnx")])

    d = built_once(tmp_path_factory, "tiny_model", build)
    return SimpleNamespace(pt=d / "run/checkpoints/last.pt", onnx=d / "model.onnx")


def epoch_sample_ids(run_dir: Path, epoch: int) -> list[int]:
    """The ids of the samples trained on in `epoch`, over every rank (`log.sample_ids=true`)."""
    import json

    out = []
    for f in sorted(run_dir.glob("sample_ids.rank*.jsonl")):
        out += [i for r in map(json.loads, f.read_text().splitlines()) if r["epoch"] == epoch for i in r["ids"]]
    return out


@pytest.fixture(scope="session")
def slurm_session(tmp_path_factory):
    """A real two-node Slurm cluster on this machine (tests/slurm_cluster.py), started once per session.
    Where it cannot start, CI fails and elsewhere the tests skip, saying why."""
    from slurm_cluster import Cluster, available

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


@pytest.fixture
def cluster(slurm_session):
    """The session's Slurm cluster, every node up and idle and no job left from an earlier test."""
    slurm_session.heal()
    return slurm_session


def write_checkpoint(path: Path, *, in_channels: int = 1, image_size: int = 32, seed: int = 0, **fields) -> Path:
    """An emotion-dist checkpoint written in-process (EmotionNet at seeded random weights, the
    metadata a training run records), for tests that need a model file but no training run.
    `fields` replace top-level keys, e.g. `model_state_dict=...` to build a damaged file."""
    import torch

    from emotion_dist.data.datasets import normalization
    from emotion_dist.data.readers.synthetic import CLASSES
    from emotion_dist.model import EmotionNet
    from emotion_dist.modelio import CheckpointMeta

    torch.manual_seed(seed)
    model = EmotionNet(in_channels, len(CLASSES)).eval()
    mean, std = normalization(in_channels)
    meta = CheckpointMeta(classes=list(CLASSES), image_size=image_size, in_channels=in_channels,
                          normalization={"mean": mean, "std": std}, data_size=image_size)
    state = {"model_state_dict": model.state_dict(), "epoch": 1, "global_step": 1, **meta.to_state(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def unit_checkpoint(tmp_path_factory) -> Path:
    """write_checkpoint()'s default model, once per session: read-only."""
    return write_checkpoint(tmp_path_factory.mktemp("unit_ckpt") / "model.pt")


def mounted_tmpfs(tmp_path: Path, size: str):
    """A real tmpfs of `size` (e.g. "1m") under tmp_path, for full-disk tests; unmounted afterwards.
    CI must be able to mount it (root); elsewhere the test skips, saying why."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the full-disk test: mounting a tmpfs failed")
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def write_gray_clip(path: Path) -> Path:
    """Three 64 x 48 frames at 5 fps, darker to lighter: a real MP4 with no face in it."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    return path
