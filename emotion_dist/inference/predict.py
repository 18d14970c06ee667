"""`emotion-dist predict`: find faces with OpenCV's bundled Haar cascade, classify each with a
checkpoint (.pt, PyTorch) or an exported model (.onnx, onnxruntime: no torch at run time).
Still images here; video files and cameras in `video.py`.

Output: one human line per face on stdout as each file is done, and a message on stderr for each
file without a result. With `--json`, stdout holds exactly one JSON document (printed at the end)
and nothing else; `--json-out FILE` writes the same document to a file. A file that cannot be read
is a message, never the end of the batch; a stop signal ends the batch with what was done so far.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from emotion_dist.distributed import interrupts
from emotion_dist.utils import filekind
from emotion_dist.errors import CheckpointError, ConfigError
from emotion_dist.utils.fsutil import (atomic_write_bytes, atomic_write_json, disk_error, guard_output, json_written_by_us,
                     remove_stale_temps)
from emotion_dist.data.images import IMAGE_EXTS, printable, read_uint8

MAX_DETECT_SIDE = 1024  # huge photos are searched downscaled; boxes are mapped back
MIN_FACE_FRACTION = 1 / 16  # faces smaller than this share of the shorter side are too small to read
MARGIN = 0.15
MARK = "emotion-dist predict"  # in the PNGs and videos it writes, so a re-run may replace them
UNREADABLE = "unreadable (not an image, truncated or unsupported format)"
NO_FACE = "no face found (use --no-detect for images that are already face crops)"
EXPORT_FIX = "re-run emotion-dist export --format onnx to write the model and its sidecar again"


def preprocessing_recipe(meta: dict, config: Optional[dict] = None) -> dict:
    """How predict turns a photo into the model's input, in words and numbers a consumer without
    emotion-dist can follow (the ONNX metadata, the sidecars and the model card carry it): the face
    detector, the crop margin, the alignment (the run's data.face_crop when it has one), the resize
    chain, the scaling, the normalisation and the channel order. It mirrors Classifier.preprocess."""
    data = (config or {}).get("data", {})
    channels = meta["in_channels"]
    return {
        "detector": "OpenCV Haar cascade haarcascade_frontalface_default.xml (scaleFactor 1.1, minNeighbors 5)",
        "crop_margin": MARGIN,  # of the box's width (left and right) and height (top and bottom)
        "alignment": meta.get("face_crop") or data.get("face_crop") or "none",
        "resize": [{"size": meta["data_size"], "interpolation": "area", "why": "the size the training images were stored at"},
                   {"size": meta["image_size"], "interpolation": "bilinear", "why": "the model's input size"}],
        "scale": "pixel / 255",
        "mean": meta["normalization"]["mean"],
        "std": meta["normalization"]["std"],
        "channel_order": "gray (BT.601 luma, cv2.COLOR_RGB2GRAY)" if channels == 1 else "RGB",
        "layout": f"float32 N x {channels} x {meta['image_size']} x {meta['image_size']}",
        "output": "logits N x num_classes, in the order of classes; softmax for probabilities",
    }


def recipe_sentence(recipe: dict) -> str:
    """The recipe as one sentence (the model card's)."""
    steps = " then ".join(f"{r['interpolation']} to {r['size']} px" for r in recipe["resize"])
    return (f"Detect the face, widen its box by {recipe['crop_margin']:.0%} on every side, crop "
            f"(alignment: {recipe['alignment']}), convert to {recipe['channel_order'].split(' (')[0]}, resize {steps}, "
            f"divide by 255, subtract mean {recipe['mean']} and divide by std {recipe['std']}, and feed "
            f"{recipe['layout']}.")


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
        from emotion_dist.modelio import load_model

        self.model, meta = load_model(path)
        super().__init__(meta)

    def logits(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def read_sidecar(model: Path) -> dict:
    """The JSON export writes next to an .onnx model (classes, sizes, normalization), checked."""
    sidecar = model.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{printable(sidecar)} (classes, sizes) is missing next to {printable(model)}; "
                              f"{EXPORT_FIX}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{printable(sidecar)} is not readable JSON ({e}); {EXPORT_FIX}") from None
    try:
        channels = meta["in_channels"]
        ok = (isinstance(meta["classes"], list) and meta["classes"] and all(isinstance(c, str) for c in meta["classes"])
              and all(isinstance(meta[k], int) and meta[k] > 0 for k in ("image_size", "data_size"))
              and channels in (1, 3)
              and all(len(meta["normalization"][k]) == channels for k in ("mean", "std")))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{printable(sidecar)} lacks classes, image_size, data_size, in_channels or "
                              f"normalization, or holds wrong types; {EXPORT_FIX}")
    return meta


class OnnxClassifier(Classifier):
    def __init__(self, path: str):
        import onnxruntime as ort

        path = Path(path)
        super().__init__(read_sidecar(path))
        try:  # the bytes, not the name: onnxruntime cannot open a name that is not valid UTF-8
            self.session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidProtobuf, InvalidGraph, Fail: onnxruntime's own classes
            raise CheckpointError(f"{printable(path)} is not a loadable ONNX model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:100]}); it may be truncated: {EXPORT_FIX}") from None
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) != 2 or (isinstance(outputs[1], int) and outputs[1] != len(self.classes)):
            raise CheckpointError(f"{printable(path)} outputs {outputs} but its sidecar lists {len(self.classes)} "
                                  f"classes; the two files are from different exports: {EXPORT_FIX}")

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": x})[0]


