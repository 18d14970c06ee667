"""The ONNX-only path with the default face detector, in a real process: `predict --checkpoint
model.onnx` finds the astronaut's face with RetinaFace, aligns it by its landmarks, and never
imports torch."""

import json
import sys
from pathlib import Path

import pytest
from conftest import run

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent


def test_onnx_predict_with_retinaface_imports_no_torch(tiny_model, tmp_path):
    code = ("import contextlib, io, json, sys\n"
            "from emotion_dist import cli\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    rc = cli.main(['predict', '--checkpoint', {str(tiny_model.onnx)!r},"
            f" {str(PHOTOS / 'astronaut.png')!r}, '--json'])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'doc': json.loads(out.getvalue())}))\n")
    result = json.loads(run([sys.executable, "-c", code]).stdout)
    assert result["rc"] == 0 and result["torch"] is False
    (face,) = result["doc"]["faces"]
    assert face["aligned"] is True and len(face["landmarks"]) == 5 and face["score"] > 0.9


def test_onnx_sidecar_carries_the_crop_geometry_and_a_bad_one_is_one_line(tiny_model, tmp_path):
    import shutil

    sidecar = json.loads(tiny_model.onnx.with_suffix(".json").read_text())
    assert sidecar["face_crop"] == {"margin": 0.15, "eye_y": 0.4, "eye_distance": 0.35}  # the run's data.face_crop
    onnx = tmp_path / "m.onnx"
    shutil.copy(tiny_model.onnx, onnx)
    sidecar["face_crop"] = {"eye_y": "high"}
    onnx.with_suffix(".json").write_text(json.dumps(sidecar))
    out = run([sys.executable, "-m", "emotion_dist.cli", "predict", "--checkpoint", str(onnx),
               str(PHOTOS / "astronaut.png")], check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "face_crop: eye_y='high' is not a number" in out.stderr
