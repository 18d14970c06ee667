"""ImageFolder trees (train/<class>/ with test/ or val/, or the Kaggle nesting) and the Kaggle copy of FER2013."""


from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from emotion_dist.data.images import IMAGE_EXTS, printable
from emotion_dist.data.readers.base import RawData, RawSplit, Reader, register
from emotion_dist.distributed import interrupts
from emotion_dist.errors import DataError

log = logging.getLogger("emotion_dist")


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
