"""Datasets: the readers' images decoded once into the uint8 cache, the stratified validation split,
and the splits the trainer and evaluation index into. Where images come from is `readers/`; the
input pipelines (fast: batched tensor augmentation on the training device; classic: a plain
per-sample torchvision.transforms.v2 pipeline) are `augment.py` and `loader.py`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from emotion_dist.config import Config, ConfigError
from emotion_dist.data.readers.base import RawSplit
from emotion_dist.data.readers.factory import get_reader
from emotion_dist.errors import DataError
from emotion_dist.utils.fsutil import atomic_write_bytes

log = logging.getLogger("emotion_dist")


def normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics; for grayscale the luma-weighted mean/std instead of a 3-channel triple."""
    if channels == 1:
        return [0.449], [0.226]
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def dataset_root(cfg: Config) -> Path:
    """Prepare the data set (generate, download or check it) and return where it is: the heavy step
    that runs once per node or job before the others read it."""
    return get_reader(cfg).prepare(cfg)


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
    from emotion_dist.data.cache import FileDecoder, build

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
    soft: Optional[np.ndarray] = None  # soft targets (N x K) aligned with labels, when the data has them

    def __len__(self) -> int:
        return len(self.index)

    def targets(self) -> np.ndarray:
        """The (hard) labels of the split's images, in split order."""
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
    label_mode: str = "majority"
    excluded: dict = field(default_factory=dict)  # images the labelling rules left out (FER+): reason -> count
    duplicates: Optional[dict] = None  # the leak audit's report (data.dedupe=warn|drop)


def _decoded(split: RawSplit, channels: int,
             cache: Path, d) -> tuple[np.ndarray, np.ndarray, list[str], list, Optional[np.ndarray]]:
    """(images, labels, ids, skipped, soft targets) of a reader's split: files go through the cache."""
    if split.files is None:
        ids = split.ids or [f"#{i}" for i in range(len(split))]
        return split.images, split.labels, ids, [], split.targets
    dec = decode_all(split.files, split.labels.tolist(), channels, cache, cache_size=d.cache_size,
                     image_size=d.image_size, fit=d.fit)
    targets = None
    if split.targets is not None:  # keep the soft targets of the images that decoded
        row = {f: i for i, f in enumerate(split.files)}
        targets = split.targets[[row[f] for f in dec.files]]
    return dec.images, dec.labels, dec.files, list(dec.skipped), targets


def check_splits_for_training(train: Split, val: Split, classes: list[str], *, val_fraction: Optional[float]) -> None:
    """Training needs images in both splits: an empty one would train an epoch and then fail in
    validation. One line, before any training, naming the fix. val_fraction: None when the data set
    brings its own validation split (fer2013.csv's PublicTest rows), else the share carved from train."""
    if not len(train):
        raise DataError("the training split is empty (no image is left for training); add images to the data set")
    if len(val):
        return
    if val_fraction is None:
        raise DataError("the data set's own validation split is empty; give a data set whose validation split "
                        "holds images")
    per_class = np.bincount(train.targets(), minlength=len(classes))
    raise DataError(f"the validation split is empty: data.val_fraction={val_fraction:g} takes images only from "
                    f"classes with two or more, and the {len(train)} image(s) here are at most one per class "
                    f"({', '.join(f'{c} {n}' for c, n in zip(classes, per_class.tolist()))}); add more images "
                    f"(at least two per class)")


