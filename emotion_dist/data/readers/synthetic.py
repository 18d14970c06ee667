"""Procedurally drawn 48x48 grayscale faces whose seven expressions differ in facial geometry.

Each expression sets mouth curve/opening/width/asymmetry, brow height/tilt and eye opening; every
image jitters those and adds nuisance (position, scale, rotation, lighting, noise, contrast).
Images are deterministic by (seed, split, index) and written once in the Kaggle layout
(`train/train/<class>/*.jpg`, `test/test/<class>/*.jpg`) so the folder code path reads them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from emotion_dist.data.readers.base import register
from emotion_dist.data.readers.folder import FolderReader
from emotion_dist.distributed import interrupts
from emotion_dist.errors import DataError
from emotion_dist.utils.fsutil import (
    claim_temp_dir,
    disk_error,
    make_temp_dir,
    release_temp_dir,
    remove_stale_temps,
    temp_path,
)

CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
# FER2013 train counts: disgust is rare, happy common.
FER_COUNTS = [3995, 436, 4097, 7215, 4965, 4830, 3171]

# (mouth_curve, mouth_open, mouth_width, mouth_asym, brow_raise, brow_tilt, eye_open)
# curve > 0 = corners up (smile); tilt > 0 = inner ends down (frown).
EXPRESSIONS = {
    "angry": (-0.06, 0.00, 0.36, 0.0, -0.06, 0.20, 0.07),
    "disgust": (-0.10, 0.03, 0.42, 0.14, -0.04, 0.10, 0.06),
    "fear": (-0.10, 0.12, 0.56, 0.0, 0.10, -0.16, 0.17),
    "happy": (0.22, 0.06, 0.56, 0.0, 0.02, 0.00, 0.09),
    "neutral": (0.00, 0.00, 0.44, 0.0, 0.00, 0.00, 0.11),
    "sad": (-0.18, 0.00, 0.44, 0.0, 0.04, -0.18, 0.07),
    "surprise": (0.00, 0.30, 0.30, 0.0, 0.16, 0.00, 0.20),
}
JITTER = (0.04, 0.03, 0.05, 0.03, 0.03, 0.05, 0.02)
SCALE = 4  # draw at 4x and downsample for anti-aliasing
SIZE = 48
FORMAT_VERSION = 1
MARKER = "synthetic.json"


def class_counts(total: int) -> list[int]:
    weights = np.asarray(FER_COUNTS, dtype=float) / sum(FER_COUNTS)
    counts = np.maximum(np.floor(weights * total).astype(int), 2 if total >= 14 else 1)
    while counts.sum() > total:  # the minimum per class can overshoot on tiny sets
        counts[np.argmax(counts)] -= 1
    i = 0
    while counts.sum() < total:  # hand the remainder to the common classes, deterministically
        counts[np.argsort(-weights)[i % len(CLASSES)]] += 1
        i += 1
    return counts.tolist()


def draw_face(label: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter

    curve, opening, width, asym, brow_raise, brow_tilt, eye_open = (
        v + rng.normal(0, s) for v, s in zip(EXPRESSIONS[CLASSES[label]], JITTER)
    )
    if rng.random() < 0.5:
        asym = -asym  # disgust raises either corner
    n = SIZE * SCALE
    bg = int(rng.uniform(20, 110))
    skin = int(rng.uniform(140, 225))
    dark = int(rng.uniform(10, 60))
    img = Image.new("L", (n, n), bg)
    d = ImageDraw.Draw(img)
    c, r = n / 2, n * 0.40  # face centre and radius (canvas units)

    def pt(x, y):
        return (c + x * r, c + y * r)

    d.ellipse([pt(-0.82, -1.0), pt(0.82, 1.05)], fill=skin)
    lw = max(2, int(r * 0.07))
    for side in (-1, 1):  # eyes and brows
        ex, ey = side * 0.36, -0.18
        h = max(0.015, eye_open)
        d.ellipse([pt(ex - 0.14, ey - h), pt(ex + 0.14, ey + h)], fill=dark)
        by = -0.45 - brow_raise
        inner, outer = (ex - side * 0.18, by + brow_tilt), (ex + side * 0.2, by - 0.3 * brow_tilt)
        d.line([pt(*inner), pt(*outer)], fill=dark, width=lw)
    d.line([pt(0, -0.05), pt(-0.06, 0.22), pt(0.05, 0.24)], fill=dark, width=max(1, lw // 2))  # nose
    xs = np.linspace(-1, 1, 25)
    w = max(0.15, width)
    upper = [pt(x * w, 0.52 - curve * (x * x) + curve * 0.5 - asym * x) for x in xs]
    if opening > 0.03:
        lower = [pt(x * w, 0.52 - curve * (x * x) + curve * 0.5 - asym * x + opening * math.sqrt(1 - x * x))
                 for x in xs[::-1]]
        d.polygon(upper + lower, fill=dark)
    else:
        d.line(upper, fill=dark, width=lw)

    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.85, 1.1)
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * n
    img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=bg)
    img = img.transform(
        (n, n), Image.AFFINE, (1 / scale, 0, c - c / scale - tx, 0, 1 / scale, c - c / scale - ty),
        resample=Image.BILINEAR, fillcolor=bg,
    )
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5) * SCALE)).resize((SIZE, SIZE), Image.LANCZOS)
    a = np.asarray(img, dtype=np.float32)
    gx, gy = rng.normal(0, 25, size=2)  # lighting gradient
    yy, xx = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    a = a + gx * xx + gy * yy + rng.normal(0, rng.uniform(2, 10), size=a.shape)
    a = (a - a.mean()) * rng.uniform(0.7, 1.2) + a.mean()
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def _marker(out: Path):
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_target(out: Path) -> None:
    """The synthetic set is written only into a missing or empty folder, or one holding a synthetic
    set emotion-dist wrote (its marker, and nothing else): never over someone's files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; the synthetic faces need a folder: choose another path")
    if not out.is_dir():
        return
    entries = set(os.listdir(out))
    if entries and not (_marker(out) is not None and entries <= {"train", "test", MARKER}):
        raise DataError(
            f"{out} holds files emotion-dist did not write; the synthetic faces are written only into a new or "
            f"empty folder (or over a synthetic set it wrote): choose another folder, or read this one as data "
            f"with data.source=folder"
        )


