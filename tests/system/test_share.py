"""Sharing a trained model (tiny_model: a real four-step run, whose answers differ from picture to
picture): its ONNX file in OpenCV DNN at batch 4, and used by the recipe in its own metadata.
In-process; here only for the session's trained model."""

import json
from pathlib import Path

import numpy as np

from emotion_dist import cli


def test_opencv_dnn_gives_onnxruntimes_answers_at_batch_4(tiny_model, tiny_data):
    import cv2
    import onnxruntime as ort

    from emotion_dist.inference.predict import OnnxClassifier, read_image

    clf = OnnxClassifier(str(tiny_model.onnx))
    files = sorted((tiny_data / "test").rglob("*.jpg"))[::15][:4]
    x = clf.preprocess([read_image(f) for f in files]).astype(np.float32)
    net = cv2.dnn.readNetFromONNX(str(tiny_model.onnx))
    net.setInput(x)
    got = net.forward()
    ref = ort.InferenceSession(str(tiny_model.onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert got.shape == (4, len(clf.classes)) and np.abs(got - ref).max() < 1e-4
    assert min(np.abs(ref[i] - ref[j]).max() for i in range(4) for j in range(i)) > 1e-4  # four answers


def test_the_recipe_in_the_onnx_metadata_reproduces_predict(tiny_model, tmp_path):
    """Only cv2, numpy, onnx and onnxruntime: what a phone-app author would write from the file."""
    import cv2
    import onnx
    import onnxruntime as ort
    import skimage.data

    photo = Path(skimage.data.__file__).parent / "astronaut.png"
    # the box-crop path of the recipe (a face without landmarks: Haar's); the aligned path needs the
    # landmark template, which the recipe describes in words
    assert cli.main(["predict", "--checkpoint", str(tiny_model.onnx), str(photo), "--detector", "haar",
                     "--json-out", str(tmp_path / "p.json")]) == 0
    face = json.loads((tmp_path / "p.json").read_text())["faces"][0]
    assert face["aligned"] is False
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tiny_model.onnx)).metadata_props}
    recipe, classes = props["emotion_dist.preprocessing"], props["emotion_dist.classes"]
    img = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2GRAY)
    x, y, w, h = face["box"]
    mx, my = int(w * recipe["crop_margin"]), int(h * recipe["crop_margin"])
    crop = img[max(0, y - my): y + h + my, max(0, x - mx): x + w + mx]
    for step in recipe["resize"]:
        inter = cv2.INTER_AREA if step["interpolation"] == "area" else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (step["size"], step["size"]), interpolation=inter)
    t = ((crop.astype(np.float32) / 255 - recipe["mean"][0]) / recipe["std"][0])[None, None].astype(np.float32)
    logits = ort.InferenceSession(str(tiny_model.onnx),
                                  providers=["CPUExecutionProvider"]).run(None, {"images": t})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert classes[int(p.argmax())] == face["label"] and abs(float(p.max()) - face["probability"]) < 1e-5