def load_datasets(cfg: Config, root: Path, check_classes: bool = True) -> Datasets:
    """The splits of the data set at `root`. check_classes, training's checks: its class count
    must be model.num_classes and neither split may be empty (evaluate checks against its
    checkpoints, and the split it reads, instead)."""
    d = cfg.data
    channels = cfg.model.in_channels
    reader = get_reader(cfg)
    raw = reader.read(cfg, Path(root))
    if check_classes:
        reader.check_for_training(raw)
    if check_classes and len(raw.classes) != cfg.model.num_classes:
        raise ConfigError(
            f"the data has {len(raw.classes)} classes ({', '.join(raw.classes)}) but model.num_classes="
            f"{cfg.model.num_classes}; set model.num_classes={len(raw.classes)}"
        )
    cache = Path(cfg.run.cache_dir) / "decoded"
    images, labels, files, skipped, targets = _decoded(raw.train, channels, cache, d)
    skipped = list(raw.skipped) + skipped
    if raw.val is None:
        tr_idx, val_idx = stratified_split(labels, d.val_fraction, seed=cfg.train.seed)
        val = Split(images, labels, val_idx, files, targets)
    else:
        tr_idx = np.arange(len(labels))
        v_images, v_labels, v_files, v_skipped, v_targets = _decoded(raw.val, channels, cache, d)
        skipped += v_skipped
        val = Split(v_images, v_labels, np.arange(len(v_labels)), v_files, v_targets)
    test = None
    if raw.test is not None:
        t_images, t_labels, t_files, t_skipped, t_targets = _decoded(raw.test, channels, cache, d)
        skipped += t_skipped
        test = Split(t_images, t_labels, np.arange(len(t_labels)), t_files, t_targets)
    train = Split(images, labels, tr_idx, files, targets)
    duplicates = None
    if d.dedupe != "off":
        duplicates, keep = audit_splits(train, val, test, d.dedupe, Path(cfg.run.cache_dir) / "audit")
        train.index = train.index[keep]
    if d.limit:
        train.index = np.sort(train.index[np.random.default_rng(cfg.train.seed).permutation(len(train))[: d.limit]])
    if check_classes:
        check_splits_for_training(train, val, raw.classes, val_fraction=None if raw.val is not None else d.val_fraction)
    for f, why in skipped:
        log.warning("skipped unreadable image %s (%s)", f, why)
    return Datasets(classes=raw.classes, train=train, val=val, test=test, channels=channels, root=str(root),
                    skipped=skipped, label_mode=raw.label_mode, excluded=raw.excluded, duplicates=duplicates)


class Rows:
    """A split's images as the audit reads them: rows of the (memory-mapped) decoded array picked by
    an index, read a slice at a time, never copied whole."""

    def __init__(self, images: np.ndarray, index: np.ndarray):
        self.images, self.index = images, index
        self.shape = (len(index), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.images[self.index[rows]]


def audit_splits(train: Split, val: Split, test: Optional[Split], mode: str, cache: Path) -> tuple[dict, np.ndarray]:
    """The leak audit (audit.py) across the splits, and the train positions to keep (`drop` leaves out
    what also appears in val or test). Its result is cached beside the decoded images, keyed on
    what the splits hold, so every rank and every later run reads it instead of hashing again."""
    from emotion_dist.data.audit import audit, dedupe

    splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    h = hashlib.sha256(f"audit v1 {mode}".encode())
    for name, sp in splits.items():
        h.update(name.encode() + np.asarray(sp.index).tobytes() + str(sp.images.shape).encode())
        h.update("\0".join(map(str, sp.files[:1] + sp.files[-1:])).encode("utf-8", "surrogateescape"))
    path = cache / f"{h.hexdigest()[:20]}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            return saved["report"], np.asarray(saved["keep"], dtype=np.int64)
        except (OSError, ValueError, KeyError):
            pass  # damaged: audit again
    result = audit({name: Rows(sp.images, np.sort(sp.index)) for name, sp in splits.items()},
                   {name: [sp.files[i] for i in np.sort(sp.index)] for name, sp in splits.items()})
    keep = dedupe(result, len(train), mode)
    log.info("%s", result.summary_line())
    try:
        atomic_write_bytes(path, json.dumps({"report": result.report, "keep": keep.tolist()}).encode())
    except OSError as e:
        log.warning("the audit result was not cached (%s); the next start audits again", e.strerror or e)
    return result.report, keep


def train_class_counts(ds: Datasets) -> np.ndarray:
    return np.bincount(ds.train.targets(), minlength=len(ds.classes))


def write_data_report(ds: Datasets, path: Path) -> None:
    counts = train_class_counts(ds).tolist()
    report = {
        "root": ds.root,
        "classes": ds.classes,
        "train": len(ds.train),
        "val": len(ds.val),
        "test": len(ds.test) if ds.test is not None else 0,
        "train_class_counts": dict(zip(ds.classes, counts)),
        "skipped_count": len(ds.skipped),
        "skipped": [{"file": f, "reason": r} for f, r in ds.skipped],
        "excluded": ds.excluded,
        "duplicates": ds.duplicates,
    }
    atomic_write_bytes(path, json.dumps(report, indent=1).encode())


def class_weights(ds: Datasets, mode: str = "balanced") -> torch.Tensor:
    """'balanced' weights as in scikit-learn: n / (k * count_c); 'sqrt': their square roots,
    a softer push towards the rare classes."""
    counts = train_class_counts(ds).astype(np.float64)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(np.sqrt(w) if mode == "sqrt" else w, dtype=torch.float32)


def class_log_prior(ds: Datasets) -> torch.Tensor:
    """log of each class's share of the training split (a class with no images counts as one)."""
    counts = train_class_counts(ds).astype(np.float64)
    return torch.tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)
