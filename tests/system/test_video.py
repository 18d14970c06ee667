"""predict on video: the IoU tracker and its smoothing (pure), then real runs of the command on a
video the test writes with OpenCV (the astronaut's head moving across the frame, then frames
without a face, then the face again), with the .pt and the .onnx model."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, env_for_child, run

from emotion_dist import cli
from emotion_dist.inference.tracking import IoUTracker, iou

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

FPS = 10
FACELESS = range(10, 13)  # frames 10-12 hold no face; 13-15 show it again where it was


def write_clip(path, frames=16):
    """480x270 at 10 fps: the astronaut's head (face about 95 px) moves 8 px right per frame for
    frames 0-9, is gone for 10-12, back at its last place for 13-15; the pattern repeats."""
    head = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)[0:220, 117:337]
    writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 270))
    for i in range(frames):
        frame = np.full((270, 480, 3), 90, np.uint8)
        k = i % 16
        if k not in FACELESS:
            x = 20 + 8 * min(k, 9)
            frame[20:240, x:x + 220] = head
        writer.write(frame)
    writer.release()
    return path


def count_frames(path) -> int:
    cap = cv2.VideoCapture(os.fspath(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


def _predict(*args, check=True):
    return run([sys.executable, "-m", "emotion_dist.cli", "predict", *map(os.fspath, args)], check=check)


# --- the tracker, pure ---------------------------------------------------------------------

def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0  # touching edges
    assert iou((0, 0, 10, 10), (30, 30, 5, 5)) == 0


def test_tracker_ids_stay_with_moving_faces_through_a_gap_and_expire():
    t = IoUTracker(iou_threshold=0.3, max_missed=2, smooth=1)
    p = [np.ones(2)] * 2
    ids = []
    for step in range(5):  # two faces walking towards each other, 6 px a frame
        a, b = (10 + 6 * step, 10, 50, 50), (300 - 6 * step, 20, 60, 60)
        ids.append([tr.id for tr in t.update([b, a] if step % 2 else [a, b], p)])
    assert ids == [[1, 2], [2, 1], [1, 2], [2, 1], [1, 2]]  # by overlap, whatever the detector's order
    for _ in range(2):  # face 1 unseen for max_missed frames: kept
        (tr,) = t.update([(300 - 6 * 5, 20, 60, 60)], p[:1])
        assert tr.id == 2
    assert [tr.id for tr in t.update([(40, 10, 50, 50), (276, 20, 60, 60)], p)] == [1, 2]
    for _ in range(3):  # one frame more than max_missed: gone, so its face comes back as a new id
        t.update([], [])
    assert [tr.id for tr in t.update([(40, 10, 50, 50)], p[:1])] == [3]
    assert t.tracks_seen == 3


def test_smoothing_is_the_mean_of_the_last_n_processed_frames():
    box = (0, 0, 40, 40)
    seq = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0])]
    t3, t1 = IoUTracker(smooth=3), IoUTracker(smooth=1)
    got3 = [t3.update([box], [p])[0].smoothed() for p in seq]
    got1 = [t1.update([box], [p])[0].smoothed() for p in seq]
    assert np.allclose(got3, [[1, 0], [0.5, 0.5], [1 / 3, 2 / 3], [1 / 3, 2 / 3]])
    assert np.allclose(got1, seq)  # --smooth 1: the raw probabilities
    t3.update([(500, 500, 40, 40)], [np.array([0.0, 1.0])])  # another face starts its own average
    assert np.allclose(t3.tracks[-1].smoothed(), [0, 1]) and len(t3.tracks) == 2
    with pytest.raises(ValueError):
        IoUTracker(smooth=0)


# --- the command on a real video -----------------------------------------------------------

def test_video_records_stable_track_csv_and_annotated_frames(tiny_model, clip, tmp_path):
    out = _predict("--checkpoint", tiny_model.pt, clip, "--out", tmp_path / "ann.mp4", "--json",
                   "--csv", tmp_path / "rec.csv", "--smooth", "3")
    records = jsonl(out.stdout)  # stdout is JSON Lines and nothing else
    assert sorted({r["frame"] for r in records}) == [f for f in range(16) if f not in FACELESS]
    assert {r["track"] for r in records} == {1}  # one face, one id, also across the faceless gap
    assert all(set(r) == {"frame", "time", "track", "box", "score", "landmarks", "aligned", "detected", "label",
                          "probability", "probabilities"} for r in records)
    assert all(r["time"] == pytest.approx(r["frame"] / FPS) for r in records)
    xs = [r["box"][0] for r in records if r["frame"] < 10]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 50  # the box follows the moving face
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in records)
    assert count_frames(tmp_path / "ann.mp4") == 16  # every processed frame, faces or not
    assert re.search(r"16 frames processed .* fps", out.stderr)
    header, *rows = (tmp_path / "rec.csv").read_text().splitlines()
    classes = list(records[0]["probabilities"])
    assert header.split(",") == ["frame", "time", "track", "x", "y", "w", "h", "label", "probability", "score",
                                 "aligned", "detected", *classes]
    assert [row.split(",") for row in rows] == [
        [str(r["frame"]), str(r["time"]), str(r["track"]), *map(str, r["box"]), r["label"], str(r["probability"]),
         str(r["score"]), str(int(r["aligned"])), str(int(r["detected"])),
         *(str(r["probabilities"][c]) for c in classes)]
        for r in records]


def test_smoothing_end_to_end_and_onnx_every_and_odd_names(tiny_model, clip, tmp_path):
    raw_out = _predict("--checkpoint", tiny_model.pt, clip, "--no-detect", "--smooth", "1",
                       "--json-out", tmp_path / "raw.jsonl")
    raw = jsonl((tmp_path / "raw.jsonl").read_text())
    assert len(raw) == 16 and len(raw_out.stdout.splitlines()) == 16  # human lines on stdout meanwhile
    smoothed = jsonl(_predict("--checkpoint", tiny_model.pt, clip, "--no-detect", "--smooth", "3", "--json").stdout)
    classes = list(raw[0]["probabilities"])
    p_raw = np.array([[r["probabilities"][c] for c in classes] for r in raw])
    p_smooth = np.array([[r["probabilities"][c] for c in classes] for r in smoothed])
    expected = np.array([p_raw[max(0, i - 2): i + 1].mean(0) for i in range(16)])
    assert np.abs(expected - p_raw).max() > 2e-5  # the faceless frames move the raw numbers: a real check
    assert np.abs(p_smooth - expected).max() < 2e-6  # both rounded to 6 decimals

    # the .onnx model, every 2nd frame, a video and an output whose names are not UTF-8
    src = os.path.join(os.fsencode(tmp_path), b"clip\xff.mp4")
    shutil.copy(clip, src)
    annotated = os.path.join(os.fsencode(tmp_path), b"ann\xfe.mp4")
    every = jsonl(_predict("--checkpoint", tiny_model.onnx, os.fsdecode(src), "--no-detect", "--smooth", "1",
                           "--every", "2", "--json", "--out", os.fsdecode(annotated)).stdout)
    assert [r["frame"] for r in every] == list(range(0, 16, 2))
    for r in every:  # the ONNX model gives the .pt model's numbers on the same frames
        assert all(abs(r["probabilities"][c] - raw[r["frame"]]["probabilities"][c]) < 1e-4 for c in classes)
    link = tmp_path / "ann-link.mp4"  # OpenCV cannot open the odd name itself: read it through a link
    link.symlink_to(os.fsdecode(annotated))
    assert count_frames(link) == 8  # the annotated video holds the processed frames only


def test_stop_signal_finishes_the_outputs(tiny_model, tmp_path):
    long = write_clip(tmp_path / "long.mp4", frames=160)
    proc = subprocess.Popen([sys.executable, "-m", "emotion_dist.cli", "predict", "--checkpoint", str(tiny_model.pt),
                             str(long), "--json", "--out", str(tmp_path / "ann.mp4"), "--json-out",
                             str(tmp_path / "rec.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for_child(), cwd=ROOT)
    try:
        first = proc.stdout.readline()  # in the frame loop now
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = re.search(r"stopped by SIGTERM: (\d+) frames processed", err)
    assert stopped, err
    processed = int(stopped.group(1))
    assert 0 < processed < 160
    assert count_frames(tmp_path / "ann.mp4") == processed  # a playable file with every processed frame
    streamed = jsonl(first + rest)
    assert jsonl((tmp_path / "rec.jsonl").read_text()) == streamed
    assert max(r["frame"] for r in streamed) < processed
    assert sorted(os.listdir(tmp_path)) == ["ann.mp4", "long.mp4", "rec.jsonl"]  # no temp files left


def test_video_errors_are_one_line(tiny_model, clip, tmp_path, capfd):
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "trunc.mp4").write_bytes(clip.read_bytes()[:3000])
    (tmp_path / "foreign.mp4").write_bytes(clip.read_bytes())  # a video predict did not write
    (tmp_path / "folder.mp4").mkdir()
    pt, photo = str(tiny_model.pt), str(tmp_path / "a.png")
    for broken in ("text.mp4", "trunc.mp4"):  # in a fresh process: FFmpeg's own log level is set once per process
        proc = _predict("--checkpoint", pt, tmp_path / broken, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "not a video OpenCV can read" in proc.stderr
    cases = {
        ("predict", "--checkpoint", pt, str(tmp_path / "missing.mp4")): "does not exist",
        ("predict", "--checkpoint", pt, "--source", str(tmp_path / "folder.mp4")): "is a folder",
        ("predict", "--checkpoint", pt, "--source", "99"): "camera 99 could not be opened",
        ("predict", "--checkpoint", pt, str(clip), "--out", str(tmp_path / "a.avi")): "does not end in .mp4",
        ("predict", "--checkpoint", pt, str(clip), "--out", str(clip)): "is the input file itself",
        ("predict", "--checkpoint", pt, str(clip), "--out", str(tmp_path / "foreign.mp4")): "not written by",
        ("predict", "--checkpoint", pt, str(clip), "--out", str(tmp_path)): "is a folder",
        ("predict", "--checkpoint", pt, str(clip), "--json-out", str(tmp_path / "r.json")): "does not end in .jsonl",
        ("predict", "--checkpoint", pt, str(clip), "--csv", str(tmp_path / "text.mp4")): "does not end in .csv",
        ("predict", "--checkpoint", pt, str(clip), "--json", "--csv", "-"): "both write to stdout",
        ("predict", "--checkpoint", pt, str(clip), photo): "one video per run",
        ("predict", "--checkpoint", pt, str(clip), "--source", "0"): "not both",
        ("predict", "--checkpoint", pt, photo, "--every", "2", "--smooth", "2"): "--every, --smooth: only for a video",
        ("predict", "--checkpoint", pt): "nothing to predict",
    }
    for argv, expected in cases.items():
        assert cli.main(list(argv)) == 2, argv
        out, err = capfd.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.mp4", "foreign.mp4", "text.mp4", "trunc.mp4"]
