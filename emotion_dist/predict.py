"""`emotion-dist predict`: find faces with OpenCV's bundled Haar cascade, classify each with a
checkpoint (.pt, PyTorch) or an exported model (.onnx, onnxruntime: no torch at run time)."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTS

MAX_DETECT_SIDE = 1024  # huge photos are searched downscaled; boxes are mapped back
MIN_FACE_FRACTION = 1 / 16  # faces smaller than this share of the shorter side are too small to read
MARGIN = 0.15


@dataclass
class Face:
    file: str
    box: list[int]  # x, y, w, h in the original image
    label: str
    probability: float
    probabilities: dict


class Classifier:
    """Common front: uint8 crops -> probabilities, preprocessing identical for .pt and .onnx."""

    def __init__(self, meta: dict):
        self.meta = meta
        self.classes = meta["classes"]
        self.channels = meta["in_channels"]
        self.mean = np.asarray(meta["normalization"]["mean"], np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(meta["normalization"]["std"], np.float32).reshape(1, -1, 1, 1)

    def preprocess(self, crops: list[np.ndarray]) -> np.ndarray:
        import cv2

        d, s = self.meta["data_size"], self.meta["image_size"]
        out = []
        for c in crops:  # as in training: decoded at the data's size, then bilinear to the input size
            c = cv2.resize(c, (d, d), interpolation=cv2.INTER_AREA) if c.shape[:2] != (d, d) else c
            c = cv2.resize(c, (s, s), interpolation=cv2.INTER_LINEAR) if d != s else c
            c = c.astype(np.float32) / 255.0
            out.append(c[None] if c.ndim == 2 else c.transpose(2, 0, 1))
        return (np.stack(out) - self.mean) / self.std

    def probabilities(self, crops: list[np.ndarray]) -> np.ndarray:
        logits = self.logits(self.preprocess(crops).astype(np.float32))
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


class TorchClassifier(Classifier):
    def __init__(self, path: str):
        from .export import load_model

        self.model, meta = load_model(path)
        super().__init__(meta)

    def logits(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


class OnnxClassifier(Classifier):
    def __init__(self, path: str):
        import onnxruntime as ort

        from .config import ConfigError

        sidecar = Path(path).with_suffix(".json")
        if not sidecar.is_file():
            raise ConfigError(f"{sidecar} (classes, sizes) is missing next to {path}; re-run emotion-dist export")
        super().__init__(json.loads(sidecar.read_text()))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": x})[0]


def load_classifier(path: str) -> Classifier:
    return OnnxClassifier(path) if str(path).endswith(".onnx") else TorchClassifier(path)


def read_image(path: Path) -> np.ndarray:
    """Any common mode to 8-bit BGR or grayscale; raises ValueError with a reason."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("unreadable (not an image, truncated or unsupported format)")
    if img.dtype != np.uint8:  # 16-bit or float: stretch to 8-bit
        img = img.astype(np.float64)
        lo, hi = img.min(), img.max()
        img = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:  # alpha over white
        alpha = img[:, :, 3:4].astype(np.float32) / 255
        img = (img[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img


@functools.cache
def _face_cascade():
    import cv2

    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def detect_faces(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    import cv2

    cascade = _face_cascade()  # parsed once, not per image
    scale = min(1.0, MAX_DETECT_SIDE / max(gray.shape))
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
    side = max(40, int(min(small.shape) * MIN_FACE_FRACTION))
    found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    return [tuple(int(round(v / scale)) for v in box) for box in found]


def crop(img: np.ndarray, box, margin: float = MARGIN) -> np.ndarray:
    x, y, w, h = box
    mx, my = int(w * margin), int(h * margin)
    return img[max(0, y - my): y + h + my, max(0, x - mx): x + w + mx]


def iter_images(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        else:
            files.append(p)
    return files


def predict(classifier: Classifier, inputs: list[str], detect: bool = True, out_dir: str | None = None):
    """Returns (faces, messages): one Face per face found, one message per file without a result."""
    import cv2

    faces, messages = [], []
    for path in iter_images(inputs):
        try:
            img = read_image(path)
        except ValueError as e:
            messages.append(f"{path}: {e}")
            continue
        gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        boxes = detect_faces(gray) if detect else [(0, 0, img.shape[1], img.shape[0])]
        if not boxes:
            messages.append(f"{path}: no face found (use --no-detect for images that are already face crops)")
            continue
        source = gray if classifier.channels == 1 else (
            cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        probs = classifier.probabilities([crop(source, b, MARGIN if detect else 0.0) for b in boxes])
        found = []
        for box, p in zip(boxes, probs):
            k = int(p.argmax())
            found.append(Face(str(path), list(box), classifier.classes[k], float(p[k]),
                              {c: round(float(v), 6) for c, v in zip(classifier.classes, p)}))
        faces += found
        if out_dir:
            annotate(img, found, Path(out_dir) / f"{path.stem}_pred.png")
    return faces, messages


def annotate(img: np.ndarray, faces: list[Face], path: Path) -> None:
    import cv2

    canvas = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img.copy()
    thick = max(1, round(max(canvas.shape[:2]) / 300))
    for f in faces:
        x, y, w, h = f.box
        cv2.rectangle(canvas, (x, y), (x + w, y + h), (40, 220, 40), thick)
        text = f"{f.label} {f.probability:.2f}"
        scale = max(0.4, w / 250)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = max(th + 4, y - 4)
        cv2.rectangle(canvas, (x, ty - th - 4), (x + tw + 4, ty + 2), (40, 220, 40), -1)
        cv2.putText(canvas, text, (x + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)


def run_predict(args) -> int:
    classifier = load_classifier(args.checkpoint)
    faces, messages = predict(classifier, args.inputs, detect=not args.no_detect, out_dir=args.out)
    for m in messages:
        print(m, file=sys.stderr)
    if args.json:
        print(json.dumps({"faces": [asdict(f) for f in faces], "messages": messages}, indent=1))
    else:
        for f in faces:
            x, y, w, h = f.box
            print(f"{f.file}  box=({x},{y},{w},{h})  {f.label}  {f.probability:.3f}")
    return 0 if faces or not messages else 1