def load_classifier(path: str) -> Classifier:
    """By what the file holds, not its name; anything else is one line naming what it is."""
    return OnnxClassifier(path) if filekind.require(path) == filekind.ONNX else TorchClassifier(path)


def read_image(path: Path) -> np.ndarray:
    """Any common mode to 8-bit RGB (H x W x 3) or grayscale (H x W); raises ValueError."""
    try:
        img = read_uint8(path)
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise ValueError(UNREADABLE) from None
    return img[:, :, 0] if img.shape[2] == 1 else img


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


def classify_faces(classifier: Classifier, img: np.ndarray, detect: bool = True) -> tuple[list, np.ndarray]:
    """Boxes (x, y, w, h) and raw probabilities (faces x classes) for one picture: H x W gray or
    H x W x 3 RGB. Without `detect` the whole picture is one face."""
    import cv2

    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    boxes = detect_faces(gray) if detect else [(0, 0, img.shape[1], img.shape[0])]
    if not boxes:
        return [], np.zeros((0, len(classifier.classes)))
    source = gray if classifier.channels == 1 else (cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img)
    return boxes, classifier.probabilities([crop(source, b, MARGIN if detect else 0.0) for b in boxes])


def face_record(classifier: Classifier, p: np.ndarray) -> dict:
    """label, probability and per-class probabilities of one face."""
    k = int(p.argmax())
    return {"label": classifier.classes[k], "probability": float(p[k]),
            "probabilities": {c: round(float(v), 6) for c, v in zip(classifier.classes, p)}}


