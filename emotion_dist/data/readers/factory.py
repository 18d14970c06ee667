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
from pathlib import Path

from emotion_dist.data.readers import fer, folder, synthetic  # noqa: F401  (each registers its reader)
from emotion_dist.data.readers.base import READERS, Reader
from emotion_dist.errors import DataError

log = logging.getLogger("emotion_dist")


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
