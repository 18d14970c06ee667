"""`emotion-dist predict` on a video file or a camera (`--source 0`).

Each processed frame (every `--every`-th) goes through the same face pipeline as a still image
(pipeline.py: detector, alignment, classifier); with `--detect-every N` the detector runs on every
N-th processed frame only and the faces it found are held (classified again where they were) in
between, which the records say (`detected`). Faces are tracked across frames with stable ids
(`tracking.IoUTracker`) and their
probabilities averaged per track over the last `--smooth` processed frames. Records (frame, time,
track, box, label, probabilities) stream as they come: JSON Lines on stdout with `--json`, to a file
with `--json-out FILE.jsonl`, CSV with `--csv FILE.csv` (`-` = stdout). Status and fps go to stderr.
The annotated copy (`--out FILE.mp4`, mp4v) holds exactly the processed frames.

Output files are written under temp names and renamed into place when the stream ends, also when a
stop signal (Ctrl-C, SIGTERM) or a closed pipe ends it, so a stopped camera leaves playable files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from emotion_dist.data.images import printable
from emotion_dist.distributed import interrupts
from emotion_dist.errors import ConfigError, DataError
from emotion_dist.inference.faces import get_detector
from emotion_dist.inference.pipeline import classify_found, face_record, find_faces
from emotion_dist.inference.predict import MARK, NO_FACE, draw, input_data, load_classifier
from emotion_dist.inference.tracking import IoUTracker
from emotion_dist.utils.fsutil import (
    content_digest,
    guard_output,
    record_output,
    recorded_output,
    remove_stale_temps,
    temp_path,
)

VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"})
DEFAULT_SMOOTH = 5  # processed frames averaged per track (1 = raw probabilities)
IOU_THRESHOLD = 0.3  # a detection continues a track when their boxes overlap at least this much
MAX_MISSED = 10  # processed frames a track survives without a detection (a turned head, a blink)
FALLBACK_FPS = 30.0  # when a camera or container reports none
PROGRESS_EVERY_S = 5.0
# then one column per class (its probability); `time` is seconds into the video (frame / fps for a file)
CSV_COLUMNS = ["frame", "time", "track", "x", "y", "w", "h", "label", "probability", "score", "aligned", "detected"]
_CSV_COLUMNS_BEFORE = CSV_COLUMNS[:9]  # the header of CSV files from before score/aligned/detected
JSONL_KEYS = {"frame", "time", "track", "box", "label", "probabilities"}
# A trailing MP4 'free' box (players skip it) marks the videos predict wrote, so a re-run may replace
# them: the mark and the keyed digest (utils/fsutil.py) of every byte before the box, so a user's video
# that merely ends in the same words, or our video edited since, is not taken for ours
_MARK_PAYLOAD = MARK.encode() + b" "
_DIGEST_LEN = len(content_digest([]))
MP4_MARK = struct.pack(">I", 8 + len(_MARK_PAYLOAD) + _DIGEST_LEN) + b"free" + _MARK_PAYLOAD  # then the digest
MP4_TRAILER_LEN = len(MP4_MARK) + _DIGEST_LEN


def _file_digest(f, size: int) -> str:
    """The keyed digest of a file's first `size` bytes, read in 1 MiB chunks."""
    f.seek(0)

    def chunks():
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk

    return content_digest(chunks())

Source = Union[int, str]


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def source_of(args) -> Optional[Source]:
    """None for still images; else the camera index or the video file (or stream URL) to read."""
    if args.boxes:
        if args.source is not None or args.inputs:
            raise ConfigError("--boxes names the images and their faces itself; give no IMAGE/DIR/VIDEO inputs or "
                              "--source with it")
        stream_only = [f for f, v in (("--every", args.every), ("--smooth", args.smooth), ("--csv", args.csv),
                                      ("--detect-every", args.detect_every)) if v is not None]
        if stream_only:
            raise ConfigError(f"{', '.join(stream_only)}: only for a video or a camera, not with --boxes")
        return None
    if args.source is not None:
        if args.inputs:
            raise ConfigError("give either --source or IMAGE/DIR/VIDEO inputs, not both")
        return int(args.source) if args.source.isdigit() else args.source
    if any(is_video_file(i) for i in args.inputs):
        if len(args.inputs) > 1:
            raise ConfigError("one video per run: give the video alone (images and folders may go together)")
        return args.inputs[0]
    if not args.inputs:
        raise ConfigError("nothing to predict: give images, folders or a video, or --source 0 for the first camera")
    stream_only = [flag for flag, value in (("--every", args.every), ("--smooth", args.smooth), ("--csv", args.csv),
                                            ("--detect-every", args.detect_every)) if value is not None]
    if stream_only:
        raise ConfigError(f"{', '.join(stream_only)}: only for a video or a camera, not for still images")
    return None


