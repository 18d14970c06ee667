"""What a model file says about its model, checked as plain values before anything is built or run:
the class names, the input size, the channels and the normalisation, as a checkpoint (.pt) or an
ONNX export's JSON sidecar carries them. Imports no torch: the ONNX-only predict path uses it.

Each problem is one line naming the key, the value found and what it must be; the caller adds the
file's name and the fix that fits the file (modelio for checkpoints, inference/predict for sidecars).
"""

from __future__ import annotations

import math
from typing import Mapping

from emotion_dist.config import MAX_IMAGE_SIZE, InvalidImageSize, check_image_size

MAX_DATA_SIZE = 4096  # data.cache_size's upper bound: no run stores larger images
CHANNELS = {1: "grayscale", 3: "RGB"}


def short(value, limit: int = 60) -> str:
    """A value as it appears in a message: repr, cut to stay readable on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value) -> str:
    """'an int', 'a str', 'a list': the type of a value, with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def is_int(value) -> bool:
    """A whole number as JSON and torch.save store one (a bool or "64" is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def class_problems(classes, key: str) -> list[str]:
    if not isinstance(classes, (list, tuple)) or not classes:
        return [f"{key}={short(classes)} is not a list of class names (expected e.g. ['angry', 'happy', ...], "
                f"one per output of the model)"]
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        return [f"{key} holds {short(bad[0])}, not a class name (every entry must be a non-empty string)"]
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        return [f"{key} names {short(twice)} more than once (each class once, in the model's output order)"]
    return []


def channel_problems(channels) -> list[str]:
    if not is_int(channels) or channels not in CHANNELS:
        return [f"in_channels={short(channels)} is not 1 (grayscale) or 3 (RGB)"]
    return []


def size_problems(size, key: str = "image_size") -> list[str]:
    """data.image_size's rule (config.validate): a multiple of 32 that EmotionNet takes, at most MAX_IMAGE_SIZE."""
    want = f"a whole number of pixels, a multiple of 32 from 32 to {MAX_IMAGE_SIZE}"
    if not is_int(size):
        return [f"{key}={short(size)} is {type_name(size)}, not {want}"]
    try:
        check_image_size(size)
        fits = size <= MAX_IMAGE_SIZE
    except InvalidImageSize:
        fits = False
    return [] if fits else [f"{key}={size} is not a model input size ({want})"]


def data_size_problems(size) -> list[str]:
    if not is_int(size) or not 1 <= size <= MAX_DATA_SIZE:
        return [f"data_size={short(size)} is not the stored image size in pixels (a whole number from 1 to "
                f"{MAX_DATA_SIZE}; 48 for FER)"]
    return []


def normalization_problems(norm, channels) -> list[str]:
    """mean and std: `channels` finite numbers each (one per channel), every std > 0."""
    n = channels if is_int(channels) and channels in CHANNELS else None
    want = f"{n} finite number{'s' if n != 1 else ''}" if n else "one finite number per channel"
    if not isinstance(norm, Mapping) or not {"mean", "std"} <= set(norm):
        return [f"normalization={short(norm)} is not {{'mean': [...], 'std': [...]}} (the per-channel statistics "
                f"the model was trained with, e.g. {{'mean': [0.449], 'std': [0.226]}} for grayscale)"]
    problems = []
    for key in ("mean", "std"):
        values = norm[key]
        if not isinstance(values, (list, tuple)) or not all(is_real(v) for v in values) or not values:
            problems.append(f"normalization.{key}={short(values)} is not a list of {want}")
        elif n and len(values) != n:
            problems.append(f"normalization.{key}={short(values)} has {len(values)} value(s) for "
                            f"in_channels={n}; it needs {want}")
        elif key == "std" and any(v <= 0 for v in values):
            problems.append(f"normalization.std={short(values)} holds a value <= 0 (inputs are divided by it; "
                            f"every std must be > 0)")
    return problems


def meta_problems(meta: Mapping, *, classes_key: str, data_size_required: bool) -> list[str]:
    """Every problem with a model file's metadata, as one line each (empty: usable). `classes_key`
    is `class_names` in a checkpoint and `classes` in a sidecar."""
    problems = class_problems(meta.get(classes_key), classes_key)
    problems += channel_problems(meta.get("in_channels"))
    problems += size_problems(meta.get("image_size"))
    if data_size_required or "data_size" in meta:
        problems += data_size_problems(meta.get("data_size"))
    problems += normalization_problems(meta.get("normalization"), meta.get("in_channels"))
    return problems
