"""The demo's JSON API in-process (Starlette's TestClient, the real app and a real checkpoint):
photos with and without a face, bad uploads (text, oversized, truncated, decompression bomb), the
model metadata, the offline docs, --save, and concurrent requests."""

from __future__ import annotations

import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the demo extra is not installed (pip install -e '.[demo]')")

from fastapi.testclient import TestClient  # noqa: E402

from emotion_dist.errors import CheckpointError, ConfigError  # noqa: E402
from emotion_dist.inference.demo import app as demo  # noqa: E402
from emotion_dist.inference.predict import FaceSource, load_classifier, read_image  # noqa: E402

PHOTOS = Path(__import__("skimage.data", fromlist=["data"]).__file__).parent
ASTRONAUT = PHOTOS / "astronaut.png"
COFFEE = PHOTOS / "coffee.png"


@pytest.fixture(scope="module")
def client(unit_checkpoint):
    # raise_server_exceptions=False: a 500 is answered as a server would, so a test sees it as a status
    with TestClient(demo.create_app(unit_checkpoint), raise_server_exceptions=False) as c:
        yield c


def post(client, name: str, data: bytes, mime: str = "image/png"):
    return client.post("/api/predict", files={"file": (name, data, mime)})


def assert_one_line_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message and message
    for w in words:
        assert w in message, message
    return message


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def claimed_png(width: int, height: int) -> bytes:
    """A small valid-looking PNG whose header claims width x height gray pixels (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b""))


def test_astronaut_gets_predicts_json_document(client, unit_checkpoint):
    r = post(client, "astronaut.png", ASTRONAUT.read_bytes())
    assert r.status_code == 200, r.text
    doc = r.json()
    # the same document predict --json prints for this file, through the same pipeline
    classifier = load_classifier(str(unit_checkpoint))
    records = FaceSource().faces(classifier, ASTRONAUT, read_image(ASTRONAUT))
    assert doc["emotion_dist"] == "predict" and doc["messages"] == []
    assert [f["box"] for f in doc["faces"]] == [r["box"] for r in records] and len(records) == 1
    face = doc["faces"][0]
    assert face["file"] == "astronaut.png" and face["aligned"] is True and len(face["landmarks"]) == 5
    expected = records[0]
    assert face["label"] == expected["label"] and face["probabilities"] == expected["probabilities"]
    assert face["probability"] == pytest.approx(expected["probability"])
    x, y, w, h = face["box"]
    assert 150 < x < 220 and 40 < y < 110 and 60 < w < 140  # her face, not the suit or the flag
    assert sorted(face["probabilities"]) == sorted(client.get("/api/model").json()["classes"])


def test_photo_without_a_face_is_an_empty_document(client):
    r = post(client, "coffee.png", COFFEE.read_bytes())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["faces"] == [] and len(doc["messages"]) == 1 and "no face found" in doc["messages"][0]


def test_text_file_is_415(client):
    assert_one_line_error(post(client, "notes.txt", b"just some text\n" * 20, "text/plain"), 415, "not an image")


def test_truncated_png_is_422(client):
    data = ASTRONAUT.read_bytes()
    assert_one_line_error(post(client, "cut.png", data[: len(data) // 3]), 422, "truncated")


@pytest.mark.parametrize("side", [8000, 100_000])  # over the demo's 50 MP; over PIL's own bomb limit too
def test_decompression_bomb_is_413_without_decoding(client, side):
    data = claimed_png(side, side)
    assert len(data) < 1000
    assert_one_line_error(post(client, "bomb.png", data), 413, "megapixels")


def test_oversized_upload_is_413(unit_checkpoint):
    with TestClient(demo.create_app(unit_checkpoint, max_upload_mb=0.5)) as c:
        big = ASTRONAUT.read_bytes()  # 0.75 MB
        assert len(big) > 0.5 * demo.MB
        assert_one_line_error(post(c, "astronaut.png", big), 413, "0.5 MB")

        def chunks():  # no Content-Length: counted as the bytes arrive
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(20):
                yield b"\0" * 65536
        r = c.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.request.headers.get("content-length") is None
        assert_one_line_error(r, 413, "--max-upload-mb")
        small = COFFEE.read_bytes()
        assert len(small) < 0.5 * demo.MB and post(c, "coffee.png", small).status_code == 200


def test_not_a_form_and_no_file_field_are_4xx(client):
    assert_one_line_error(client.post("/api/predict", content=b"\x89PNG", headers={"content-type": "image/png"}),
                          415, "multipart")
    assert_one_line_error(client.post("/api/predict", data={"other": "1"}, files={"x": ("a.png", b"1")}), 400, "file")
    assert_one_line_error(post(client, "empty.png", b""), 400, "empty")


def test_model_metadata_and_health(client, unit_checkpoint):
    m = client.get("/api/model").json()
    assert m["classes"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert m["format"] == "pytorch" and m["name"] == unit_checkpoint.name and "RetinaFace" in m["detector"]
    assert m["metrics"] == {"test": None, "best_val_macro_f1": None, "best_epoch": None}
    assert client.get("/healthz").json() == {"status": "ok"}


def test_metrics_the_run_recorded(tmp_path, unit_checkpoint):  # unit_checkpoint: torch imported first
    from conftest import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run7/checkpoints/best.pt", best_metric=0.61, best_epoch=4)
    (tmp_path / "run7/metrics.jsonl").write_text(
        json.dumps({"type": "train", "step": 1, "loss": 1.0}) + "\n{torn line\n"
        + json.dumps({"type": "test", "step": 9, "checkpoint": "best.pt", "tta": "none", "loss": 1.1,
                      "accuracy": 0.64, "macro_f1": 0.58, "count": 700}) + "\n")
    m = demo.load_demo_model(ckpt).info
    assert m["name"] == "run7/best.pt"
    assert m["metrics"] == {"test": {"accuracy": 0.64, "macro_f1": 0.58, "count": 700, "checkpoint": "best.pt",
                                     "tta": "none"}, "best_val_macro_f1": 0.61, "best_epoch": 4}


def test_bad_model_paths_are_one_line(tmp_path, unit_checkpoint):
    from conftest import write_checkpoint

    fresh = write_checkpoint(tmp_path / "fresh/checkpoints/last.pt", best_metric=-1.0, best_epoch=0)
    assert demo.load_demo_model(fresh).info["metrics"]["best_val_macro_f1"] is None  # no validation yet
    with pytest.raises(CheckpointError, match="is a folder"):
        demo.create_app(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="a text file, not a model"):
        demo.create_app(tmp_path / "notes.txt")


def test_page_and_docs_load_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    for asset in ("/static/demo.js", "/static/demo.css"):
        assert asset in html and client.get(asset).status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    static = Path(demo.STATIC)
    for text in [html, docs.text, *(p.read_text() for p in static.iterdir())]:
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/model", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"]


def test_nothing_written_without_save_and_uploads_kept_with_it(unit_checkpoint, tmp_path, monkeypatch):
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where a spooled upload would roll over to disk
    monkeypatch.chdir(tmp_path)
    with TestClient(demo.create_app(unit_checkpoint)) as c:
        assert post(c, "astronaut.png", ASTRONAUT.read_bytes()).status_code == 200  # 0.75 MB: over Starlette's spool
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not any(spool.iterdir())

    with TestClient(demo.create_app(unit_checkpoint, save_dir=tmp_path / "kept")) as c:
        doc = post(c, "astronaut.png", ASTRONAUT.read_bytes()).json()
        assert post(c, "notes.txt", b"text", "text/plain").status_code == 415
    saved = sorted((tmp_path / "kept").iterdir())
    assert [p.suffix for p in saved] == [".json", ".png"]
    assert saved[1].read_bytes() == ASTRONAUT.read_bytes() and json.loads(saved[0].read_text()) == doc
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        demo.create_app(unit_checkpoint, save_dir=tmp_path / "file")


def test_twenty_concurrent_requests(client):
    import io

    from PIL import Image

    small = io.BytesIO()  # her head and shoulders: a quarter of the pixels, so the 20 runs stay quick
    Image.open(ASTRONAUT).crop((96, 0, 352, 256)).save(small, "PNG")
    photos = [("astronaut.png", small.getvalue()), ("coffee.png", COFFEE.read_bytes()), ("notes.txt", b"not an image")]
    expected = {name: post(client, name, data) for name, data in photos}
    expected = {k: (r.status_code, r.json()) for k, r in expected.items()}
    start = threading.Barrier(20)

    def one(i):
        name, data = photos[i % len(photos)]
        start.wait()
        r = post(client, name, data)
        return name, r.status_code, r.json()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(expected["astronaut.png"][1]["faces"]) == 1
    for name, status, body in results:
        assert (status, body) == expected[name], name
    assert client.get("/healthz").status_code == 200


def test_a_model_run_does_not_block_the_event_loop(unit_checkpoint, monkeypatch):
    """While one request is inside the face pipeline, the server still answers others."""
    inside, release = threading.Event(), threading.Event()
    real = demo.find_faces

    def gated(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "find_faces", gated)
    with TestClient(demo.create_app(unit_checkpoint)) as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, c, "astronaut.png", ASTRONAUT.read_bytes())
        assert inside.wait(30)
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/api/model").status_code == 200
        assert not pending.done()
        release.set()
        assert len(pending.result(30).json()["faces"]) == 1


def test_exif_orientation_is_applied_as_the_browser_shows_it(client):
    """A phone stores a portrait sideways with an EXIF orientation; the face is found upright."""
    import io

    from PIL import Image

    upright = Image.open(ASTRONAUT).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": undoes the ROTATE_90 above
    buf = io.BytesIO()
    sideways.save(buf, "JPEG", quality=95, exif=exif)
    doc = post(client, "phone.jpg", buf.getvalue(), "image/jpeg").json()
    assert len(doc["faces"]) == 1
    x, y, w, h = doc["faces"][0]["box"]
    assert 150 < x < 220 and 40 < y < 110  # in the upright picture's pixels


def test_the_page_ships_in_the_package_data():
    """pyproject's package-data globs cover every file the page serves (an installed wheel has them)."""
    import fnmatch

    import tomllib

    root = Path(demo.__file__).resolve().parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["emotion_dist"]
    files = [p.relative_to(root / "emotion_dist").as_posix() for p in Path(demo.STATIC).iterdir()]
    assert {"index.html", "demo.js", "demo.css"} <= {Path(f).name for f in files}
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_command_binds_loopback_by_default_and_says_who_can_reach_it(tmp_path, capsys):
    import socket

    from emotion_dist import cli
    from emotion_dist.commands import demo as command

    args = cli.parse_args(["demo", "--checkpoint", "m.pt"])
    assert (args.host, args.port, args.max_upload_mb, args.save) == ("127.0.0.1", 7860, 10, None)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert command.reach(host) == command.LOOPBACK_HINT
    assert "network" in command.reach("0.0.0.0") and command.reach("0.0.0.0") != command.LOOPBACK_HINT
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(ConfigError, match="is in use"):
            command.bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
    free = command.bind("127.0.0.1", 0)
    assert free.getsockname()[0] == "127.0.0.1" and free.getsockname()[1] > 0
    free.close()
    # a bad model is one line and exit 2, before any port is bound
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_the_demo_serves_an_exported_hugging_face_folder(tmp_path, unit_checkpoint):
    from emotion_dist.inference import hub

    folder = hub.write_hf_folder(str(unit_checkpoint), hub.check_hf_out(str(tmp_path / "hf"), str(unit_checkpoint)))
    model = demo.load_demo_model(folder)
    assert model.info["format"] == "hf" and model.info["classes"] == load_classifier(str(unit_checkpoint)).classes
    with TestClient(demo.create_app(folder), raise_server_exceptions=False) as c:
        via_folder = post(c, "astronaut.png", ASTRONAUT.read_bytes()).json()
    with TestClient(demo.create_app(unit_checkpoint), raise_server_exceptions=False) as c:
        via_pt = post(c, "astronaut.png", ASTRONAUT.read_bytes()).json()
    assert via_folder["faces"] and len(via_folder["faces"]) == len(via_pt["faces"])
    for a, b in zip(via_folder["faces"], via_pt["faces"]):
        assert a["box"] == b["box"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_grad_cam_on_request_over_the_face_only_and_refused_for_onnx(client, unit_checkpoint, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from emotion_dist import cli

    assert client.get("/api/model").json()["cam"] == {"available": True, "method": "Grad-CAM (torchcam)",
                                                      "layer": "backbone.6"}
    assert "cam" not in post(client, "astronaut.png", ASTRONAUT.read_bytes()).json()  # only when asked
    r = client.post("/api/predict?cam=true", files={"file": ("astronaut.png", ASTRONAUT.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["cam"]["layer"] == "backbone.6" and doc["cam"]["image"].startswith("data:image/jpeg;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["cam"]["image"].split(",", 1)[1]))).convert("RGB"))
    photo = read_image(ASTRONAUT)
    assert shown.shape == photo.shape  # at the picture's own size: the page draws it where the photo was
    changed = np.abs(shown.astype(int) - photo.astype(int)).max(axis=2) > 40
    x, y, w, h = doc["faces"][0]["box"]
    assert changed[y + h // 4: y + 3 * h // 4, x + w // 4: x + 3 * w // 4].mean() > 0.5  # the map over her face
    outside = np.ones_like(changed)
    outside[max(0, y - h // 2): y + h + h // 2, max(0, x - w // 2): x + w + w // 2] = False
    assert changed[outside].mean() < 0.01  # the rest of the photo as it was (JPEG noise aside)

    onnx = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(unit_checkpoint), "--format", "onnx", "--out", str(onnx)]) == 0
    with TestClient(demo.create_app(onnx), raise_server_exceptions=False) as c:
        assert c.get("/api/model").json()["cam"]["available"] is False
        r = c.post("/api/predict?cam=true", files={"file": ("a.png", ASTRONAUT.read_bytes(), "image/png")})
        assert_one_line_error(r, 400, "ONNX", "PyTorch")
    with pytest.raises(ConfigError, match="backbone.99"):
        demo.create_app(unit_checkpoint, cam_layer="backbone.99")
