"""The FER protocol end to end: fer2013.csv's PublicTest decides best.pt and PrivateTest is read
once at the end; FER+ label modes train; an FER model initialises an FER+ one through the class mapping;
the balanced sampler resumes mid-epoch exactly; evaluate with ten-crop TTA and an ensemble."""

import json

import pytest
import torch
from conftest import assert_same_training_state, cli_cmd, run, torchrun_cmd, train_cmd
from fer_files import synthetic_fer

from emotion_dist.modelio import load_checkpoint

PER_CLASS = {"Training": 10, "PublicTest": 3, "PrivateTest": 3}  # x 7 emotions: 70 / 21 / 21 rows


@pytest.fixture(scope="module")
def fer_files(tmp_path_factory):
    return synthetic_fer(tmp_path_factory.mktemp("fer"), PER_CLASS)


def _overrides(tmp_path, csv, *extra):
    return [f"data.root={csv}", "data.image_size=32", "train.batch_size=8", "train.channels_last=false",
            "log.every_steps=1", f"run.dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}", *extra]


def _records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_publictest_selects_best_and_privatetest_is_read_once_at_the_end(tmp_path, fer_files):
    csv, _ = fer_files
    run(train_cmd(*_overrides(tmp_path, csv, "train.epochs=3", "train.warmup_epochs=0")))
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "data_report.json").read_text())
    assert (report["train"], report["val"], report["test"]) == (70, 21, 21)  # Training / PublicTest / PrivateTest
    assert report["duplicates"]["pairs"]["train-val"]["exact"]["pairs"] == 0  # audited (data.dedupe=warn)
    records = _records(run_dir)
    epochs = [r for r in records if r["type"] == "epoch"]
    tests = [i for i, r in enumerate(records) if r["type"] == "test"]
    assert len(epochs) == 3 and tests == [len(records) - 1]  # the test split once, after the last epoch
    assert records[-1]["count"] == 21
    f1 = [r["val_macro_f1"] for r in epochs]
    best = load_checkpoint(run_dir / "checkpoints/best.pt")
    assert best["epoch"] == f1.index(max(f1)) + 1  # chosen on PublicTest's macro-F1
    assert best["best_metric"] == max(f1) and best["class_names"][0] == "angry"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["majority", "probability", "crossentropy"])
def test_ferplus_label_modes_train_on_eight_classes(tmp_path, fer_files, mode):
    csv, plus = fer_files
    out = run(train_cmd(*_overrides(tmp_path, csv, f"data.ferplus={plus}", f"data.label_mode={mode}",
                                    "model.num_classes=8", "train.max_steps=3", "train.eval_test=false")))
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["label_mode"] == mode and len(state["class_names"]) == 8 and state["class_names"][-1] == "contempt"
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values() if v.is_floating_point())
    report = json.loads((tmp_path / "run/data_report.json").read_text())
    # every 9th row dropped by FER+, every 11th an `unknown` majority: left out, and counted
    kept = report["train"] + report["val"] + report["test"]
    assert report["excluded"]["dropped by FER+"] > 0 and sum(report["excluded"].values()) + kept == 7 * 16
    assert "launcher python" in out.stdout


@pytest.mark.slow
def test_fer_model_initialises_ferplus_head_by_emotion(tmp_path, fer_files):
    csv, plus = fer_files
    run(train_cmd(*_overrides(tmp_path, csv, "train.max_steps=2", "train.eval_test=false")))
    fer_ckpt = tmp_path / "run/checkpoints/last.pt"
    ft = tmp_path / "ft"
    run(train_cmd(*_overrides(ft, csv, f"data.ferplus={plus}", "model.num_classes=8", f"model.init_from={fer_ckpt}",
                              "train.max_steps=1", "train.lr=1e-12", "train.eval_test=false", "train.ema_decay=0")))
    fer, ferplus = load_checkpoint(fer_ckpt), load_checkpoint(ft / "run/checkpoints/last.pt")
    w, w8 = fer["model_state_dict"]["classify.linear.weight"], ferplus["model_state_dict"]["classify.linear.weight"]
    for fer_name, plus_name in (("angry", "anger"), ("happy", "happiness"), ("neutral", "neutral")):
        i, j = fer["class_names"].index(fer_name), ferplus["class_names"].index(plus_name)
        assert torch.allclose(w[i], w8[j], atol=1e-6), (fer_name, plus_name)


def _sampler_ids(run_dir, epoch):
    ids = []
    for f in sorted(run_dir.glob("sample_ids.rank*.jsonl")):
        ids += [i for r in map(json.loads, f.read_text().splitlines()) if r["epoch"] == epoch for i in r["ids"]]
    return ids


@pytest.mark.slow
# world 1 is the same sampler code: tests/unit/test_readers_fer.py resumes it in-process
@pytest.mark.parametrize("world", [2])
def test_balanced_sampler_resumes_mid_epoch_exactly(tmp_path, fer_files, world):
    csv, _ = fer_files

    def args(d, *x):
        return _overrides(d, csv, "train.sampler=balanced", "train.epochs=2", "train.eval_test=false", *x)

    launch = (lambda *a: train_cmd(*a)) if world == 1 else (lambda *a: torchrun_cmd(2, *a))
    run(launch(*args(tmp_path / "full")))
    per_epoch = -(-70 // (8 * world))
    run(launch(*args(tmp_path / "split", f"train.max_steps={per_epoch + 2}")))  # epoch 2, mid-way
    assert load_checkpoint(tmp_path / "split/run/checkpoints/last.pt")["sampler"]["consumed"] > 0
    run(launch(*args(tmp_path / "split")))
    assert_same_training_state(tmp_path / "full/run", tmp_path / "split/run")


@pytest.mark.slow
def test_evaluate_tencrop_and_an_ensemble_of_two_seeds(tmp_path, fer_files):
    csv, _ = fer_files
    for seed in (0, 1):
        run(train_cmd(*_overrides(tmp_path / f"s{seed}", csv, "train.max_steps=4", f"train.seed={seed}",
                                  "train.eval_test=false")))
    a, b = (tmp_path / f"s{s}/run/checkpoints/last.pt" for s in (0, 1))
    common = ["evaluate", "--checkpoint", str(a), f"run.cache_dir={tmp_path / 'cache'}", "--json"]
    one = json.loads(run(cli_cmd(*common, "--tta", "tencrop")).stdout)
    both = json.loads(run(cli_cmd(*common, "--checkpoint", str(b))).stdout)
    assert one["tta"] == "tencrop" and "10 views" in one["tta_views"] and one["count"] == 21
    assert both["models"] == 2 and both["checkpoint"] == [str(a), str(b)] and both["count"] == 21
