"""`emotion-dist data faces --from RAW --out DIR`: a folder of ordinary photos -> an aligned face
data set that training reads (data.source=folder).

RAW holds class folders (RAW/<class>/...) or splits (RAW/train/<class>/..., RAW/test/<class>/...).
Each face the detector finds is cropped at `data.face_crop`'s geometry (inference/align.py) and
written as DIR[/<split>]/<class>/<source name>.face<k>.png, k = the face's index in the photo
(largest first). DIR/faces_report.json gives the counts and the photos that had no face, several
faces (`--multi=largest|all|skip`) or could not be read.

RAW is only read: --out may not be RAW, lie inside it, or hold it. A stopped run carries on where it
was: a journal (DIR/.faces_journal.jsonl, one line per photo done, written after its crops) says which
photos are done, and each crop is written atomically. Photos are processed in parallel by threads
(OpenCV and onnxruntime release the GIL), each with a detector of its own.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from emotion_dist.config import FaceCrop, parse_face_crop
from emotion_dist.data.images import is_image_file, printable, read_uint8
from emotion_dist.distributed import interrupts
from emotion_dist.errors import ConfigError, DataError
from emotion_dist.inference.align import face_crop
from emotion_dist.inference.faces import HaarDetector, RetinaFaceDetector, get_detector
from emotion_dist.utils.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    disk_error,
    json_written_by_us,
    remove_stale_temps,
    with_proof,
)
from emotion_dist.utils.output import MARKER, check_json_out, emit, text_stream
from emotion_dist.utils.paths import check_outside_data

REPORT = "faces_report.json"
JOURNAL = ".faces_journal.jsonl"
SPLITS = ("train", "test", "val")
MAX_DEFAULT_WORKERS = 8


@dataclass
class Photo:
    path: Path
    split: Optional[str]  # None: RAW is class folders
    label: str
    name: str  # the photo's path below its class folder, "/" as "__": unique within the class

    def out_dir(self, out: Path) -> Path:
        return out / self.split / self.label if self.split else out / self.label

    def key(self) -> str:
        return "/".join(p for p in (self.split, self.label, self.name) if p)


@dataclass
class Result:
    photo: Photo
    crops: list[str] = field(default_factory=list)  # names written, relative to --out
    faces: int = 0  # faces found (at least --min-size)
    error: Optional[str] = None


def list_photos(raw: Path) -> list[Photo]:
    """Class folders, or train/ + test/ (or val/) holding class folders; one line naming the layout
    otherwise."""
    if not raw.is_dir():
        raise DataError(f"--from {printable(raw)} is not a folder; give a folder of class folders, or train/ + test/ "
                        f"holding class folders")
    subdirs = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name in SPLITS]
    roots = [(p.name, p) for p in split_dirs] if split_dirs else [(None, raw)]
    photos = []
    for split, root in roots:
        for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls.rglob("*")):
                parts = f.relative_to(cls).parts
                if f.is_file() and is_image_file(f) and not any(part.startswith(".") for part in parts):
                    photos.append(Photo(f, split, cls.name, "__".join(parts)))
    if not photos:
        raise DataError(f"--from {printable(raw)} holds no images in class folders; the layout is RAW/<class>/*.jpg "
                        f"or RAW/train/<class>/*.jpg + RAW/test/<class>/*.jpg")
    return photos


def read_journal(out: Path) -> dict[str, dict]:
    """The photos a stopped run finished: key -> its journal line (a torn last line is ignored)."""
    done = {}
    try:
        with open(out / JOURNAL, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    done[entry["photo"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return done


def check_out_is_ours(out: Path) -> None:
    """--out is new, empty, or a folder that data faces wrote (its report or journal is there)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {printable(out)} is a file; give a folder for the face data set")
    if not out.is_dir() or not any(out.iterdir()):
        return
    report = out / REPORT
    if (out / JOURNAL).is_file() or (report.is_file() and json_written_by_us(report)):
        return
    raise ConfigError(f"--out {printable(out)} already holds files that data faces did not write; choose a new or "
                      f"empty folder")


class Worker:
    """One photo -> its crops; a detector per thread, each on one onnxruntime thread: N workers use N cores."""

    def __init__(self, *, out: Path, detector: str, geometry: FaceCrop, size: int, min_size: int, multi: str):
        self.out, self.detector, self.geometry = out, detector, geometry
        self.size, self.min_size, self.multi = size, min_size, multi
        self._local = threading.local()

    def _detector(self):
        if not hasattr(self._local, "detector"):
            self._local.detector = RetinaFaceDetector(threads=1) if self.detector == "retinaface" else HaarDetector()
        return self._local.detector

    def __call__(self, photo: Photo) -> Result:
        from PIL import Image

        result = Result(photo)
        try:
            img = read_uint8(photo.path)
        except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            result.error = "unreadable (not an image, truncated or unsupported format)"
            return result
        img = img[:, :, 0] if img.shape[2] == 1 else img
        try:
            faces = [f for f in self._detector().detect(img) if min(f.box[2:]) >= self.min_size]
        except Exception as e:  # OpenCV or onnxruntime on a picture it cannot handle: this photo only
            result.error = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
            return result
        result.faces = len(faces)
        if len(faces) > 1:
            faces = faces[:1] if self.multi == "largest" else [] if self.multi == "skip" else faces
        folder = photo.out_dir(self.out)
        for k, f in enumerate(faces):
            crop, _ = face_crop(img, box=f.box, landmarks=f.landmarks, geometry=self.geometry, size=self.size)
            target = folder / f"{photo.name}.face{k}.png"
            if not target.is_file():  # written by the stopped run before its journal line
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, "PNG")
                atomic_write_bytes(target, buf.getvalue())
            result.crops.append(target.relative_to(self.out).as_posix())
        return result


