"""Using a trained model: metrics, plots, evaluate, predict on real photos, export, wandb."""

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import built_once, run, train_cmd
from PIL import Image

from emotion_dist.training.metrics import summarize

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent


def test_metrics_match_a_hand_computation():
    # rows = true, cols = predicted; 3 classes
    cm = np.array([[3, 1, 0],
                   [0, 2, 2],
                   [0, 0, 0]])
    m = summarize(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    pa, ra = 3 / 3, 3 / 4
    pb, rb = 2 / 3, 2 / 4
    fa, fb = 2 * pa * ra / (pa + ra), 2 * pb * rb / (pb + rb)
    assert m["per_class"]["a"] == pytest.approx({"precision": pa, "recall": ra, "f1": fa, "support": 4})
    assert m["per_class"]["b"] == pytest.approx({"precision": pb, "recall": rb, "f1": fb, "support": 4})
    assert m["per_class"]["c"]["precision"] == 0.0  # predicted twice, never right
    assert m["macro_f1"] == pytest.approx((fa + fb) / 2)  # classes without support are left out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """One epoch with pictures and an offline W&B run, trained once for all workers (read-only)."""
    return built_once(tmp_path_factory, "use_trained", lambda d: run(train_cmd(
        "data.source=folder", f"data.root={tiny_data}", "data.image_size=32", "train.batch_size=16",
        "train.epochs=1", f"run.dir={d}/run", f"run.cache_dir={d}/cache", "log.wandb=offline",
        "log.pictures=true", "log.wandb_artifact=true", "train.eval_test=false")))


def _png_ok(path: Path, min_side=300):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and min(img.size) >= min_side, (path, img.size)


def test_training_leaves_curves_confusion_and_a_wandb_run(trained):
    run_dir = trained / "run"
    for name in ("curves.png", "confusion_val.png", "train_batch.png", "val_errors.png"):
        _png_ok(run_dir / name)
    assert Image.open(run_dir / "curves.png").size[0] >= 1500  # four panels: loss, accuracy, macro-F1, lr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (per_class,) = [r for r in records if r["type"] == "val_classes"]
    assert per_class["epoch"] == 1 and 0 <= per_class["happy_f1"] <= 1 and "angry_recall" in per_class
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    log_bytes = (offline / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train_batch", b"val_errors", b"confusion_val", b"val_classes/happy_f1"):
        assert key in log_bytes, key  # the pictures and the per-class figures went to W&B too
    # the best checkpoint went in as a model artifact: its name and the file's md5 are in the run's log
    log = (offline / f"run-{run_id}.wandb").read_bytes()
    md5 = base64.b64encode(hashlib.md5((run_dir / "checkpoints/best.pt").read_bytes()).digest())
    assert f"emotionnet-{run_id}".encode() in log and md5 in log


def test_wandb_run_id_is_reused_after_resume(trained, tiny_data, tmp_path):
    run_dir = tmp_path / "run"  # a copy: the trained run is shared by the other tests
    shutil.copytree(trained / "run", run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text()
    run(train_cmd("data.source=folder", f"data.root={tiny_data}", "data.image_size=32", "train.batch_size=16",
                  "train.epochs=2", f"run.dir={run_dir}", f"run.cache_dir={trained}/cache", "log.wandb=offline"))
    assert (run_dir / "wandb_id.txt").read_text() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # same id, two sessions
    _png_ok(run_dir / "confusion_test.png")


def test_evaluate_json_table_png_and_tta(trained, tmp_path):
    ckpt = trained / "run/checkpoints/last.pt"
    out = run([sys.executable, "-m", "emotion_dist.cli", "evaluate", "--checkpoint", str(ckpt), "--tta",
               "--json-out", str(tmp_path / "r.json"), "--out", str(tmp_path), f"run.cache_dir={trained}/cache"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["split"] == "test" and report["count"] == 63 and report["tta"] == "flip"  # a bare --tta is flip
    assert set(report["per_class"]) == {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}
    assert "macro-F1" in out.stdout and "precision" in out.stdout
    _png_ok(tmp_path / "confusion_test.png")


def _cli(*args, check=True):
    return run([sys.executable, "-m", "emotion_dist.cli", *args], check=check)


def test_predict_finds_the_face_in_a_real_photo_and_none_in_a_cup(trained, tmp_path):
    ckpt = trained / "run/checkpoints/last.pt"
    out = _cli("predict", "--checkpoint", str(ckpt), str(PHOTOS / "astronaut.png"), str(PHOTOS / "coffee.png"),
               "--json", "--out", str(tmp_path / "ann"))
    result = json.loads(out.stdout)
    (face,) = result["faces"]
    x, y, w, h = face["box"]
    assert face["file"].endswith("astronaut.png") and abs(x - 177) < 15 and abs(y - 66) < 15 and 80 < w < 110
    assert face["label"] in face["probabilities"] and abs(sum(face["probabilities"].values()) - 1) < 1e-4
    assert result["messages"] == [f"{PHOTOS / 'coffee.png'}: no face found "
                                  "(use --no-detect for images that are already face crops)"]
    annotated = Image.open(tmp_path / "ann" / "astronaut_pred.png")
    assert annotated.size == (512, 512)


def test_predict_survives_odd_files(trained, tmp_path):
    ckpt = trained / "run/checkpoints/last.pt"
    d = tmp_path / "odd"
    d.mkdir()
    astro = np.asarray(Image.open(PHOTOS / "astronaut.png").convert("RGB"))
    Image.fromarray(astro).convert("L").save(d / "gray.png")
    Image.fromarray(np.dstack([astro, np.full(astro.shape[:2], 255, np.uint8)]), "RGBA").save(d / "rgba.png")
    Image.fromarray((np.asarray(Image.fromarray(astro).convert("L"), np.uint16) * 257)).save(d / "deep16.png")
    Image.fromarray(np.asarray(Image.fromarray(astro).resize((4096, 4096)))).save(d / "huge.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = _cli("predict", "--checkpoint", str(ckpt), str(d), "--json")
    result = json.loads(out.stdout)
    assert sorted(Path(f["file"]).name for f in result["faces"]) == ["deep16.png", "gray.png", "huge.png", "rgba.png"]
    huge = next(f for f in result["faces"] if f["file"].endswith("huge.png"))
    assert abs(huge["box"][0] - 177 * 8) < 120  # found downscaled, reported in original pixels
    assert result["messages"] == [f"{d / 'broken.jpg'}: unreadable (not an image, truncated or unsupported format)"]


def test_no_detect_on_face_crops(trained, tiny_data):
    ckpt = trained / "run/checkpoints/last.pt"
    crops = sorted((tiny_data / "test/test/happy").glob("*.jpg"))[:3]
    out = _cli("predict", "--checkpoint", str(ckpt), "--no-detect", *map(str, crops), "--json")
    faces = json.loads(out.stdout)["faces"]
    assert [f["box"] for f in faces] == [[0, 0, 48, 48]] * 3


def test_onnx_export_parity_and_predict_equals_pt(trained, tmp_path):
    ckpt = trained / "run/checkpoints/last.pt"
    _cli("export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["onnx_max_abs_diff"] <= 1e-4 and meta["image_size"] == 32 and meta["in_channels"] == 1
    args = [str(PHOTOS / "astronaut.png"), "--json"]
    pt = json.loads(_cli("predict", "--checkpoint", str(ckpt), *args).stdout)["faces"]
    ox = json.loads(_cli("predict", "--checkpoint", str(tmp_path / "m.onnx"), *args).stdout)["faces"]
    assert [f["label"] for f in pt] == [f["label"] for f in ox] and [f["box"] for f in pt] == [f["box"] for f in ox]
    for a, b in zip(pt, ox):
        assert all(abs(a["probabilities"][c] - b["probabilities"][c]) < 1e-4 for c in a["probabilities"])


def test_onnx_predict_needs_no_torch(trained, tmp_path):
    ckpt = trained / "run/checkpoints/last.pt"
    _cli("export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('torch is blocked')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from emotion_dist.inference.predict import load_classifier, predict\n"
            f"faces, _ = predict(load_classifier({str(tmp_path / 'm.onnx')!r}), [{str(PHOTOS / 'astronaut.png')!r}])\n"
            "print(len(faces), 'torch' in sys.modules)")
    out = run([sys.executable, "-c", code])
    assert out.stdout.split() == ["1", "False"]


def test_safetensors_export_loads_without_this_repo_format(trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    from emotion_dist.model import EmotionNet
    from emotion_dist.modelio import load_checkpoint

    ckpt = trained / "run/checkpoints/last.pt"
    _cli("export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors"))
    weights = load_file(str(tmp_path / "w.safetensors"))
    meta = json.loads((tmp_path / "w.json").read_text())
    model = EmotionNet(meta["in_channels"], len(meta["classes"]))
    model.load_state_dict(weights)
    saved = load_checkpoint(ckpt)["model_state_dict"]
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
