"""Never lose the user's data: emotion-dist writes only what it owns, one run per run
directory, stop signals during data preparation, changed data on resume, odd batch shapes. Each
data-loss case was reproduced on the code before this change (it deleted or overwrote the folder)."""

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_cmd, env_for_child, run, train_cmd, without

from emotion_dist.modelio import load_checkpoint
from emotion_dist.utils.fsutil import HOST, TEMP_MARKER

DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it


def tree_digest(folder: Path) -> str:
    """Every file's relative path and bytes: any deletion, addition or change shows."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode("utf-8", "surrogateescape"))
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _one_error_line(proc, code=2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def user_folder(tmp_path, tiny_data):
    """A user's own data set: the tiny Kaggle-layout tree plus notes of theirs, no marker of ours."""
    d = tmp_path / "my-fer"
    shutil.copytree(tiny_data, d)
    (d / "synthetic.json").unlink()
    (d / "important").mkdir()
    (d / "important" / "notes.txt").write_text("do not lose me")
    return d


def test_synthetic_generation_never_writes_over_someone_elses_folder(tmp_path, user_folder):
    before = tree_digest(user_folder)
    line = _one_error_line(run(cli_cmd("data", "synthetic", "--out", str(user_folder), "--train", "14", "--test", "7"),
                               check=False))
    assert "holds files emotion-dist did not write" in line and "choose another folder" in line
    assert tree_digest(user_folder) == before
    # a new folder, an empty one, and its own set (of another size) are fine
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty, tmp_path / "new"):
        run(cli_cmd("data", "synthetic", "--out", str(out), "--train", "14" if out != tmp_path / "new" else "21",
                    "--test", "7"))
    assert len(list((tmp_path / "new/train/train").rglob("*.jpg"))) == 21


@pytest.mark.slow
def test_train_and_evaluate_read_a_given_data_root_and_never_write_it(tmp_path, user_folder):
    """`train data.root=DIR` (the default source is auto) and the README's `evaluate ... data.root=DIR` on a
    checkpoint trained on synthetic faces both read DIR as data; an explicit data.source=synthetic refuses."""
    before = tree_digest(user_folder)
    common = ["data.image_size=32", "train.batch_size=16", "train.max_steps=2", "train.eval_test=false",
              f"run.cache_dir={tmp_path / 'cache'}"]
    out = run(train_cmd("--config", "configs/default.yaml", f"data.root={user_folder}", *common,
                        f"run.dir={tmp_path / 'a'}"))
    assert f"data {user_folder} (" in out.stdout
    run(train_cmd("data.synthetic_train=28", "data.synthetic_test=14", *common, f"run.dir={tmp_path / 'synth'}"))
    ckpt = tmp_path / "synth/checkpoints/last.pt"
    assert load_checkpoint(ckpt)["config"]["data"]["root"] is None
    report = run(cli_cmd("evaluate", "--checkpoint", str(ckpt), f"data.root={user_folder}",
                         f"run.cache_dir={tmp_path / 'cache'}", "--json"))
    assert f'"data": "{user_folder}"' in report.stdout and '"count": 63' in report.stdout
    line = _one_error_line(run(train_cmd("data.source=synthetic", f"data.root={user_folder}", *common,
                                         f"run.dir={tmp_path / 'b'}"), check=False))
    assert "did not write" in line and "data.source=folder" in line
    assert tree_digest(user_folder) == before


@pytest.mark.slow
def test_export_never_replaces_its_input_or_a_file_of_another_kind(tmp_path, tiny_model):
    ck = tmp_path / "ck.pt"
    shutil.copy(tiny_model.pt, ck)
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    (tmp_path / "x").mkdir()
    for args, words in ((["--format", "onnx", "--out", str(tmp_path / "x/model.json")], "does not end in .onnx"),
                        (["--format", "safetensors", "--out", str(ck)], "is the input file itself")):
        line = _one_error_line(run(cli_cmd("export", "--checkpoint", str(ck), *args), check=False))
        assert words in line, line
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest and not list((tmp_path / "x").iterdir())
    (tmp_path / "theirs.onnx").write_text("someone's model")
    line = _one_error_line(run(cli_cmd("export", "--checkpoint", str(ck), "--format", "onnx", "--out",
                                       str(tmp_path / "theirs.onnx")), check=False))
    assert "was not written by emotion-dist" in line and (tmp_path / "theirs.onnx").read_text() == "someone's model"
    run(cli_cmd("export", "--checkpoint", str(ck), "--format", "safetensors", "--out", str(tmp_path / "x") + "/"))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["ck.json", "ck.safetensors"]
    run(cli_cmd("export", "--checkpoint", str(ck), "--format", "safetensors", "--out", str(tmp_path / "x") + "/"))


