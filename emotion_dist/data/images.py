"""Image files: which names count as images, and decoding any common mode to uint8 — one place
that training data and `predict` share (they used to keep two extension sets and two decoders).

Decoding goes through PIL with the path as a Python string: a file name that is not valid UTF-8
(surrogate-escaped by the OS layer) opens like any other, where OpenCV's `imread` crashed on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def printable(path: str | os.PathLike) -> str:
    """A file name safe to print or put in JSON whatever bytes it holds (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_uint8(img) -> "PIL.Image.Image":  # noqa: F821
    """Any PIL mode to 8-bit L or RGB: 16-bit and float stretched to 0..255 (not clipped), alpha
    and palette transparency composited over white, CMYK converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode not in ("L", "RGB"):
        return img.convert("RGB")
    return img


def read_uint8(path: str | os.PathLike, channels: Optional[int] = None) -> np.ndarray:
    """Decode a file to uint8 H x W x C: C = `channels` (1 gray, 3 RGB), or the file's own (1 or 3)
    when None. Raises an exception (OSError, ValueError, ...) for a file that is not a readable image."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        img = to_uint8(img)
        if channels is not None:
            img = img.convert("L" if channels == 1 else "RGB")
        a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a