def _cv2():
    # FFmpeg's and OpenCV's own log lines ("moov atom not found", "can't open camera by index")
    # would surround the one line that says what is wrong; OPENCV_FFMPEG_LOGLEVEL=32 shows them again
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


@contextlib.contextmanager
def cv2_name(path: Path) -> Iterator[str]:
    """A name OpenCV can open for `path`. OpenCV crashes (SIGSEGV) on a Python string that is not
    valid UTF-8, so such a path is reached through a symlink with a plain name in a temp folder; it
    is needed only while OpenCV opens the file (FFmpeg keeps the descriptor)."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    folder = tempfile.mkdtemp(prefix="emotion-dist-")
    suffix = path.suffix if path.suffix.isascii() else ""
    link = os.path.join(folder, "video" + suffix)
    os.symlink(os.path.abspath(path), link)
    try:
        yield link
    finally:
        os.unlink(link)
        os.rmdir(folder)


class VideoSource:
    """A video file, stream URL or camera, opened and proven readable (one decoded frame) before
    the model loads; unreadable is one line."""

    def __init__(self, source: Source, every: int = 1):
        cv2 = _cv2()
        self.camera = isinstance(source, int)
        self.every = every
        self.name = f"camera {source}" if self.camera else printable(source)
        if self.camera:
            self.cap = cv2.VideoCapture(source)
            failure = (f"camera {source} could not be opened (no such device, no permission, or in use by another "
                       f"program); check --source (0 = the first camera)")
        elif "://" in source:  # a stream URL (rtsp://, http://): FFmpeg opens it as given
            if not source.isascii():
                raise DataError(f"stream URL {self.name} holds characters that are not ASCII; percent-encode them")
            self.cap = cv2.VideoCapture(source)
            failure = (f"stream {self.name} could not be opened (unreachable, or a protocol or codec that OpenCV's "
                       f"FFmpeg lacks); check the URL")
        else:
            path = Path(source)
            if not path.is_file():
                what = "is a folder" if path.is_dir() else "does not exist"
                raise DataError(f"video {self.name} {what}; give a video file, or --source 0 for a camera")
            with cv2_name(path) as name:
                self.cap = cv2.VideoCapture(name)
            failure = (f"{self.name} is not a video OpenCV can read (unknown container or codec, truncated, or not "
                       f"a video); convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        if not self.cap.isOpened():
            raise DataError(failure)
        ok, self._first = self.cap.read()
        if not ok:
            self.cap.release()
            raise DataError(f"{self.name}: no frame could be decoded (unknown codec, or an empty or truncated "
                            f"{'stream' if self.camera else 'file'})")
        self.height, self.width = self._first.shape[:2]
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 0.0  # 0: unknown
        self.frame_count = 0 if self.camera else max(0, int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        self._t0 = time.monotonic()

    def describe(self) -> str:
        fps = f"{self.fps:g} fps" if self.fps else "fps unknown"
        count = f", {self.frame_count} frames" if self.frame_count else ""
        return f"{self.name}: {self.width}x{self.height}, {fps}{count}"

    def _time(self, index: int) -> float:
        """Seconds into the stream: the frame's place in a file, the wall clock for a camera."""
        if self.camera:
            return time.monotonic() - self._t0
        if self.fps:
            return index / self.fps
        return self.cap.get(_cv2().CAP_PROP_POS_MSEC) / 1000

    def frames(self) -> Iterator[tuple[int, float, np.ndarray]]:
        """(index in the source, seconds, BGR frame) of every `every`-th frame, from the first."""
        index, frame = 0, self._first
        self._first = None
        while True:
            if frame is None:
                if index % self.every:
                    if not self.cap.grab():  # skipped frames are not converted
                        return
                    index += 1
                    continue
                ok, frame = self.cap.read()
                if not ok:
                    return
            yield index, self._time(index), frame
            frame = None
            index += 1

    def close(self) -> None:
        self.cap.release()