@pytest.mark.slow
def test_one_run_per_run_dir_and_stray_files_are_never_counted_or_deleted(tmp_path, fast_overrides):
    """Run B (run.resume=never) is refused in run A's directory; step files the checkpointer did not write
    are never pruned nor resumed from; temp files of a killed write are removed at the next start."""
    a = tmp_path / "run"
    run(train_cmd(*fast_overrides, "train.max_steps=4", "ckpt.every_steps=2", "ckpt.keep=1"))
    digest = tree_digest(a / "checkpoints")
    line = _one_error_line(run(train_cmd(*fast_overrides, "run.resume=never"), check=False))
    assert "holds checkpoints of an earlier run" in line and "run.resume=auto" in line
    assert tree_digest(a / "checkpoints") == digest
    ckpts = a / "checkpoints"
    for junk in ("step-00000001.pt", "step-99999999.pt"):
        (ckpts / junk).write_bytes(b"not ours")
    # temp files of killed writes of ours (this host, a dead pid; another host): under the lease, both go
    (ckpts / f".last.pt.{TEMP_MARKER}.{HOST}.{DEAD_PID}.1.0123abcd").write_bytes(b"x" * 100)
    (ckpts / f".last.pt.{TEMP_MARKER}.otherhost.7.1.0123abcd").write_bytes(b"x" * 100)
    # an earlier version's temp names: nothing proves who wrote them, so they stay
    (ckpts / ".last.pt.tmp4242").write_bytes(b"x" * 100)
    (ckpts / "report.tmp1").write_bytes(b"mine")
    out = run(train_cmd(*fast_overrides, "train.max_steps=8", "ckpt.every_steps=2", "ckpt.keep=1"))
    assert f"resumed from {ckpts / 'last.pt'}: epoch 1, step 4" in out.stdout  # not the stray step-99999999.pt
    assert "removed 2 temp file(s) left by a killed write" in out.stdout
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [".last.pt.tmp4242", "last.pt", "report.tmp1", "step-00000001.pt", "step-00000008.pt",
                     "step-99999999.pt"], names
    assert (ckpts / "step-00000001.pt").read_bytes() == b"not ours"


def test_a_folder_of_someone_elses_files_is_never_a_run_dir(tmp_path, fast_overrides, user_folder):
    before = tree_digest(user_folder)
    line = _one_error_line(run(train_cmd(*without(fast_overrides, "run.dir"), f"run.dir={user_folder}"), check=False))
    assert "not an emotion-dist run directory" in line
    assert tree_digest(user_folder) == before


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_data_is_prepared_exits_0_and_leaves_no_temp(tmp_path, sig):
    """Slurm preempts with USR1 (its scripts requeue on exit 0): before, USR1 killed the process (rc 138) and
    TERM/INT left a half-written synthetic-...tmpPID folder behind. The next start carries on. Ctrl-C
    (SIGINT) stops the same way but exits 130, so `train && export` does not go on."""
    cache = tmp_path / "cache"
    args = ["data.synthetic_train=4000", "data.synthetic_test=700", "train.max_steps=1", "train.eval_test=false",
            "data.image_size=32", f"run.dir={tmp_path / 'run'}", f"run.cache_dir={cache}"]
    proc = subprocess.Popen(train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for_child(), cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (cache.is_dir() and any(TEMP_MARKER in p.name for p in cache.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 0), err[-2000:]
    assert f"stopped by {sig.name} while preparing data" in out
    assert [p.name for p in cache.iterdir()] == [], "a temp folder was left behind"
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.slow
def test_changed_data_on_resume_names_what_changed(tmp_path, fast_overrides):
    run(train_cmd(*fast_overrides, "data.limit=100", "train.max_steps=2"))
    line = _one_error_line(run(train_cmd(*fast_overrides, "data.limit=120"), check=False))
    assert "training images 100 -> 120" in line and "start a new run.dir" in line
    line = _one_error_line(run(train_cmd(*fast_overrides, "data.limit=100", "data.image_size=64"), check=False))
    assert "data.image_size 32 -> 64" in line


def test_a_last_batch_of_one_trains(tmp_path, fast_overrides):
    """177 training images = 22 x 8 + 1: the last batch of one crashed BatchNorm after a whole epoch, with
    no checkpoint written. Every step now has the same shape (zero-weight fillers)."""
    run(train_cmd(*without(fast_overrides, "data.val_fraction"), "data.val_fraction=0.1", "data.limit=177",
                  "train.epochs=1"))
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["sampler"]["n"] == 177 and state["epoch"] == 1 and state["global_step"] == 23


def test_any_file_name_the_os_allows_trains(tmp_path, fast_overrides, tiny_data):
    """A class folder holding a file whose name is not valid UTF-8 (before: UnicodeEncodeError while
    hashing the cache key) and one with spaces and a newline: training reads them all."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    happy = data / "train/train/happy"
    src = sorted(happy.glob("*.jpg"))
    os.rename(src[0], os.path.join(os.fsencode(happy), b"caf\xe9 \xff.jpg"))
    os.rename(src[1], happy / "two words\nand a line.jpg")
    out = run(train_cmd(*without(fast_overrides, "data.root"), f"data.root={data}", "train.max_steps=2"))
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["global_step"] == 2 and "skipped unreadable" not in out.stdout
