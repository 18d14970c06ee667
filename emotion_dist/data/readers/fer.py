"""The FER2013 challenge files and the FER+ vote labels, read as the papers use them.

- `fer2013.csv` (header `emotion,pixels,Usage`) and `icml_face_data.csv` (`emotion, Usage, pixels`):
  one 48x48 gray face per row, `emotion` 0-6 in FER order, `pixels` 2,304 space-separated values,
  `Usage` Training / PublicTest / PrivateTest -> the splits train / val / test (train on Training,
  select on PublicTest, report PrivateTest).
- `fer2013new.csv` (FER+, Barsoum et al. 2016): ten annotator votes per fer2013.csv row, row by row
  in the same order; an empty `Image name` is an image FER+ dropped. Labels follow the authors'
  reference code (microsoft/FERPlus, src/ferplus.py `_process_data`): single votes are discarded as
  outliers, then
    majority      the emotion with more than half the remaining votes (so no ties), else dropped;
    probability / crossentropy
                  the top emotions (at most 3) until they hold 75 % of the votes, kept when they hold
                  more than half, as a distribution over the 8 emotions (probability draws one label
                  from it each time the image is drawn; crossentropy trains on it).
  An image whose vote ends on `unknown` or `NF` (not a face) is dropped. Validation and test always
  use the majority label (the paper measures accuracy against it), whatever the training mode.

Files are streamed with the csv module (one row in memory at a time, plus the decoded uint8 images).
A bad row (wrong pixel count, a pixel that is not an integer 0-255, an unknown Usage, a label out of
range, votes that do not parse) is skipped, counted and logged on one line, like a corrupt image.
"""

from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from emotion_dist.data.readers.base import RawData, RawSplit, Reader, register
from emotion_dist.distributed import interrupts
from emotion_dist.errors import DataError

log = logging.getLogger("emotion_dist")

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
FERPLUS_CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
FERPLUS_VOTES = FERPLUS_CLASSES + ["unknown", "NF"]
SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
LABEL_MODES = ("majority", "probability", "crossentropy")
SIZE = 48
PIXELS = SIZE * SIZE

# header (fields stripped of spaces) -> the file it identifies
FER_HEADERS = {
    ("emotion", "pixels", "Usage"): "fer2013.csv",
    ("emotion", "Usage", "pixels"): "icml_face_data.csv",
}
FERPLUS_HEADER = ("Usage", "Image name", *FERPLUS_VOTES)
EXPECTED_FER = "'emotion,pixels,Usage' (fer2013.csv) or 'emotion, Usage, pixels' (icml_face_data.csv)"


@dataclass
class CsvSplit:
    """One split of the CSV: the images kept, in file order."""

    images: np.ndarray  # N x 1 x 48 x 48 uint8
    labels: np.ndarray  # N int64: FER's label, or FER+'s majority label (train, soft modes: the target's argmax)
    ids: np.ndarray  # N int64: the image's data row in the CSV (0 = the row after the header; FER+ joins on it)
    targets: Optional[np.ndarray] = None  # N x 8 float32 vote distribution (FER+ train, probability/crossentropy)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FerData:
    kind: str  # "fer2013.csv" or "icml_face_data.csv" (which header the file had)
    classes: list[str]
    splits: dict[str, CsvSplit]  # "train", "val", "test"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("fer2013.csv line 19", reason): bad rows
    excluded: dict[str, int] = field(default_factory=dict)  # FER+ labelling decisions (not errors): reason -> images


# ---------------------------------------------------------------- FER+ votes -> labels
def ferplus_label(votes: Sequence[int], mode: str) -> tuple[Optional[np.ndarray], str]:
    """Ten vote counts (FERPLUS_VOTES order) -> (8-class distribution, "") or (None, why it is dropped).
    majority gives a one-hot distribution. The rules are the reference code's, step by step (plain
    Python: numpy's per-call overhead on ten numbers cost more than the whole CSV parse)."""
    raw = [float(v) if v > 1 else 0.0 for v in votes]  # a single vote is an outlier
    total = sum(raw)
    kept = [0.0] * len(raw)
    if mode == "majority":
        peak = max(raw)
        if total == 0 or peak <= 0.5 * total:
            return None, "no majority"
        kept[raw.index(peak)] = 1.0
    else:
        # the top emotions, ties taken together in column order, until 75 % of the votes or 3
        # emotions; reaching unknown/NF ends the walk (and only counts when it came first)
        covered, count, walking = 0.0, 0, True
        while covered < 0.75 * total and count < 3 and walking:
            peak = max(raw)
            for i in [i for i, v in enumerate(raw) if v == peak]:
                kept[i], raw[i] = peak, 0.0
                covered += peak
                count += 1
                if i >= len(FERPLUS_CLASSES):
                    walking = False
                    if sum(kept) > peak:
                        kept[i] = 0.0
                        count -= 1
                    break
        if sum(kept) <= 0.5 * total or count > 3:
            return None, "votes too spread"
    top = kept.index(max(kept))
    if top >= len(FERPLUS_CLASSES):
        return None, f"majority {FERPLUS_VOTES[top]}"
    dist = np.asarray(kept[: len(FERPLUS_CLASSES)], dtype=np.float64)
    return (dist / dist.sum()).astype(np.float32), ""