def iter_images(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        else:
            files.append(p)
    return files


def png_written_by_us(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.text.get("Software") == MARK
    except Exception:
        return False


def plan_annotations(files: list[Path], out_dir: str) -> list[Path]:
    """The annotated copy of each file (NAME_pred.png, numbered when two inputs share a name),
    checked before any work: --out must be a folder, and no copy may replace an input or a file
    that predict did not write."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {printable(out)} is a file; for images --out is a folder for the annotated copies "
                          f"(a .mp4 file only for a video or camera)")
    out.mkdir(parents=True, exist_ok=True)  # the folder the user named for the copies
    inputs = {f.resolve() for f in files}
    targets, used = [], set()
    for f in files:
        name, n = f"{f.stem}_pred.png", 1
        while name in used:
            n += 1
            name = f"{f.stem}_pred-{n}.png"
        used.add(name)
        target = out / name
        if target.resolve() in inputs:
            raise ConfigError(f"--out {printable(out)}: the annotated copy {printable(target)} would replace an input "
                              f"image; choose another --out folder")
        guard_output(target, what="an annotated image", suffixes=(".png",), ours=png_written_by_us, option="--out")
        targets.append(target)
    remove_stale_temps(out)
    return targets


def iter_predictions(classifier: Classifier, files: list[Path], detect: bool = True,
                     annotations: Optional[list[Path]] = None) -> Iterator[tuple[Path, list[Face], Optional[str]]]:
    """(file, its faces, or the message saying why there are none), one file at a time."""
    for i, path in enumerate(files):
        try:
            img = read_image(path)
            boxes, probs = classify_faces(classifier, img, detect)
        except ValueError as e:
            yield path, [], f"{printable(path)}: {e}"
            continue
        except Exception as e:  # OpenCV on a picture it cannot handle: this file only, not the batch
            yield path, [], f"{printable(path)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
            continue
        if not boxes:
            yield path, [], f"{printable(path)}: {NO_FACE}"
            continue
        faces = [Face(printable(path), list(b), **face_record(classifier, p)) for b, p in zip(boxes, probs)]
        message = None
        if annotations:
            try:
                write_annotated(img, faces, annotations[i])
            except OSError as e:  # a full disk loses this copy, not the results
                message = f"{printable(path)}: annotated copy not written ({disk_error(e, printable(annotations[i]))})"
        yield path, faces, message


def predict(classifier: Classifier, inputs: list[str], detect: bool = True, out_dir: Optional[str] = None):
    """Returns (faces, messages): one Face per face found, one message per file without a result."""
    files = iter_images(inputs)
    annotations = plan_annotations(files, out_dir) if out_dir else None
    faces, messages = [], []
    for _, found, message in iter_predictions(classifier, files, detect, annotations):
        faces += found
        messages += [message] if message else []
    return faces, messages


def draw(canvas: np.ndarray, boxes: list, labels: list[str]) -> np.ndarray:
    """Boxes and labels drawn in place on a BGR picture."""
    import cv2

    thick = max(1, round(max(canvas.shape[:2]) / 300))
    for (x, y, w, h), text in zip(boxes, labels):
        cv2.rectangle(canvas, (x, y), (x + w, y + h), (40, 220, 40), thick)
        scale = max(0.4, w / 250)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = max(th + 4, y - 4)
        cv2.rectangle(canvas, (x, ty - th - 4), (x + tw + 4, ty + 2), (40, 220, 40), -1)
        cv2.putText(canvas, text, (x + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return canvas


def write_annotated(img: np.ndarray, faces: list[Face], path: Path) -> None:
    import cv2
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    canvas = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    draw(canvas, [f.box for f in faces], [f"{f.label} {f.probability:.2f}" for f in faces])
    info = PngInfo()
    info.add_text("Software", MARK)
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)).save(buf, "PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def check_json_out(path: Optional[str], suffixes: tuple[str, ...], inputs: list[Path], ours) -> Optional[Path]:
    if not path:
        return None
    return guard_output(Path(path), what="predictions", suffixes=suffixes, inputs=inputs, ours=ours,
                        option="--json-out")


def run_images(args) -> int:
    files = iter_images(args.inputs)
    model = Path(args.checkpoint)
    json_out = check_json_out(args.json_out, (".json",), [model, model.with_suffix(".json")], json_written_by_us)
    annotations = plan_annotations(files, args.out) if args.out else None
    if json_out:
        remove_stale_temps(json_out.parent)
    cam_layer = getattr(args, "cam_layer", None) if getattr(args, "cam", False) else None
    if cam_layer and not annotations:
        raise ConfigError("--cam writes overlay PNGs beside the annotated copies; add --out FOLDER")
    classifier = load_classifier(args.checkpoint)
    if cam_layer and not isinstance(classifier, TorchClassifier):
        raise ConfigError("--cam needs the PyTorch model (a .pt checkpoint or an export --format hf folder): an "
                          "ONNX file has no gradients")
    interrupts.install()
    faces, messages, cams = [], [], []
    done = 0
    for i, (path, found, message) in enumerate(iter_predictions(classifier, files, not args.no_detect, annotations)):
        done += 1
        faces += found
        if cam_layer and found:
            from emotion_dist.inference.cam import write_predict_cams

            stem = annotations[i].with_name(annotations[i].stem.replace("_pred", "", 1))
            cams += [str(p) for p in write_predict_cams(classifier, read_image(path), [f.box for f in found],
                                                        stem_path=stem, layer=cam_layer,
                                                        margin=0.0 if args.no_detect else MARGIN)]
        if message:
            messages.append(message)
            print(message, file=sys.stderr, flush=True)
        if not args.json:
            for f in found:
                x, y, w, h = f.box
                print(f"{f.file}  box=({x},{y},{w},{h})  {f.label}  {f.probability:.3f}", flush=True)
        if interrupts.requested():
            messages.append(f"stopped by {interrupts.requested()} after {done} of {len(files)} files")
            print(messages[-1], file=sys.stderr, flush=True)
            break
    document = {"emotion_dist": "predict", "faces": [asdict(f) for f in faces], "messages": messages}
    if cam_layer:
        document["cam"] = {"method": "Grad-CAM (torchcam)", "layer": cam_layer, "files": cams}
    if args.json:
        print(json.dumps(document, indent=1), flush=True)
    if json_out:
        atomic_write_json(json_out, document)
    return 0 if faces or not messages or interrupts.requested() else 1