def mp4_written_by_us(path: Path) -> bool:
    """A video predict wrote, unchanged since (or an empty file: nothing to lose)."""
    import hmac

    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < MP4_TRAILER_LEN:
                return size == 0
            f.seek(-MP4_TRAILER_LEN, os.SEEK_END)
            trailer = f.read()
            if not trailer.startswith(MP4_MARK):
                return False
            return hmac.compare_digest(trailer[len(MP4_MARK):], _file_digest(f, size - MP4_TRAILER_LEN).encode())
    except OSError:
        return False


def jsonl_written_by_us(path: Path) -> bool:
    """Records predict wrote (its record of the file matches: utils/fsutil.record_output), or an
    empty file (nothing to lose)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        return not first or (JSONL_KEYS <= set(json.loads(first)) and recorded_output(path))
    except (OSError, ValueError, TypeError):
        return False


def csv_written_by_us(path: Path) -> bool:
    """As jsonl_written_by_us, for the CSV records."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        return not first or (first.decode("utf-8", "replace").startswith(",".join(_CSV_COLUMNS_BEFORE))
                             and recorded_output(path))
    except OSError:
        return False


class AnnotatedVideo:
    """The annotated copy: mp4v frames into a temp file next to `path`, renamed into place with the
    mark appended when the stream ends (stopped or not)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        cv2 = _cv2()
        self.path = path
        tmp = temp_path(path)
        self.tmp = tmp.with_name(tmp.name + ".mp4")  # FFmpeg picks the container from the name's ending
        with cv2_name(self.tmp) as name:
            self.writer = cv2.VideoWriter(name, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self.writer.isOpened():
            self.tmp.unlink(missing_ok=True)
            raise ConfigError(f"--out {printable(path)}: OpenCV cannot write an mp4v video here "
                              f"(its FFmpeg lacks the encoder, or the folder is not writable)")
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        self.writer.write(frame)
        self.frames += 1

    def finish(self) -> None:
        self.writer.release()
        if not self.frames:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "r+b") as f:
            digest = _file_digest(f, f.seek(0, os.SEEK_END))
            f.seek(0, os.SEEK_END)
            f.write(MP4_MARK + digest.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


class StreamFile:
    """A text file written as the stream goes, under its temp name until `finish`."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, temp_path(path)
        self.file = open(self.tmp, "w", encoding="utf-8", newline="")

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        record_output(self.path)  # the proof that a re-run may replace it


class Records:
    """Where the records go: JSON Lines and CSV, to stdout and/or files. A closed stdout (a pipe
    into `head`) stops the stream like a signal instead of raising BrokenPipeError."""

    def __init__(self, classes: list[str], json_stdout: bool, json_out: Optional[Path], csv_out: Optional[str]):
        self.classes = classes
        self.files: list[StreamFile] = []
        self.jsonl = [sys.stdout] if json_stdout else []
        if json_out:
            self.files.append(StreamFile(json_out))
            self.jsonl.append(self.files[-1].file)
        self.csv = []
        if csv_out:
            if csv_out == "-":
                target = sys.stdout
            else:
                self.files.append(StreamFile(Path(csv_out)))
                target = self.files[-1].file
            self.csv.append((csv.writer(target, lineterminator="\n"), target))
            self._guard(lambda: (self.csv[0][0].writerow(CSV_COLUMNS + classes), target.flush()))

    def write(self, records: list[dict]) -> None:
        for out in self.jsonl:
            self._guard(lambda: (out.writelines(json.dumps(r) + "\n" for r in records), out.flush()))  # noqa: B023
        for writer, out in self.csv:
            rows = [[r["frame"], r["time"], r["track"], *r["box"], r["label"], r["probability"],
                     "" if r["score"] is None else r["score"], int(r["aligned"]), int(r["detected"]),
                     *(r["probabilities"][c] for c in self.classes)] for r in records]
            self._guard(lambda: (writer.writerows(rows), out.flush()))  # noqa: B023

    @staticmethod
    def _guard(write) -> None:
        try:
            write()
        except BrokenPipeError:
            # Python's advice: point stdout at devnull so the exit-time flush does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            interrupts.request("a closed pipe")

    def finish(self) -> None:
        for f in self.files:
            f.finish()