# ---------------------------------------------------------------- parsing
def parse_pixels(text: str) -> np.ndarray:
    """'70 80 82 ...' -> 48x48 uint8; raises ValueError naming what is wrong."""
    # np.fromstring's text mode is numpy's C parser: ~10x faster than split() + int() on 2,304
    # values per row; with warnings as errors it refuses a token it cannot read (e.g. '12.5', 'x')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            raise ValueError("a pixel value is not an integer") from None
    if len(values) != PIXELS:
        raise ValueError(f"{len(values)} pixel values, expected {PIXELS}")
    if values.min() < 0 or values.max() > 255:
        raise ValueError("a pixel value is outside 0-255")
    return values.astype(np.uint8).reshape(SIZE, SIZE)


def parse_label(text: str, classes: int) -> int:
    try:
        label = int(text.strip())
    except ValueError:
        raise ValueError(f"label {text.strip()[:20]!r} is not an integer 0-{classes - 1}") from None
    if not 0 <= label < classes:
        raise ValueError(f"label {label} is out of range 0-{classes - 1}")
    return label


def parse_usage(text: str) -> str:
    usage = text.strip()
    if usage not in SPLITS:
        raise ValueError(f"Usage {usage[:20]!r} is not Training, PublicTest or PrivateTest")
    return usage


def parse_votes(fields: list[str]) -> list[int]:
    try:
        votes = [int(f) for f in fields]  # int() accepts surrounding spaces
    except ValueError:
        raise ValueError("a FER+ vote count is not an integer") from None
    if min(votes) < 0:
        raise ValueError("a FER+ vote count is negative")
    return votes


def _open_csv(path: Path, expected: str):
    """(csv reader past the header, the header's fields stripped of spaces, the open file)."""
    if not path.is_file():
        raise DataError(f"{path} is not a file; point it at {expected}")
    f = open(path, newline="", encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the header
    reader = csv.reader(f)
    try:
        header = tuple(h.strip() for h in next(reader, []))
    except (UnicodeDecodeError, csv.Error):
        f.close()
        raise DataError(f"{path} is not a text CSV; expected the header {expected}") from None
    return reader, header, f


def _iterate(reader, path: Path):
    try:
        for row in reader:
            yield row
    except UnicodeDecodeError:
        raise DataError(f"{path} line {reader.line_num + 1} is not UTF-8 text; the file is damaged") from None
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}; the file is damaged") from None


