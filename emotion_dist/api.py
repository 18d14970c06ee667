"""The Python API, for notebooks and scripts: the same code paths as the command line, called as
functions.

    import emotion_dist as ed

    model = ed.load("runs/default/checkpoints/best.pt")   # or model.onnx, or an export's folder
    model.classes                                          # ['angry', 'disgust', ...]
    faces = model.predict(["photo.jpg", "photos/"])       # what `emotion-dist predict` prints
    faces[0].label, faces[0].probability, faces[0].box

    result = ed.train("configs/default.yaml", train={"epochs": 2}, run={"name": "try"})
    result["run_dir"], result["test_macro_f1"]

`load` wraps inference/predict.py's classifiers (a .pt through PyTorch, an .onnx through
onnxruntime with no torch import) and its face pipeline, so answers match the CLI's. `train` runs
`emotion-dist train` in this process (commands/train.py through cli.py) and returns its final
JSON document. `EmotionNet` is the model class itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from emotion_dist.errors import CheckpointError, ConfigError, TrainingAborted

__all__ = ["load", "train", "Model", "Predictions", "EmotionNet"]  # noqa: F822  (EmotionNet: module __getattr__ below)

PathLike = Union[str, os.PathLike]


def __getattr__(name: str):
    if name == "EmotionNet":  # torch and ultralytics load only when the model class is asked for
        from emotion_dist.model import EmotionNet

        return EmotionNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Predictions(list):
    """The faces found (inference.predict.Face: file, box, label, probability, probabilities), one
    per face, in input order; `.messages` holds one line per input without a result (unreadable,
    no face found), as the CLI prints them on stderr."""

    def __init__(self, faces=(), messages=()):
        super().__init__(faces)
        self.messages = list(messages)


class Model:
    """A loaded classifier: `.classes`, `.predict(...)`, `.probabilities(crops)`; `.path` and
    `.kind` ("torch" or "onnx") say what was loaded."""

    def __init__(self, path: Path):
        from emotion_dist.inference.predict import OnnxClassifier, load_classifier

        self.path = path
        self.classifier = load_classifier(str(path))
        self.kind = "onnx" if isinstance(self.classifier, OnnxClassifier) else "torch"

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    @property
    def meta(self) -> dict:
        """Classes, image size, channels and normalization, as the export sidecar holds them."""
        return dict(self.classifier.meta)

    def __repr__(self) -> str:
        return f"emotion_dist.Model({str(self.path)!r}, {self.kind}, classes={self.classes})"

    def predict(self, images, *, detect: bool = True, detector: str = "retinaface", align: bool = True) -> Predictions:
        """Faces and expressions in `images`: a path (an image or a folder of images), a list of
        paths, or pictures in memory (a numpy uint8 array, H x W grayscale or H x W x 3 RGB, or a
        PIL image), alone or in a list. The CLI's face pipeline (inference.predict.FaceSource):
        `detector` retinaface (5 landmarks, faces aligned by them unless `align=False`) or haar;
        `detect=False`: each picture is one face crop (the CLI's --no-detect). Paths go through the
        CLI's own loop (inference.predict.iter_predictions)."""
        from emotion_dist.inference.predict import Face, FaceSource, iter_images, iter_predictions

        source = FaceSource(detector=detector if detect else None, align=align)
        items = [images] if _single(images) else list(images)
        faces, messages = [], []
        paths: list[str] = []

        def flush_paths() -> None:
            for _, found, message in iter_predictions(self.classifier, iter_images(paths), source):
                faces.extend(found)
                messages.extend([message] if message else [])
            paths.clear()

        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                paths.append(str(item))
                continue
            flush_paths()
            name = f"<image {i}>"
            records = source.faces(self.classifier, Path(name), _picture(item))
            if not records:
                messages.append(f"{name}: no face found (use detect=False for pictures that are already face crops)")
            faces += [Face(name, **r) for r in records]
        flush_paths()
        return Predictions(faces, messages)

    def probabilities(self, crops) -> "Any":
        """Class probabilities (N x classes, numpy) for face crops (uint8 arrays), no detection."""
        return self.classifier.probabilities([_picture(c) for c in crops])


def _single(x) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    return hasattr(x, "shape") or hasattr(x, "getbands")  # a numpy array, a PIL image


def _picture(item):
    """A picture in memory as the CLI's read_image gives it: uint8, H x W or H x W x 3 RGB."""
    import numpy as np

    if hasattr(item, "getbands"):  # PIL
        item = np.asarray(item.convert("L" if item.mode in ("L", "I;16", "I", "1") else "RGB"))
    arr = np.asarray(item)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ConfigError(f"a picture must be uint8, H x W (gray) or H x W x 3 (RGB); got {arr.dtype} "
                          f"{tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def resolve_model_path(path: PathLike) -> Path:
    """A .pt checkpoint or .onnx model as given; a folder: the one model an export put there (an
    .onnx with its sidecar, else one .pt), or a run directory's checkpoints/best.pt."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist; pass a .pt checkpoint, an .onnx model or an export's folder")
    onnx = sorted(q for q in p.glob("*.onnx") if q.with_suffix(".json").is_file())
    pts = sorted(p.glob("*.pt"))
    best = p / "checkpoints" / "best.pt"
    for found in (onnx, pts, [best] if best.is_file() else []):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{p} holds {len(found)} models ({', '.join(q.name for q in found[:3])}); pass "
                                  f"the file itself")
    raise CheckpointError(f"{p} holds no model (.onnx with its .json sidecar, .pt, or checkpoints/best.pt); pass "
                          f"the file itself")


def load(path: PathLike) -> Model:
    """A checkpoint (.pt), an exported ONNX model (.onnx + sidecar) or a folder holding one."""
    return Model(resolve_model_path(path))


def _overrides(config: Optional[Mapping], sections: Mapping[str, Any]) -> list[str]:
    """A config dict (nested sections or dotted keys) and keyword sections as key=value overrides,
    each value spelt as YAML so that the command line's own parser reads it back as it was."""
    from emotion_dist.config import format_default

    tree: dict[str, Any] = {}
    for source in (config or {}, sections):
        for key, value in source.items():
            key = key.replace("__", ".")  # train__epochs=2 works as a keyword too
            if isinstance(value, Mapping) and "." not in key:
                tree.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                tree[key] = value
    out = []
    for key, value in tree.items():
        text = value if isinstance(value, str) else format_default(value)
        out.append(f"{key}={text}")
    return out


def train(config: Union[PathLike, Mapping, Iterable[PathLike], None] = None, **overrides) -> dict:
    """Train as `emotion-dist train` does, in this process (one process; torchrun for more). `config`:
    a YAML path, several (merged in order), or a dict of sections ({"train": {"epochs": 2}}) or
    dotted keys; keyword arguments override it: `train={"epochs": 2}`, `run={"name": "x"}`,
    `train__epochs=2` or `**{"train.epochs": 2}`. Returns the run's final JSON document (run_dir,
    global_step, best_val_macro_f1, test_accuracy, ...). Bad input raises ConfigError, a failed run
    TrainingAborted (their message is also printed, as the CLI prints it). The stop-signal handlers
    the run installs are removed again, so a notebook's Ctrl-C works as before afterwards."""
    from emotion_dist import cli
    from emotion_dist.distributed import interrupts

    paths: list[str] = []
    mapping = None
    if isinstance(config, Mapping):
        mapping = config
    elif isinstance(config, (str, os.PathLike)):
        paths = [str(config)]
    elif config is not None:
        paths = [str(c) for c in config]
    out = argparse.Namespace(json=False, json_out=None, print_config=False, document=None)
    with interrupts.handlers_restored():
        code = cli.train_in_process(paths or None, _overrides(mapping, overrides), out)
    if code == 2:
        raise ConfigError("emotion-dist train refused the input: see the error line above")
    if code == 1 or out.document is None:
        raise TrainingAborted(f"emotion-dist train failed (exit {code}): see the error line above")
    return dict(out.document)
