"""predict on still images, hardened: one JSON document on stdout, results printed as each file is
done, any file name the OS allows, guarded outputs, and one line for every bad model file."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run
from PIL import Image

from emotion_dist import cli
from emotion_dist.inference.predict import NO_FACE, UNREADABLE, png_written_by_us

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent
ODD = b"f\xff.png"  # not valid UTF-8: cv2.imread segfaulted on it


def _predict(*args, check=True):
    return run([sys.executable, "-m", "emotion_dist.cli", "predict", *map(os.fspath, args)], check=check)


@pytest.fixture
def photos(tmp_path):
    """astronaut (a face), coffee (none), a broken JPEG, and the astronaut under a non-UTF-8 name."""
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(PHOTOS / "astronaut.png", d / "astronaut.png")
    shutil.copy(PHOTOS / "coffee.png", d / "coffee.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    shutil.copy(PHOTOS / "astronaut.png", os.path.join(os.fsencode(d), ODD))
    return d


def test_json_is_one_document_and_odd_names_work(tiny_model, photos, tmp_path):
    out = _predict("--checkpoint", tiny_model.pt, photos, "--json", "--json-out", tmp_path / "r.json",
                   "--out", tmp_path / "ann")
    document = json.loads(out.stdout)  # the whole of stdout: one JSON document, nothing else
    assert json.loads((tmp_path / "r.json").read_text()) == document
    assert sorted(Path(f["file"]).name for f in document["faces"]) == ["astronaut.png", "f\\xff.png"]
    assert document["messages"] == [f"{photos / 'broken.jpg'}: {UNREADABLE}", f"{photos / 'coffee.png'}: {NO_FACE}"]
    assert out.stderr.splitlines() == document["messages"]  # as they happened, on stderr
    annotated = os.path.join(os.fsencode(tmp_path / "ann"), b"f\xff_pred.png")
    assert png_written_by_us(Path(os.fsdecode(annotated))) and png_written_by_us(tmp_path / "ann/astronaut_pred.png")

    # human lines, the exact command that segfaulted, an ONNX model under a .pt name, and a re-run
    # that replaces its own outputs (the annotated copies, the JSON file)
    shutil.copy(tiny_model.onnx, tmp_path / "exported.pt")
    shutil.copy(tiny_model.onnx.with_suffix(".json"), tmp_path / "exported.json")
    human = _predict("--checkpoint", tmp_path / "exported.pt", "--no-detect", photos, "--out", tmp_path / "ann",
                     "--json-out", tmp_path / "r.json")
    lines = human.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(photos / n) for n in ("astronaut.png", "coffee.png",
                                                                                  "f\\xff.png")]
    assert [line.split("  ")[1] for line in lines] == ["box=(0,0,512,512)", "box=(0,0,600,400)", "box=(0,0,512,512)"]
    assert human.stderr.splitlines() == [f"{photos / 'broken.jpg'}: {UNREADABLE}"]
    assert len(json.loads((tmp_path / "r.json").read_text())["faces"]) == 3


def test_image_and_model_errors_are_one_line(tiny_model, photos, tmp_path, capfd):
    pt, onnx = str(tiny_model.pt), tiny_model.onnx
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trunc.onnx").write_bytes(onnx.read_bytes()[:100_000])
    shutil.copy(onnx.with_suffix(".json"), bad / "trunc.json")
    shutil.copy(onnx, bad / "nosidecar.onnx")
    shutil.copy(onnx, bad / "brokenjson.onnx")
    (bad / "brokenjson.json").write_text('{"classes": [')
    shutil.copy(onnx, bad / "fewkeys.onnx")
    (bad / "fewkeys.json").write_text('{"classes": ["a"]}')
    (bad / "notes.pt").write_text("my notes\n")
    Image.open(PHOTOS / "astronaut.png").convert("RGB").save(bad / "photo.pt", "JPEG")
    (bad / "empty.pt").write_bytes(b"")
    (bad / "afile").write_text("x")
    (bad / "foreign.json").write_text('{"mine": 1}\n')
    (tmp_path / "ann").mkdir()
    Image.open(PHOTOS / "astronaut.png").save(tmp_path / "ann/astronaut_pred.png")  # not predict's
    astro = str(photos / "astronaut.png")
    cases = {
        (str(bad / "trunc.onnx"), astro): "is not a loadable ONNX model",
        (str(bad / "nosidecar.onnx"), astro): "nosidecar.json (classes, sizes) is missing",
        (str(bad / "brokenjson.onnx"), astro): "brokenjson.json is not readable JSON",
        (str(bad / "fewkeys.onnx"), astro): "fewkeys.json lacks image_size, data_size, in_channels, normalization",
        (str(bad / "notes.pt"), astro): "is a text file, not a model",
        (str(bad / "photo.pt"), astro): "is a JPEG image, not a model",
        (str(bad / "empty.pt"), astro): "is an empty file, not a model",
        (str(bad), astro): "is a folder",
        (str(bad / "missing.pt"), astro): "does not exist",
        (pt, astro, "--out", str(bad / "afile")): "is a file; for images --out is a folder",
        (pt, astro, "--out", str(tmp_path / "ann")): "not written by emotion-dist",
        (pt, astro, "--json-out", str(bad / "foreign.json")): "not written by emotion-dist",
        (pt, astro, "--json-out", str(onnx.with_suffix(".json"))): "not written by emotion-dist",
        (pt, astro, "--json-out", str(bad / "r.jsonl")): "does not end in .json",
        (pt, astro, "--csv", str(bad / "r.csv")): "--csv: only for a video",
    }
    for (model, *rest), expected in cases.items():
        assert cli.main(["predict", "--checkpoint", model, *rest]) == 2, rest
        out, err = capfd.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, (model, rest, err)
        if model.endswith(".onnx"):
            assert "re-run emotion-dist export" in err
    assert not (bad / "r.jsonl").exists() and not (bad / "r.csv").exists()
    assert not png_written_by_us(tmp_path / "ann/astronaut_pred.png")  # left as it was
