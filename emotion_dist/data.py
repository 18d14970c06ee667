"""Datasets: where the images come from (synthetic, ImageFolder tree, kagglehub), a decoded-uint8
cache, the stratified validation split, and the two input pipelines (fast: batched tensor
augmentation on the training device; classic: the seed's per-sample torchvision.transforms.v2)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .images import IMAGE_EXTS, read_uint8

log = logging.getLogger("emotion_dist")

CACHE_VERSION = 1


def normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics; for grayscale the luma-weighted mean/std instead of a 3-channel triple."""
    if channels == 1:
        return [0.449], [0.226]
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------- where the images live
def dataset_root(cfg: Config) -> Path:
    """Resolve (and on first use create or download) the dataset folder. Call on rank 0 first."""
    d = cfg.data
    if d.source == "synthetic":
        from .synthetic import generate

        root = Path(d.root) if d.root else Path(cfg.run.cache_dir) / (
            f"synthetic-{d.synthetic_train}-{d.synthetic_test}-s{d.synthetic_seed}"
        )
        return generate(root, d.synthetic_train, d.synthetic_test, d.synthetic_seed)
    if d.source == "kaggle":
        if d.root:
            return Path(d.root)
        return kaggle_download(d.kaggle_handle)
    root = Path(d.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={root} is not a folder; point it at an ImageFolder tree (train/<class>/*.jpg)")
    return root


def kaggle_download(handle: str) -> Path:
    try:
        import kagglehub
    except ImportError:
        raise ConfigError("data.source=kaggle needs kagglehub: pip install kagglehub (or pass data.root=PATH)") from None
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as e:  # network, auth, unknown handle: all end the same way for the user
        raise ConfigError(
            f"kagglehub could not fetch {handle} ({type(e).__name__}); download it elsewhere and pass "
            f"data.source=folder data.root=PATH"
        ) from None


def find_splits(root: Path) -> tuple[Path, Optional[Path]]:
    """Kaggle nesting (train/train, test/test) or the plain one (train/ with test/ or val/)."""
    for train, tests in (
        (root / "train" / "train", [root / "test" / "test", root / "test"]),
        (root / "train", [root / "test", root / "val"]),
    ):
        if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
            return train, next((t for t in tests if t.is_dir() and any(p.is_dir() for p in t.iterdir())), None)
    if any(p.is_dir() for p in root.iterdir()):
        return root, None  # the folder itself is an ImageFolder tree
    raise ConfigError(f"no class folders under {root}; expected train/<class>/*.jpg (or train/train/<class>)")


def scan(folder: Path, classes: Optional[list[str]] = None) -> tuple[list[str], list[str], list[int]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None and found != classes:
        raise ConfigError(
            f"class folders in {folder} ({', '.join(found)}) differ from the training classes "
            f"({', '.join(classes)}); make both splits have the same class folders"
        )
    files, labels = [], []
    for label, name in enumerate(found):
        members = sorted(
            str(p) for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        )
        if not members:
            raise ConfigError(f"class folder {folder / name} has no images; add images or remove the folder")
        files += members
        labels += [label] * len(members)
    return found, files, labels


# ---------------------------------------------------------------- decoding and the uint8 cache
def decode_image(path: str, channels: int, size: Optional[int]) -> np.ndarray:
    """Decode any common mode (L, RGB, RGBA, P, CMYK, 16-bit, float) to uint8 HxWxC."""
    from PIL import Image

    a = read_uint8(path, channels)
    if size is not None and a.shape[:2] != (size, size):
        img = Image.fromarray(a[:, :, 0] if channels == 1 else a)
        a = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


@dataclass
class DecodedImages:
    images: np.ndarray  # N x C x S x S uint8 (memory-mapped)
    labels: np.ndarray  # N int64
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def _first_size(files: list[str], channels: int) -> int:
    for f in files:
        try:
            h, w, _ = decode_image(f, channels, None).shape
            return max(h, w) if h != w else h
        except Exception:
            continue
    raise ConfigError(f"none of the {len(files)} images could be decoded; check the dataset files")


def decode_all(files: list[str], labels: list[int], channels: int, cache_dir: Path) -> DecodedImages:
    """Decode every image once into a uint8 array cached on disk (keyed on the file list, sizes
    and mtimes) and memory-mapped, so later runs and every rank share it for free."""
    h = hashlib.sha256(f"v{CACHE_VERSION} c{channels}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()[:20]
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        arr = np.load(npy, mmap_mode="r")
        return DecodedImages(arr, np.asarray(m["labels"], dtype=np.int64), m["files"], [tuple(s) for s in m["skipped"]])

    size = _first_size(files, channels)

    def one(f):
        try:
            return decode_image(f, channels, size), None
        except Exception as e:  # corrupt, truncated, zero-byte, not an image
            return None, f"{type(e).__name__}: {str(e)[:120]}"

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = list(pool.map(one, files, chunksize=64))
    keep = [i for i, (a, _) in enumerate(results) if a is not None]
    skipped = [(files[i], r) for i, (a, r) in enumerate(results) if a is None]
    arr = np.empty((len(keep), channels, size, size), dtype=np.uint8)
    for j, i in enumerate(keep):
        arr[j] = results[i][0].transpose(2, 0, 1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, npy)
    kept_files = [files[i] for i in keep]
    kept_labels = [labels[i] for i in keep]
    tmpm = meta.with_suffix(f".tmp{os.getpid()}")
    tmpm.write_text(json.dumps({"labels": kept_labels, "files": kept_files, "skipped": skipped}))
    os.replace(tmpm, meta)
    return DecodedImages(np.load(npy, mmap_mode="r"), np.asarray(kept_labels, dtype=np.int64), kept_files, skipped)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded `fraction` (at least one image where a class has two or more) goes to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class Split:
    """One split of one dataset: positions into the decoded arrays."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray  # positions into images/labels
    files: list[str]

    def __len__(self) -> int:
        return len(self.index)

    def targets(self) -> np.ndarray:
        return self.labels[self.index]


@dataclass
class Datasets:
    classes: list[str]
    train: Split
    val: Split
    test: Optional[Split]
    channels: int
    root: str
    skipped: list[tuple[str, str]]


def load_datasets(cfg: Config, root: Path) -> Datasets:
    d = cfg.data
    channels = cfg.model.in_channels
    train_dir, test_dir = find_splits(root)
    classes, files, labels = scan(train_dir)
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(
            f"the data has {len(classes)} classes ({', '.join(classes)}) but model.num_classes="
            f"{cfg.model.num_classes}; set model.num_classes={len(classes)}"
        )
    cache = Path(cfg.run.cache_dir) / "decoded"
    tr = decode_all(files, labels, channels, cache)
    skipped = list(tr.skipped)
    tr_idx, val_idx = stratified_split(tr.labels, d.val_fraction, seed=cfg.train.seed)
    if d.limit:
        tr_idx = tr_idx[np.random.default_rng(cfg.train.seed).permutation(len(tr_idx))[: d.limit]]
        tr_idx.sort()
    test = None
    if test_dir is not None:
        _, tfiles, tlabels = scan(test_dir, classes)
        te = decode_all(tfiles, tlabels, channels, cache)
        skipped += te.skipped
        test = Split(te.images, te.labels, np.arange(len(te.labels)), te.files)
    for f, why in skipped:
        log.warning("skipped unreadable image %s (%s)", f, why)
    return Datasets(
        classes=classes,
        train=Split(tr.images, tr.labels, tr_idx, tr.files),
        val=Split(tr.images, tr.labels, val_idx, tr.files),
        test=test,
        channels=channels,
        root=str(root),
        skipped=skipped,
    )


def write_data_report(ds: Datasets, path: Path) -> None:
    from .fsutil import atomic_write_bytes

    counts = np.bincount(ds.train.targets(), minlength=len(ds.classes)).tolist()
    report = {
        "root": ds.root,
        "classes": ds.classes,
        "train": len(ds.train),
        "val": len(ds.val),
        "test": len(ds.test) if ds.test is not None else 0,
        "train_class_counts": dict(zip(ds.classes, counts)),
        "skipped_count": len(ds.skipped),
        "skipped": [{"file": f, "reason": r} for f, r in ds.skipped],
    }
    atomic_write_bytes(path, json.dumps(report, indent=1).encode())


def class_weights(ds: Datasets) -> torch.Tensor:
    """'balanced' weights as in scikit-learn: n / (k * count_c)."""
    counts = np.bincount(ds.train.targets(), minlength=len(ds.classes)).astype(np.float64)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)