BYTES_PER_IMAGE = 4096  # a 48 px JPEG is ~1.5 kB, but a small file takes a whole block on most filesystems


def _write_error(e: OSError, folder: Path, images: int) -> DataError:
    """A full (or unwritable) disk during generation: one line naming the folder and the space."""
    need = images * BYTES_PER_IMAGE
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    room = f"about {need / 1e6:.1f} MB for {images} images"
    if free is not None:
        room += f", {free / 1e6:.1f} MB free"
    return DataError(disk_error(e, f"the synthetic faces in {folder} ({room})",
                                "free space, or generate them on a larger disk (data.root, run.cache_dir or --out)"))


def _draw_all(tmp: Path, spec: dict) -> None:
    for split_id, (split, total) in enumerate((("train", spec["train"]), ("test", spec["test"]))):
        index = 0
        for label, count in enumerate(class_counts(total)):
            folder = tmp / split / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                interrupts.check()
                face = draw_face(label, _image_rng(spec["seed"], split_id, index))
                face.save(folder / f"{index:06d}.jpg", quality=92)
                index += 1
    (tmp / MARKER).write_text(json.dumps(spec))


def _move_into_place(tmp: Path, out: Path, spec: dict) -> None:
    """Rename the finished temp folder to `out`. Another job that generated the same set at the
    same time (two runs sharing one fresh run.cache_dir) may have won the race: its set is the same
    bytes, so ours is dropped and theirs is used; never is a set that someone may be reading
    moved aside."""
    if out.exists() and _marker(out) != spec:  # empty, or a synthetic set of another spec: moved aside, then removed
        old = temp_path(out.with_name(out.name + "-old"))
        try:
            os.replace(out, old)
            claim_temp_dir(old)  # a removal cut short is finished by the next start
            shutil.rmtree(old)
        except FileNotFoundError:  # another job moved it first
            pass
    release_temp_dir(tmp)  # the finished set carries no owner record
    try:
        os.rename(tmp, out)  # atomic; onto an existing non-empty folder it fails instead of replacing it
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or _marker(out) != spec:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def generate(out: str | os.PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write the dataset under `out` unless an identical one is already complete there. Built in a
    temp folder beside it (private to this process) and renamed into place, so `out` is never
    half-written and concurrent writers of the same set both end with the winner's; a stop signal
    removes the temp folder (Interrupted), and one a killed process left is removed next time."""
    out = Path(out)
    spec = {"version": FORMAT_VERSION, "train": n_train, "test": n_test, "seed": seed}
    if _marker(out) == spec:
        return out
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = make_temp_dir(out)  # with its owner record: a killed run's leftover is provably ours
    try:
        try:
            _draw_all(tmp, spec)
        except OSError as e:
            raise _write_error(e, out.parent, n_train + n_test) from None
        _move_into_place(tmp, out, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@register
class SyntheticReader(FolderReader):
    """The built-in synthetic faces, generated once into data.root (a new or empty folder, or one of
    its own sets) or into run.cache_dir."""

    name = "synthetic"

    def prepare(self, cfg) -> Path:
        d = cfg.data
        root = Path(d.root) if d.root else Path(cfg.run.cache_dir) / (
            f"synthetic-{d.synthetic_train}-{d.synthetic_test}-s{d.synthetic_seed}")
        return generate(root, d.synthetic_train, d.synthetic_test, d.synthetic_seed)
