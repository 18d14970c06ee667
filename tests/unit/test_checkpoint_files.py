import os

import pytest
import torch
from conftest import write_checkpoint

from emotion_dist.errors import CheckpointError
from emotion_dist.modelio import load_checkpoint
from emotion_dist.training.checkpoint import CheckpointFiles


def _state(step: int) -> dict:
    return {"model_state_dict": {"w": torch.full((3,), float(step))}, "global_step": step, "epoch": 0,
            "class_names": ["a", "b"], "config": {"train": {"lr": 0.1}}, "history": [{"epoch": 1, "x": 0.5}]}


def test_roundtrip_with_weights_only(tmp_path):
    ck = CheckpointFiles(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(_state(step), step, is_best=step == 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt", "last.pt", "step-00000002.pt", "step-00000003.pt"]
    last = load_checkpoint(ck.last)
    assert last["global_step"] == 3 and torch.equal(last["model_state_dict"]["w"], torch.full((3,), 3.0))
    assert load_checkpoint(ck.best)["global_step"] == 2
    assert last["format_version"] == 1


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "hook": os.system}, path)
    with pytest.raises(CheckpointError, match="refused \\(weights_only=True\\)"):
        load_checkpoint(path)


def test_future_format_version_is_a_clear_error(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({**_state(1), "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="upgrade emotion-dist"):
        load_checkpoint(path)


def test_truncated_last_is_skipped_by_auto_resume(tmp_path):
    ck = CheckpointFiles(tmp_path / "run", keep=3)
    real = load_checkpoint(write_checkpoint(tmp_path / "model.pt"))  # auto-resume takes only a sound checkpoint
    ck.save({**real, "global_step": 4}, 4)
    ck.save({**real, "global_step": 8}, 8)
    data = ck.last.read_bytes()
    ck.last.write_bytes(data[: len(data) // 2])
    (tmp_path / "run/checkpoints/step-00000008.pt").write_bytes(b"")
    path, state = ck.newest_loadable()
    assert path.name == "step-00000004.pt" and state["global_step"] == 4
