"""Datasets: where the images come from (synthetic, ImageFolder tree, kagglehub), a decoded-uint8
cache, the stratified validation split, and the two input pipelines (fast: batched tensor
augmentation on the training device; classic: the seed's per-sample torchvision.transforms.v2)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .images import IMAGE_EXTS

log = logging.getLogger("emotion_dist")


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
@dataclass
class DecodedImages:
    images: np.ndarray  # N x C x S x S uint8 (memory-mapped)
    labels: np.ndarray  # N int64
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def decode_all(files: list[str], labels: list[int], channels: int, cache_dir: Path, *, cache_size="auto",
               image_size: int = 64, fit: str = "resize") -> DecodedImages:
    """Every image decoded once into the uint8 cache (cache.py: keyed on the files, sizes, mtimes,
    channels, stored size and fit) and memory-mapped, so later runs and every rank share it."""
    from .cache import FileDecoder, build

    c = build(cache_dir, files, labels, FileDecoder(channels), cache_size=cache_size, image_size=image_size, fit=fit)
    return DecodedImages(c.images, c.labels, c.items, c.skipped)


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
    sizing = {"cache_size": d.cache_size, "image_size": d.image_size, "fit": d.fit}
    tr = decode_all(files, labels, channels, cache, **sizing)
    skipped = list(tr.skipped)
    tr_idx, val_idx = stratified_split(tr.labels, d.val_fraction, seed=cfg.train.seed)
    if d.limit:
        tr_idx = tr_idx[np.random.default_rng(cfg.train.seed).permutation(len(tr_idx))[: d.limit]]
        tr_idx.sort()
    test = None
    if test_dir is not None:
        _, tfiles, tlabels = scan(test_dir, classes)
        te = decode_all(tfiles, tlabels, channels, cache, **sizing)
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
