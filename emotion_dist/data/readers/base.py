"""What every dataset reader returns (RawData of RawSplits) and the registry `data.source` names."""


from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

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

    def check_for_training(self, raw: RawData) -> None:
        """A reader's own one-line refusal of data that cannot train (its wording beats the generic
        check's); evaluation reads the same data without it."""


READERS: dict[str, type[Reader]] = {}


def register(cls: type[Reader]) -> type[Reader]:
    READERS[cls.name] = cls
    return cls
