"""`emotion_dist.train(...)` as a notebook calls it, in this process: the run goes to runs/NAME, a
second call on the finished run does nothing (no test pass redone), and Ctrl-C (a real SIGINT,
sent by the process to itself at a step) stops it with exit code 130."""

from __future__ import annotations

import json
import signal

import pytest
import torch  # noqa: F401  (at collection: importing torch the first time runs ldconfig, a process)

from emotion_dist import cli


@pytest.fixture
def notebook(tiny_data, tmp_path, monkeypatch):
    """A notebook's working folder, and the config dict it trains with (tiny: one epoch of one step)."""
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield {"data": {"source": "folder", "root": str(tiny_data), "image_size": 32, "val_fraction": 0.2, "limit": 16},
           "train": {"batch_size": 16, "epochs": 1, "channels_last": False, "eval_test": False},
           "run": {"cache_dir": str(tmp_path / "cache")}, "log": {"every_steps": 1}}
    for s, h in handlers.items():
        signal.signal(s, h)


def test_train_from_a_notebook_then_nothing_left_to_do(notebook, tmp_path, capsys):
    import emotion_dist as ed

    before = signal.getsignal(signal.SIGINT)
    result = ed.train(notebook, run={"name": "nb"})
    assert result["run_dir"] == "runs/nb" and result["stopped"] is False and result["global_step"] == 1
    assert (tmp_path / "runs/nb/checkpoints/best.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the notebook's Ctrl-C handler is back
    capsys.readouterr()
    again = ed.train(notebook, **{"run.name": "nb", "run.resume": "auto"})  # asked to resume a finished run
    err = capsys.readouterr().out
    assert again["already_finished"] is True and again["epoch"] == 1
    assert "already finished at epoch 1 (train.eval_test=false); nothing to do" in err
    rows = [json.loads(r) for r in (tmp_path / "runs/nb/metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("epoch") == 1  # nothing trained again
    from emotion_dist.config import load_config
    from emotion_dist.training.checkpoint import choose_run_dir

    cfg = load_config(None, ["run.name=nb", "train.epochs=1", "train.eval_test=false"])[0]
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == "runs/nb2"  # a plain rerun: a new run beside it


def test_ctrl_c_stops_training_with_exit_130(notebook, monkeypatch, capsys):
    monkeypatch.setenv("EMOTION_DIST_FAULT", "0:1:SIGINT")  # rank 0 sends itself SIGINT at step 1
    args = [f"{k}.{kk}={v}" for k, sec in notebook.items() for kk, v in sec.items()]
    code = cli.main(["train", *args, "run.name=ctrlc", "train.epochs=3"])
    out = capsys.readouterr().out
    assert code == 130
    assert "stopped by SIGINT at step 1" in out
    from emotion_dist.distributed import interrupts

    assert interrupts.requested() is None  # the next command in this process is not stopped by it
