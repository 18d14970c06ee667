"""Exact resume across processes, world sizes and strategies (real 2-process gloo runs)."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_training_state, run, torchrun_cmd, train_cmd

from emotion_dist.modelio import load_checkpoint

pytestmark = pytest.mark.slow
ROUNDTRIP = str(ROOT / "tests" / "helpers" / "roundtrip.py")


def test_two_process_mid_epoch_resume_is_bit_exact(tmp_path, base_overrides):
    base = base_overrides + ["train.ema_decay=0.9"]
    full, split = tmp_path / "full", tmp_path / "split"
    run(torchrun_cmd(2, *base, f"run.dir={full}"))
    run(torchrun_cmd(2, *base, f"run.dir={split}", "train.max_steps=15"))  # epoch 2, step 4 of 11
    assert load_checkpoint(split / "checkpoints/last.pt")["sampler"]["consumed"] == 4 * 16
    run(torchrun_cmd(2, *base, f"run.dir={split}"))
    assert_same_training_state(full, split)
    # the training metrics resume like the weights: each step's running loss and the epoch's figures
    a, b = _records(full), _records(split)
    assert [r["step"] for r in b["step"]] == [r["step"] for r in a["step"]]  # every step logged once
    assert [r["loss"] for r in b["step"]] == [r["loss"] for r in a["step"]]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_macro_f1"):
        assert [r[key] for r in b["epoch"]] == [r[key] for r in a["epoch"]], key


def _records(run_dir: Path) -> dict:
    out = {"step": [], "epoch": []}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        out.setdefault(r["type"], []).append(r)
    return out


def _ids(run_dir: Path, epoch: int) -> list[int]:
    out = []
    for f in sorted(run_dir.glob("sample_ids.rank*.jsonl")):
        out += [i for r in map(json.loads, f.read_text().splitlines()) if r["epoch"] == epoch for i in r["ids"]]
    return out


def test_world_size_two_to_one_mid_epoch_sees_every_sample_once(tmp_path, fast_overrides):
    run_dir = tmp_path / "run"
    run(torchrun_cmd(2, *fast_overrides, "log.sample_ids=true", "train.max_steps=15"))
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 1 and state["sampler"]["consumed"] == 64
    before = _ids(run_dir, 1)
    out = run(train_cmd(*fast_overrides, "log.sample_ids=true"))
    assert "saved on world size 2" in out.stdout
    seen = _ids(run_dir, 1)
    assert len(before) == 64 and len(seen) == 167
    assert sorted(seen) == sorted(set(seen)) and len(set(seen)) == state["sampler"]["n"] == 167
    final = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert final["epoch"] == 2 and final["world_size"] == 1


# the strategy each checkpoint is saved with (on 2 processes) and whether it carries an EMA (under FSDP2
# the EMA is sharded like the weights); then, per world size, which checkpoint loads under which strategy
SAVED = {"zero": False, "fsdp": True, "ddp": True}
LOADS = {2: [("zero", "zero"), ("fsdp", "fsdp"), ("ddp", "fsdp")],  # ddp -> fsdp: a full state into FSDP2
         1: [("zero", "ddp"), ("fsdp", "ddp")]}


def test_sharded_optimizer_state_loads_anywhere(tmp_path, base_overrides):
    """A checkpoint saved under ZeRO-1, FSDP2 or DDP resumes under another strategy and world size with
    every weight, EMA and optimizer tensor equal to the file's (gathered back to a full state)."""
    def ema_on(saved):
        return ["train.ema_decay=0.9"] if SAVED[saved] else []

    ckpt = {saved: tmp_path / saved / "checkpoints/last.pt" for saved in SAVED}
    trainings = [torchrun_cmd(2, *base_overrides, *ema_on(saved), f"dist.strategy={saved}", "train.max_steps=4",
                              f"run.dir={tmp_path / saved}") for saved in SAVED]
    with ThreadPoolExecutor(len(trainings)) as pool:  # side by side: each is mostly start-up
        list(pool.map(run, trainings))
    for saved, path in ckpt.items():
        assert load_checkpoint(path)["strategy"] == saved
    for world, loads in LOADS.items():  # one launch per world size checks all of its loads
        args = []
        for saved, strategy in loads:
            args += ["::", *base_overrides, *ema_on(saved), f"dist.strategy={strategy}", f"run.resume={ckpt[saved]}",
                     f"run.dir={tmp_path / f'{saved}-into-{strategy}{world}'}"]
        out = run([sys.executable, ROUNDTRIP, *args] if world == 1 else torchrun_cmd(2, *args, script=ROUNDTRIP))
        for saved, strategy in loads:
            ema = " with EMA" if SAVED[saved] else ""
            assert f"ROUNDTRIP OK {strategy} world={world} from {saved} world=2{ema}" in out.stdout, out.stdout