def run_data_faces(args) -> int:
    raw, out = Path(args.raw), Path(args.out)
    check_outside_data(out, [("--from", raw)], option="--out", fix="choose an --out folder outside --from")
    photos = list_photos(raw)
    check_out_is_ours(out)
    check_json_out(args, [out / REPORT])
    geometry = parse_face_crop(args.face_crop, key="--face-crop") if args.face_crop else FaceCrop()
    get_detector(args.detector)  # a missing detector package: one line before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for folder in {p.out_dir(out) for p in photos} | {out}:
        remove_stale_temps(folder)
    settings = {"detector": args.detector, "face_crop": geometry.spec(), "size": args.size, "multi": args.multi,
                "min_size": args.min_size}
    done = read_journal(out)
    if done and any(e.get("settings") != settings for e in done.values()):
        earlier = next(iter(done.values())).get("settings")
        raise ConfigError(f"--out {printable(out)} was started with other settings ({earlier}); give the same ones "
                          f"to carry on, or a new --out")
    todo = [p for p in photos if p.key() not in done or not all((out / c).is_file() for c in done[p.key()]["crops"])]
    workers = args.workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    worker = Worker(out=out, detector=args.detector, geometry=geometry, size=args.size, min_size=args.min_size,
                    multi=args.multi)
    stream = text_stream(args)
    print(f"data faces: {len(photos)} photos in {printable(raw)}, {len(photos) - len(todo)} done before; "
          f"{workers} worker(s), {args.detector}, crops {args.size}px at {geometry.spec()}", file=stream, flush=True)
    interrupts.install()
    started = time.monotonic()
    try:
        with open(out / JOURNAL, "a", encoding="utf-8") as journal:
            for result in _run_pool(worker, todo, workers, stream):
                entry = {"photo": result.photo.key(), "crops": result.crops, "faces": result.faces,
                         "error": result.error, "settings": settings}
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
                done[entry["photo"]] = entry
    except OSError as e:  # a full disk or a read-only --out: what is written stays, the next run carries on
        raise ConfigError(f"--out {printable(out)}: {disk_error(e, 'the face crops')}; then run the command again "
                          f"to carry on") from None
    stopped = interrupts.requested()
    report = with_proof(build_report(photos, done, raw=raw, out=out, settings=settings, stopped=stopped))
    atomic_write_json(out / REPORT, report)  # with the proof emit() adds: the file and --json agree
    seconds = time.monotonic() - started
    print(f"{'stopped by ' + stopped + ': ' if stopped else ''}{report['crops']} crops from {report['photos_done']} "
          f"of {len(photos)} photos in {seconds:.1f} s; {len(report['no_face'])} without a face, "
          f"{len(report['several_faces'])} with several, {len(report['unreadable'])} unreadable; report "
          f"{printable(out / REPORT)}" + ("; run the command again to carry on" if stopped else ""),
          file=stream, flush=True)
    empty = sorted({f"{split}/{label}" if split != "all" else label
                    for split, classes in report["counts"].items() for label, n in classes.items() if not n})
    if empty:
        print(f"warning: no crops for {', '.join(empty)}: training needs images in every class folder of every split",
              file=stream, flush=True)
    if report["complete"]:
        print(f"train on it: emotion-dist train data.source=folder data.root={printable(out)} "
              f"data.face_crop={geometry.spec()}", file=stream, flush=True)
    emit(args, report)  # --json, and --json-out (checked above)
    return 0


def _run_pool(worker: Worker, todo: list[Photo], workers: int, stream):
    """Results as photos finish, with a progress bar; a stop signal lets running photos finish."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)  # stdout may carry the JSON report
    with Progress(TextColumn("faces"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False, disable=not todo) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("faces", total=len(todo))
        pending, queue = set(), iter(todo)
        while True:
            while len(pending) < 2 * workers and not interrupts.requested():
                photo = next(queue, None)
                if photo is None:
                    break
                pending.add(pool.submit(worker, photo))
            if not pending:
                return
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
                bar.advance(task)


def build_report(photos: list[Photo], done: dict, *, raw: Path, out: Path, settings: dict, stopped) -> dict:
    counts: dict = {}
    no_face, several, unreadable = [], [], []
    for p in photos:
        entry = done.get(p.key())
        if entry is None:
            continue
        split = counts.setdefault(p.split or "all", {})
        split[p.label] = split.get(p.label, 0) + len(entry["crops"])
        source = printable(p.path.relative_to(raw))
        if entry.get("error"):
            unreadable.append(source)
        elif entry["faces"] == 0:
            no_face.append(source)
        elif entry["faces"] > 1:
            several.append({"file": source, "faces": entry["faces"], "kept": len(entry["crops"])})
    return {MARKER: "data faces", "from": printable(raw), "out": printable(out), **settings,
            "photos": len(photos), "photos_done": sum(p.key() in done for p in photos),
            "crops": sum(sum(c.values()) for c in counts.values()), "counts": counts, "no_face": no_face,
            "several_faces": several, "unreadable": unreadable, "complete": not stopped and
            all(p.key() in done for p in photos)}