def read_fer_csv(path: str | Path, ferplus: str | Path | None = None, label_mode: str = "majority") -> FerData:
    """Read fer2013.csv or icml_face_data.csv, optionally with fer2013new.csv's FER+ labels."""
    path = Path(path)
    if label_mode not in LABEL_MODES:
        raise DataError(f"data.label_mode={label_mode} is invalid; allowed: {', '.join(LABEL_MODES)}")
    if label_mode != "majority" and ferplus is None:
        raise DataError(f"data.label_mode={label_mode} needs FER+ votes; set data.ferplus=PATH to fer2013new.csv")
    reader, header, f = _open_csv(path, EXPECTED_FER)
    plus_f = None
    try:
        kind = FER_HEADERS.get(header)
        if kind is None:
            raise DataError(f"{path} is neither fer2013.csv nor icml_face_data.csv: its header is "
                            f"{','.join(header)[:80]!r}; expected {EXPECTED_FER}")
        col = {name: header.index(name) for name in header}
        plus_rows = None
        if ferplus is not None:
            ferplus = Path(ferplus)
            plus_expected = f"'{','.join(FERPLUS_HEADER)}' (fer2013new.csv)"
            plus_reader, plus_header, plus_f = _open_csv(ferplus, plus_expected)
            if plus_header != FERPLUS_HEADER:
                raise DataError(f"data.ferplus={ferplus} is not fer2013new.csv: its header is "
                                f"{','.join(plus_header)[:80]!r}; expected {plus_expected}")
            plus_rows = _iterate(plus_reader, ferplus)
        classes = FERPLUS_CLASSES if ferplus is not None else FER_CLASSES
        images = {s: [] for s in SPLITS.values()}
        labels = {s: [] for s in SPLITS.values()}
        ids = {s: [] for s in SPLITS.values()}
        targets = {s: [] for s in SPLITS.values()}
        skipped: list[tuple[str, str]] = []
        excluded: dict[str, int] = {}
        row_id = -1
        for row_id, row in enumerate(_iterate(reader, path)):
            if row_id % 1024 == 0:
                interrupts.check()
            where = f"{path.name} line {reader.line_num}"
            plus = None
            if plus_rows is not None:
                plus = next(plus_rows, None)
                if plus is None:
                    raise DataError(f"data.ferplus={ferplus} ends at row {row_id} but {path.name} goes on: FER+ "
                                    f"labels join row by row; use the fer2013new.csv made for this file")
            try:
                if len(row) != 3:
                    raise ValueError(f"{len(row)} fields, expected 3")
                label = parse_label(row[col["emotion"]], len(FER_CLASSES))
                usage = parse_usage(row[col["Usage"]])
                pixels = parse_pixels(row[col["pixels"]])
            except ValueError as e:
                skipped.append((where, str(e)))
                continue
            split = SPLITS[usage]
            target = None
            if plus is not None:
                plus_where = f"{ferplus.name} line {plus_reader.line_num}"
                try:
                    if len(plus) != len(FERPLUS_HEADER):
                        raise ValueError(f"{len(plus)} fields, expected {len(FERPLUS_HEADER)}")
                    plus_usage = parse_usage(plus[0])
                    votes = parse_votes(plus[2:])
                except ValueError as e:
                    skipped.append((plus_where, str(e)))
                    continue
                if plus_usage != usage:
                    raise DataError(f"{plus_where} says {plus_usage} where {where} says {usage}: the files are not "
                                    f"row-aligned; use the fer2013new.csv made for this {path.name}")
                if not plus[1].strip():
                    excluded["dropped by FER+"] = excluded.get("dropped by FER+", 0) + 1
                    continue
                target, why = ferplus_label(votes, label_mode if split == "train" else "majority")
                if target is None:
                    excluded[why] = excluded.get(why, 0) + 1
                    continue
                label = int(np.argmax(target))
            images[split].append(pixels)
            labels[split].append(label)
            ids[split].append(row_id)
            targets[split].append(target)
        if plus_rows is not None and next(plus_rows, None) is not None:
            raise DataError(f"data.ferplus={ferplus} has more rows than {path.name} ({row_id + 1}): FER+ labels "
                            f"join row by row; use the fer2013new.csv made for this file")
    finally:
        f.close()
        if plus_f is not None:
            plus_f.close()
    for where, why in skipped:
        log.warning("skipped bad row %s (%s)", where, why)
    soft = ferplus is not None and label_mode != "majority"
    splits = {
        s: CsvSplit(
            images=np.stack(images[s])[:, None] if images[s] else np.zeros((0, 1, SIZE, SIZE), np.uint8),
            labels=np.asarray(labels[s], dtype=np.int64),
            ids=np.asarray(ids[s], dtype=np.int64),
            targets=(np.stack(targets[s]) if targets[s] else np.zeros((0, len(classes)), np.float32))
            if soft and s == "train" else None,
        )
        for s in SPLITS.values()
    }
    return FerData(kind=kind, classes=list(classes), splits=splits, skipped=skipped, excluded=excluded)


def check_usage_rows(path: Path, counts: dict[str, int], skipped: int) -> None:
    """Training reads Training rows and selects on PublicTest rows: a file without either (a header
    alone, a Training-only extract) would train an epoch and fail in validation. Refused before
    any training; PrivateTest rows are optional (no test pass without them)."""
    usage = {split: name for name, split in SPLITS.items()}
    missing = [usage[s] for s in ("train", "val") if not counts[s]]
    if not missing:
        return
    held = ", ".join(f"{counts[s]} {usage[s]}" for s in SPLITS.values())
    bad = f", {skipped} bad row(s) skipped" if skipped else ""
    raise DataError(f"{path} has no usable {' or '.join(missing)} rows ({held}{bad}); training needs Training rows "
                    f"(train) and PublicTest rows (validation): use the full fer2013.csv or icml_face_data.csv")


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

    def check_for_training(self, raw: RawData) -> None:
        counts = {"train": len(raw.train), "val": len(raw.val) if raw.val is not None else 0,
                  "test": len(raw.test) if raw.test is not None else 0}
        check_usage_rows(Path(raw.root), counts, len(raw.skipped))

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

        from emotion_dist.utils.fsutil import temp_path

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
