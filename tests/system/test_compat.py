"""A checkpoint written before the checkpointer was split into registered components (format 1,
commit 4051c8d; tests/fixtures/README.md) still inspects, evaluates, exports and resumes today."""

import json
import lzma
import shutil
import sys

import pytest
from conftest import ROOT, run, train_cmd

from emotion_dist.data.readers.synthetic import generate
from emotion_dist.modelio import load_checkpoint

FIXTURE = ROOT / "tests/fixtures/main-4051c8d-last.pt.xz"


@pytest.mark.slow
def test_a_checkpoint_from_before_loads_evaluates_exports_and_resumes(tmp_path):
    generate(tmp_path / "data", 60, 14, seed=11)  # the data it was trained on (fixtures/README.md)
    ckpt = tmp_path / "run/checkpoints/last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(lzma.decompress(FIXTURE.read_bytes()))
    old = load_checkpoint(ckpt)  # weights_only=True
    assert old["global_step"] == 8 and old["epoch"] == 1
    cli = [sys.executable, "-m", "emotion_dist.cli"]

    info = run([*cli, "ckpt", "inspect", str(ckpt)]).stdout
    assert "global step     8" in info

    kept = tmp_path / "kept.pt"
    shutil.copy2(ckpt, kept)  # evaluate and export read it; resume below writes the run's own last.pt
    run([*cli, "evaluate", "--checkpoint", str(kept), "--split", "test", f"data.root={tmp_path / 'data'}",
         "data.source=folder", f"run.cache_dir={tmp_path / 'cache'}", "--json-out", str(tmp_path / "eval.json"),
         "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["count"] == 14 and 0.0 <= report["accuracy"] <= 1.0

    run([*cli, "export", "--checkpoint", str(kept), "--format", "safetensors",
         "--out", str(tmp_path / "m.safetensors")])
    assert (tmp_path / "m.safetensors").stat().st_size > 100_000

    out = run(train_cmd("data.source=folder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
                        "data.val_fraction=0.2", "train.batch_size=8", "train.epochs=2", "train.eval_test=false",
                        f"run.dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}",
                        "train.channels_last=false")).stdout
    assert "resumed from" in out and "epoch 2, step 8" in out, out[-2000:]
    new = load_checkpoint(ckpt)
    assert new["epoch"] == 2 and new["global_step"] == 12  # the rest of epoch 2: 6 steps per epoch
    assert kept.read_bytes() == lzma.decompress(FIXTURE.read_bytes())  # nothing wrote to the user's copy
