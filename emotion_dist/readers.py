"""Dataset readers, keyed by `data.source`: where a data set's images come from and how they are
labelled. A reader has two steps:

- `prepare(cfg) -> Path`: the heavy, once-per-node (or once-per-job) part: generate the synthetic
  faces, download through kagglehub, or just check that `data.root` is there.
- `read(cfg, root) -> RawData`: class names and, per split, the labels and either the image files
  (decoded once into the uint8 cache by data.py) or images already decoded (CSV pixel strings).

`data.source=auto` (the default) picks the reader from `data.root`: none -> synthetic, a folder ->
folder, a .csv file -> fer2013_csv. An existing folder is read as data, never written to.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import interrupts
from .errors import DataError
from .images import IMAGE_EXTS, printable

log = logging.getLogger("emotion_dist")


@dataclass
class RawSplit:
    labels: np.ndarray  # int64, one per image
    files: Optional[list[str]] = None  # image files, decoded through the cache
    images: Optional[np.ndarray] = None  # or images already decoded: N x C x S x S uint8
    ids: Optional[list[str]] = None  # what reports call each image (file name, "row 17")
    targets: Optional[np.ndarray] = None  # soft targets N x K (vote distributions), when the data has them

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawData:
    classes: list[str]
    train: RawSplit
    val: Optional[RawSplit]  # a canonical validation split; None: carved from train (data.val_fraction)
    test: Optional[RawSplit]
    root: str
    skipped: list = field(default_factory=list)  # (item, reason) read but unusable
    label_mode: str = "majority"
    excluded: dict = field(default_factory=dict)  # images left out by the labelling rules (FER+): reason -> count


class Reader:
    name = ""

    def prepare(self, cfg) -> Path:
        raise NotImplementedError

    def read(self, cfg, root: Path) -> RawData:
        raise NotImplementedError


READERS: dict[str, type[Reader]] = {}


def register(cls: type[Reader]) -> type[Reader]:
    READERS[cls.name] = cls
    return cls


def resolve_source(cfg) -> str:
    """The reader `data.source` names, or for `auto` the one `data.root` calls for."""
    d = cfg.data
    if d.source != "auto":
        return d.source
    if not d.root:
        return "synthetic"
    root = Path(d.root)
    if root.is_dir():
        return "folder"
    if root.is_file() and root.suffix.lower() == ".csv":
        return "fer2013_csv"
    if root.is_file():
        raise DataError(f"data.root={root} is a file; point it at a dataset folder (train/<class>/*.jpg) or a "
                        f"fer2013.csv file")
    raise DataError(f"data.root={root} does not exist; point it at a dataset (a folder of class folders, or "
                    f"fer2013.csv), or set data.source=synthetic to generate the synthetic faces there")


def get_reader(cfg) -> Reader:
    name = resolve_source(cfg)
    if name not in READERS:
        raise DataError(f"data.source={name} has no reader here; use one of {', '.join(sorted(READERS))}")
    return READERS[name]()


# ------------------------------------------------------------------------------------ folders
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
    raise DataError(f"no class folders under {printable(root)}; expected train/<class>/*.jpg (or train/train/<class>)")


def scan(folder: Path, classes: Optional[list[str]] = None) -> tuple[list[str], list[str], list[int]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None and found != classes:
        raise DataError(
            f"class folders in {printable(folder)} ({', '.join(map(printable, found))}) differ from the training "
            f"classes ({', '.join(map(printable, classes))}); make both splits have the same class folders"
        )
    files, labels = [], []
    for label, name in enumerate(found):
        members = sorted(
            str(p) for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        )
        if not members:
            raise DataError(f"class folder {printable(folder / name)} has no images; add images or remove the folder")
        files += members
        labels += [label] * len(members)
    return found, files, labels


@register
class FolderReader(Reader):
    """An ImageFolder tree: train/<class>/*.jpg with test/ (or val/), or the Kaggle nesting."""

    name = "folder"

    def prepare(self, cfg) -> Path:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise DataError(f"data.root={root} is not a folder; point it at an ImageFolder tree (train/<class>/*.jpg)")
        return root

    def read(self, cfg, root: Path) -> RawData:
        train_dir, test_dir = find_splits(root)
        classes, files, labels = scan(train_dir)
        test = None
        if test_dir is not None:
            _, tfiles, tlabels = scan(test_dir, classes)
            test = RawSplit(np.asarray(tlabels, dtype=np.int64), files=tfiles)
        return RawData(classes, RawSplit(np.asarray(labels, dtype=np.int64), files=files), None, test, str(root))


@register
class SyntheticReader(FolderReader):
    """The built-in synthetic faces, generated once into data.root (a new or empty folder, or one of
    its own sets) or into run.cache_dir."""

    name = "synthetic"

    def prepare(self, cfg) -> Path:
        from .synthetic import generate

        d = cfg.data
        root = Path(d.root) if d.root else Path(cfg.run.cache_dir) / (
            f"synthetic-{d.synthetic_train}-{d.synthetic_test}-s{d.synthetic_seed}")
        return generate(root, d.synthetic_train, d.synthetic_test, d.synthetic_seed)


@register
class KaggleReader(FolderReader):
    """The Kaggle JPG copy of FER2013 through kagglehub (honours KAGGLEHUB_CACHE), or data.root."""

    name = "kaggle"

    def prepare(self, cfg) -> Path:
        if cfg.data.root:
            return super().prepare(cfg)
        return kaggle_download(cfg.data.kaggle_handle)


def kaggle_download(handle: str) -> Path:
    try:
        import kagglehub
    except ImportError:
        raise DataError("data.source=kaggle needs kagglehub: pip install kagglehub (or pass data.root=PATH)") from None
    box: dict = {}

    def fetch():
        try:
            box["path"] = Path(kagglehub.dataset_download(handle))
        except Exception as e:  # network, auth, unknown handle: all end the same way for the user
            box["error"] = e

    # in a thread, so that a stop signal (Slurm preemption) is answered while a download runs;
    # kagglehub completes or discards its own partial files
    worker = threading.Thread(target=fetch, daemon=True, name="kagglehub-download")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        interrupts.check()
    if "error" in box:
        raise DataError(
            f"kagglehub could not fetch {handle} ({type(box['error']).__name__}); download it elsewhere and pass "
            f"data.source=folder data.root=PATH"
        )
    return box["path"]


# ------------------------------------------------------------------------------------ FER2013 CSV
@register
class FER2013CSVReader(Reader):
    """The original challenge file (fer2013.csv or icml_face_data.csv), with FER+ votes when
    data.ferplus is set: Training -> train, PublicTest -> validation (every selection decision),
    PrivateTest -> test (read once, at the end). Parsed once per node or job into an .npz in
    run.cache_dir (35,887 rows of 2,304 numbers take ~15 s to parse), then loaded by every rank."""

    name = "fer2013_csv"
    CACHE_VERSION = 1

    def prepare(self, cfg) -> Path:
        d = cfg.data
        for key, value in (("data.root", d.root), ("data.ferplus", d.ferplus)):
            if value is not None and not Path(value).is_file():
                raise DataError(f"{key}={value} is not a file; point it at "
                                f"{'fer2013.csv (or icml_face_data.csv)' if key == 'data.root' else 'fer2013new.csv'}")
        cache = self._cache_path(cfg)
        if not self._load(cache):
            self._parse_to(cache, cfg)
        return Path(d.root)

    def read(self, cfg, root: Path) -> RawData:
        cache = self._cache_path(cfg)
        data = self._load(cache) or self._parse_to(cache, cfg)
        channels = cfg.model.in_channels

        def split(name: str) -> Optional[RawSplit]:
            images = data[f"{name}_images"]
            if channels == 3:  # a gray face for an RGB model: the same plane three times
                images = np.repeat(images, 3, axis=1)
            soft = data.get(f"{name}_targets")
            return RawSplit(data[f"{name}_labels"], images=images, ids=[f"row {i}" for i in data[f"{name}_ids"]],
                            targets=soft)

        test = split("test")
        meta = data["meta"]
        return RawData(list(meta["classes"]), split("train"), split("val"), test if len(test) else None, str(root),
                       skipped=[tuple(s) for s in meta["skipped"]], label_mode=cfg.data.label_mode,
                       excluded=meta["excluded"])

    def _cache_path(self, cfg) -> Path:
        import hashlib
        import os

        d = cfg.data
        h = hashlib.sha256(f"v{self.CACHE_VERSION} {d.label_mode}".encode())
        for p in (d.root, d.ferplus):
            if p is not None:
                st = os.stat(p)
                h.update(os.fsencode(os.path.abspath(p)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return Path(cfg.run.cache_dir) / "fer" / f"{h.hexdigest()[:20]}.npz"

    @staticmethod
    def _load(cache: Path) -> Optional[dict]:
        import json
        import zipfile

        if not cache.is_file():
            return None
        try:
            with np.load(cache) as z:
                data = {k: z[k] for k in z.files}
            data["meta"] = json.loads(str(data["meta"]))
            return data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            log.warning("the parsed-CSV cache %s is damaged (%s); parsing the CSV again", cache, type(e).__name__)
            return None

    def _parse_to(self, cache: Path, cfg) -> dict:
        import json
        import os

        from .fer import read_fer_csv
        from .fsutil import temp_path

        d = cfg.data
        fer = read_fer_csv(d.root, d.ferplus, d.label_mode)
        data: dict = {}
        for name, s in fer.splits.items():
            data.update({f"{name}_images": s.images, f"{name}_labels": s.labels, f"{name}_ids": s.ids})
            if s.targets is not None:
                data[f"{name}_targets"] = s.targets
        meta = {"classes": fer.classes, "kind": fer.kind, "skipped": fer.skipped, "excluded": fer.excluded}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(cache)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.asarray(json.dumps(meta)), **data)
            os.replace(tmp, cache)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {**data, "meta": meta}
