"""An ONNX export used as a stranger would: class names and the preprocessing recipe from the
file's own metadata, and OpenCV DNN at batch 4 (tests/system/test_share.py repeats both on a trained
model, whose answers differ from picture to picture, and follows the recipe by hand)."""

import json

import numpy as np
import pytest
from conftest import write_checkpoint

from emotion_dist import cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("standalone")
    ckpt = write_checkpoint(d / "model.pt", image_size=64, seed=2)  # 64 px: both attention blocks reshape
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(d / "model.onnx")]) == 0
    return d / "model.onnx"


def test_the_onnx_file_carries_classes_and_the_preprocessing_recipe(exported):
    from emotion_dist.inference.standalone import read_metadata

    meta = read_metadata(exported)
    assert meta["classes"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    recipe = meta["preprocessing"]
    assert recipe["crop_margin"] == 0.15 and [r["size"] for r in recipe["resize"]] == [64, 64]
    assert recipe["mean"] == [0.449] and recipe["channel_order"].startswith("gray")
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["preprocessing"] == recipe


def test_opencv_dnn_runs_the_graph_at_batch_4_as_onnxruntime_does(exported):
    import cv2
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((4, 1, 64, 64)).astype(np.float32)
    net = cv2.dnn.readNetFromONNX(str(exported))
    net.setInput(x)
    got = net.forward()
    ref = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert got.shape == (4, 7)
    assert np.abs(got - ref).max() < 1e-4
