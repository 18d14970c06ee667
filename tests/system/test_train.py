"""Real single-process training runs through the launch script."""

import json
import sys

import pytest
import torch
from conftest import assert_same_training_state, run, train_cmd, without

from emotion_dist.modelio import load_checkpoint


@pytest.mark.slow
def test_quickstart_config_clears_its_floor_on_a_held_out_seed(tmp_path):
    """The README's Quick start run (configs/default.yaml) on CPU, on synthetic faces drawn with a
    seed nothing else in the project uses (4242): the default recipe's floor (tools/recipe/README.md) on
    data it was never tuned on, for best.pt's final test pass. At 32 px instead of 64 and on 3,000
    training images instead of 4,000 (a sixth of the compute; one core here): it reached accuracy
    0.843 / macro-F1 0.726 when the floor was set (the recipe before AW1: 0.780 / 0.672), and
    0.910 / 0.784 with 12 epochs and the flip-TTA test pass (E12). Not on 2,000: 290 steps end in the
    early phase, where a small change moves the result by 0.2 either way (tools/recipe/README.md)."""
    proc = run(train_cmd("--config", "configs/default.yaml", "log.pictures=true", "data.synthetic_seed=4242",
                         "data.image_size=32",
                         "data.synthetic_train=3000", "data.synthetic_test=400", f"run.dir={tmp_path}/run",
                         f"run.cache_dir={tmp_path}/cache"), timeout=900)
    run_dir = tmp_path / "run"
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "config.yaml", "curves.png",
                 "confusion_val.png", "confusion_test.png", "data_report.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["type"] == "epoch"]) == 12
    (test,) = [r for r in rows if r["type"] == "test"]
    assert test["accuracy"] >= 0.75 and test["macro_f1"] >= 0.60, test
    assert "launcher python | world size 1 | backend gloo | device cpu" in proc.stdout


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_and_mid_epoch_equals_the_uninterrupted_run(tmp_path, base_overrides,
                                                                              reference_run):
    """One uninterrupted run, and two runs stopped and resumed: at the end of epoch 1 (its LR, best
    and history carry on) and mid-epoch 2 (the sampler's position carries on): both end bit-exact."""
    base = base_overrides
    full, boundary, mid = reference_run, tmp_path / "boundary", tmp_path / "mid"
    # stop exactly at the end of epoch 1 (21 steps of 8 on 167 training images), then resume
    first = run(train_cmd(*base, f"run.dir={boundary}", "train.max_steps=21"))
    assert "epoch 1" in first.stdout and "epoch 2 " not in first.stdout
    state = load_checkpoint(boundary / "checkpoints/last.pt")
    assert state["epoch"] == 1 and state["sampler"]["consumed"] == 0 and state["best_metric"] >= 0
    second = run(train_cmd(*base, f"run.dir={boundary}"))
    assert "resumed from" in second.stdout and "epoch 2" in second.stdout
    a, b = assert_same_training_state(full, boundary)
    assert a["best_metric"] == b["best_metric"] and a["history"][-1]["lr"] == b["history"][-1]["lr"]
    assert [h["epoch"] for h in b["history"]] == [1, 2]

    run(train_cmd(*base, f"run.dir={mid}", "train.max_steps=30"))  # epoch 2, step 9 of 21
    state = load_checkpoint(mid / "checkpoints/last.pt")
    assert state["epoch"] == 1 and state["sampler"]["consumed"] == 9 * 8
    out = run(train_cmd(*base, f"run.dir={mid}"))
    assert "72/167 samples of the epoch done" in out.stdout
    assert_same_training_state(full, mid)


def test_classic_pipeline_trains(tmp_path, fast_overrides):
    run(train_cmd(*fast_overrides, "data.pipeline=classic", "train.epochs=1", "data.num_workers=1"))
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 21
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert not left & {"curves.png", "confusion_val.png", "train_batch.png", "val_errors.png"}  # log.pictures=false


@pytest.mark.slow
def test_init_from_loads_weights_for_a_new_head_and_inspect_reports(tmp_path, fast_overrides, tiny_data,
                                                                    one_epoch_run):
    ckpt = one_epoch_run
    # a 2-class dataset: the backbone loads and the 7-way head's happy and sad rows become the new head
    two = tmp_path / "two"
    for cls in ("happy", "sad"):
        (two / "train" / cls).mkdir(parents=True)
        for _i, f in enumerate(sorted((tiny_data / "train/train" / cls).glob("*.jpg"))[:12]):
            (two / "train" / cls / f.name).write_bytes(f.read_bytes())
    base = without(fast_overrides, "data.root", "run.dir")
    out = run(train_cmd(*base, f"data.root={two}", "model.num_classes=2", f"model.init_from={ckpt}",
                        "train.epochs=1", f"run.dir={tmp_path / 'ft'}"))
    assert "init_from" in out.stdout and "shape mismatch none" in out.stdout
    assert load_checkpoint(tmp_path / "ft/checkpoints/last.pt")["class_names"] == ["happy", "sad"]

    info = run([sys.executable, "-m", "emotion_dist.cli", "ckpt", "inspect",
                str(ckpt), *fast_overrides, "train.epochs=5"])
    assert "global step     21" in info.stdout and "strategy ddp" in info.stdout
    assert "train.epochs: 1 -> 5" in info.stdout


@pytest.mark.slow
def test_resuming_with_other_classes_is_a_clear_error(tmp_path, fast_overrides, tiny_data):
    run(train_cmd(*fast_overrides, "train.max_steps=2"))
    other = tmp_path / "other"
    for cls in ("a", "b"):
        (other / "train" / cls).mkdir(parents=True)
        for f in sorted((tiny_data / "train/train/happy").glob("*.jpg"))[:4]:
            (other / "train" / cls / f.name).write_bytes(f.read_bytes())
    base = without(fast_overrides, "data.root")
    out = run(train_cmd(*base, f"data.root={other}", "model.num_classes=2"), check=False)
    assert out.returncode == 2
    assert "checkpoint classes" in out.stderr and "model.init_from" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fp16_gradscaler_accumulation_class_weights_and_clipping(tmp_path, fast_overrides):
    """... with the recipe's other knobs on (logit adjustment, the augmentation warm-up's half step)."""
    out = run(train_cmd(*fast_overrides, "train.epochs=2", "train.max_steps=16", "train.precision=fp16",
                        "train.grad_accum=2", "train.class_weights=balanced", "train.clip_grad_norm=1.0",
                        "train.logit_adjust=1.0", "train.augment_warmup_epochs=2"))
    assert "precision fp16" in out.stdout and "8 per process x 1 process x 2 accumulation = 16 global" in out.stdout
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["global_step"] == 16  # 167 images / (8 x 2) = 11 optimizer steps per epoch
    scaler = state["scaler_state_dict"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # GradScaler ran and was saved
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values() if v.is_floating_point())


def test_bf16_autocast_on_cpu(tmp_path, fast_overrides):
    out = run(train_cmd(*fast_overrides, "train.max_steps=3", "train.precision=bf16"))
    assert "precision bf16" in out.stdout
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["global_step"] == 3


def test_synthetic_data_cli(tmp_path):
    out = run([sys.executable, "-m", "emotion_dist.cli", "data", "synthetic", "--out", str(tmp_path / "s"),
               "--train", "30", "--test", "14", "--seed", "2"])
    assert "synthetic dataset ready" in out.stdout
    assert len(list((tmp_path / "s/train/train").rglob("*.jpg"))) == 30
    assert len(list((tmp_path / "s/test/test").rglob("*.jpg"))) == 14