def _check_outputs(args, source: Source) -> tuple[Optional[Path], Optional[Path]]:
    """--out, --json-out and --csv checked before anything is opened or loaded."""
    if args.json and args.csv == "-":
        raise ConfigError("--json and --csv - both write to stdout; send one to a file (--json-out FILE.jsonl or "
                          "--csv FILE.csv)")
    model = Path(args.checkpoint)
    inputs = [model, model.with_suffix(".json")] + ([Path(source)] if isinstance(source, str) else [])
    data = input_data([source]) if isinstance(source, str) and "://" not in source else []  # no output may be it
    out = json_out = None
    if args.out:
        out = guard_output(Path(args.out), what="an annotated video", suffixes=(".mp4",), inputs=inputs,
                           ours=mp4_written_by_us, data=data)
    if args.json_out:
        json_out = guard_output(Path(args.json_out), what="JSON Lines records", suffixes=(".jsonl",), inputs=inputs,
                                ours=jsonl_written_by_us, option="--json-out", data=data)
    if args.csv and args.csv != "-":
        guard_output(Path(args.csv), what="CSV records", suffixes=(".csv",), inputs=inputs, ours=csv_written_by_us,
                     option="--csv", data=data)
    for path in (out, json_out, Path(args.csv) if args.csv and args.csv != "-" else None):
        if path:
            remove_stale_temps(path.parent)
    return out, json_out


def run_video(args, source: Source) -> int:
    every, smooth, detect_every = args.every or 1, args.smooth or DEFAULT_SMOOTH, args.detect_every or 1
    out, json_out = _check_outputs(args, source)
    interrupts.install()  # before the model loads: a signal then ends the stream before its first frame
    src = VideoSource(source, every)
    try:
        classifier = load_classifier(args.checkpoint)
        detector = None if args.no_detect else get_detector(args.detector)
    except BaseException:
        src.close()
        raise
    cv2 = _cv2()
    tracker = IoUTracker(IOU_THRESHOLD, MAX_MISSED, smooth)
    human = not args.json and args.csv != "-"  # face lines on stdout unless stdout carries records
    print(f"{src.describe()}; every {every} frame(s), "
          + (f"faces detected on every {detect_every}-th of them and held in between, " if detect_every > 1 else "")
          + f"smoothing over {smooth}"
          + ("; stop with Ctrl-C" if src.camera else ""), file=sys.stderr, flush=True)
    video = records = None
    processed = faces = last = 0
    started = last_report = time.monotonic()
    try:
        video = AnnotatedVideo(out, (src.fps or FALLBACK_FPS) / every, (src.width, src.height)) if out else None
        records = Records(classifier.classes, args.json, json_out, args.csv)
        held: list = []  # the faces of the last detection, classified again on the frames between detections
        for index, t, frame in src.frames():
            if interrupts.requested():  # also one that came while the model loaded
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            detected = processed % detect_every == 0
            if detected:
                held = find_faces(rgb, detector=detector)
            faces_now = classify_found(classifier, rgb, held, whole_image=detector is None, align=not args.no_align)
            tracks = tracker.update([r["box"] for r in faces_now], [r["p"] for r in faces_now])
            found = [{"frame": index, "time": round(t, 3), "track": track.id, "box": list(track.box),
                      "score": r["score"], "landmarks": r["landmarks"], "aligned": r["aligned"], "detected": detected,
                      **face_record(classifier, track.smoothed())} for track, r in zip(tracks, faces_now)]
            records.write(found)
            if human:
                for r in found:
                    x, y, w, h = r["box"]
                    print(f"frame {index}  {r['time']:.3f}s  track {r['track']}  box=({x},{y},{w},{h})  "
                          f"{r['label']}  {r['probability']:.3f}", flush=True)
            if video:
                video.write(draw(frame, [r["box"] for r in found],
                                 [f"#{r['track']} {r['label']} {r['probability']:.2f}" for r in found],
                                 [r["landmarks"] for r in found]))
            processed, faces, last = processed + 1, faces + len(found), index
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S:
                print(f"frame {index}: {processed / (now - started):.1f} fps, {len(found)} face(s)",
                      file=sys.stderr, flush=True)
                last_report = now
            if interrupts.requested():
                break
    finally:
        src.close()
        for output in (video, records):
            if output:
                output.finish()
    seconds = max(time.monotonic() - started, 1e-9)
    stopped = interrupts.requested()
    print(f"{'stopped by ' + stopped + ': ' if stopped else ''}{processed} frames processed (of {last + 1} read) "
          f"in {seconds:.1f} s, {processed / seconds:.1f} fps; {faces} face record(s) in {tracker.tracks_seen} "
          f"track(s)" + (f"; annotated video {printable(out)} ({video.frames} frames)" if video else ""),
          file=sys.stderr, flush=True)
    if not faces and not stopped:
        print(f"{src.name}: {NO_FACE}", file=sys.stderr, flush=True)
        return 1
    return 0
