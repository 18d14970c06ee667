"""Grad-CAM overlays: predict --cam on the astronaut (one face) and evaluate --cam N on test images."""

import json
from pathlib import Path

import numpy as np
import pytest
from lively import lively_checkpoint

from emotion_dist import cli


def astronaut() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    return lively_checkpoint(tmp_path_factory.mktemp("cam") / "best.pt", image_size=64, seed=1)


def test_predict_cam_writes_overlays_whose_map_fits_the_crop(model_pt, tmp_path):
    from emotion_dist.config import FaceCrop
    from emotion_dist.inference import cam
    from emotion_dist.inference.predict import TorchClassifier, read_image

    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", str(model_pt), str(astronaut()), "--out", str(out), "--cam",
                     "--json-out", str(tmp_path / "p.json")]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["cam"]["layer"] == "backbone.6" and len(doc["faces"]) == 1
    assert {Path(f).name for f in doc["cam"]["files"]} == {"astronaut_face1_cam.png", "astronaut_cam.png"}
    assert all(Path(f).is_file() for f in doc["cam"]["files"])

    img = read_image(astronaut())
    box = doc["faces"][0]["box"]
    [face] = cam.face_cams(TorchClassifier(str(model_pt)), img, [box], layer="backbone.6", margin=FaceCrop().margin)
    assert face["cam"].shape == face["crop"].shape[:2]  # the map at the crop's own size
    assert face["cam"].max() > face["cam"].min()  # a map, not a constant
    from PIL import Image

    assert Image.open(out / "astronaut_face1_cam.png").size == face["crop"].shape[1::-1]
    assert Image.open(out / "astronaut_cam.png").size == img.shape[1::-1]
    full = cam.photo_map(img.shape, [(face["box"], face["cam"])])
    y, x = np.unravel_index(full.argmax(), full.shape)
    x0, y0, x1, y1 = face["box"]  # the detected face box widened by predict's margin: what the model saw
    assert x0 <= x < x1 and y0 <= y < y1
    assert full[:y0].max() == 0 and full[y1:].max() == 0  # nothing outside the face


def test_cam_layer_is_a_setting_and_a_wrong_one_is_one_line(model_pt, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", str(model_pt), str(astronaut()), "--out", str(out), "--cam",
                     "--cam-layer", "backbone.4", "--json", ]) == 0
    assert json.loads(capsys.readouterr().out)["cam"]["layer"] == "backbone.4"
    assert cli.main(["predict", "--checkpoint", str(model_pt), str(astronaut()), "--out", str(out), "--cam",
                     "--cam-layer", "backbone.99"]) == 2
    err = capsys.readouterr().err
    assert "backbone.99" in err and "backbone.6" in err


def test_cam_on_an_onnx_model_or_without_out_is_refused(unit_checkpoint, tmp_path, capsys):
    assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), str(astronaut()), "--cam"]) == 2
    assert "--out" in capsys.readouterr().err
    onnx = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(unit_checkpoint), "--format", "onnx", "--out", str(onnx)]) == 0
    assert cli.main(["predict", "--checkpoint", str(onnx), str(astronaut()), "--out", str(tmp_path / "o"),
                     "--cam"]) == 2
    assert "ONNX" in capsys.readouterr().err


def test_evaluate_cam_writes_right_and_wrong_per_class(tiny_data, tmp_path):
    from emotion_dist.config import Config

    cfg = Config()
    cfg.data.source, cfg.data.root, cfg.data.image_size = "folder", str(tiny_data), 32
    cfg.run.cache_dir = str(tmp_path / "cache")
    ckpt = lively_checkpoint(tmp_path / "run/checkpoints/best.pt", image_size=32, config=cfg.to_dict())
    report = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--cam", "1", "--json-out", str(report),
                     "--out", str(tmp_path / "eval")]) == 0
    doc = json.loads(report.read_text())
    assert doc["cam"]["layer"] == "backbone.6" and doc["cam"]["per_class"] == 1
    names = sorted(Path(f).name for f in doc["cam"]["files"])
    assert names == sorted(f"cam_{c}.png" for c in doc["per_class"])
    assert all(Path(f).stat().st_size > 1000 for f in doc["cam"]["files"])
