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


def test_predict_cam_explains_the_aligned_crop_and_maps_it_back_onto_the_photo(model_pt, tmp_path):
    from PIL import Image

    from emotion_dist.inference import cam
    from emotion_dist.inference.pipeline import classify_faces
    from emotion_dist.inference.predict import Face, TorchClassifier, read_image

    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", str(model_pt), str(astronaut()), "--out", str(out), "--cam",
                     "--json-out", str(tmp_path / "p.json")]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["cam"]["layer"] == "backbone.6" and len(doc["faces"]) == 1
    assert {Path(f).name for f in doc["cam"]["files"]} == {"astronaut_face1_cam.png", "astronaut_cam.png"}
    assert all(Path(f).is_file() for f in doc["cam"]["files"])

    img = read_image(astronaut())
    record = doc["faces"][0]
    assert record["aligned"] is True  # RetinaFace's landmarks: the model saw the aligned crop
    classifier = TorchClassifier(str(model_pt))
    [face] = cam.face_cams(classifier, img, [Face(**record)], layer="backbone.6")
    assert face["aligned"] and face["label"] == record["label"]  # the map explains the answer predict gave
    p = classifier.probabilities([face["crop"]])[0]
    assert abs(float(p.max()) - record["probability"]) < 1e-3  # the crop is the one predict classified
    assert face["cam"].shape == face["crop"].shape[:2] and face["cam"].max() > face["cam"].min()
    assert Image.open(out / "astronaut_face1_cam.png").size == face["crop"].shape[1::-1]
    assert Image.open(out / "astronaut_cam.png").size == img.shape[1::-1]

    full = cam.photo_map(img.shape, [face])
    ys, xs = np.nonzero(full)
    x, y, w, h = record["box"]
    assert x - w // 2 <= xs.min() and xs.max() <= x + w + w // 2  # mapped back around her face, nowhere else
    assert y - h // 2 <= ys.min() and ys.max() <= y + h + h // 2
    # the template's centre in the crop maps back onto the landmarks' centre in the photo (a
    # least-squares similarity takes one centroid exactly to the other)
    from emotion_dist.inference.align import template
    from emotion_dist.inference.pipeline import geometry_of

    side = face["crop"].shape[0]
    centre = np.r_[template(geometry_of(classifier)).mean(0) * side, 1.0] @ face["to_photo"].T
    assert np.abs(centre - np.asarray(record["landmarks"]).mean(0)).max() < 0.5

    # without alignment: the box crop, mapped back by its offset, and zero outside it
    [plain] = classify_faces(classifier, img, align=False)
    [box_face] = cam.face_cams(classifier, img, [Face(file="a", **plain)], layer="backbone.6")
    assert not box_face["aligned"] and box_face["label"] == plain["label"]
    full = cam.photo_map(img.shape, [box_face])
    ox, oy = (int(v) for v in box_face["to_photo"][:, 2])
    ch, cw = box_face["crop"].shape[:2]
    assert full[:oy].max() == 0 and full[oy + ch:].max() == 0 and full[:, :ox].max() == 0
    assert full[oy:oy + ch, ox:ox + cw].max() > 0


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


@pytest.mark.slow
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
