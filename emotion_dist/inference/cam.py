"""Grad-CAM: where in the face crop the model looked for its answer (torchcam's GradCAM, which needs
only torch, numpy, pillow and matplotlib; `grad-cam` would bring a second OpenCV).

`predict --cam` writes, per photo, the map on each face crop (the crop the model classified: aligned
by the landmarks where the detector gives them) and the maps mapped back onto the photo; `evaluate
--cam N` writes, per class, N test images it got right beside N it got wrong. The layer is named in
every figure and set with --cam-layer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np

from emotion_dist.errors import ConfigError

# backbone.6 is the last stage with spatial detail (the first area-attention block, stride 16: 4 x 4
# cells at 64 px); backbone.8 (stride 32) is 2 x 2 there, too coarse to point at a mouth or the eyes.
DEFAULT_LAYER = "backbone.6"
MARK = "emotion-dist predict"  # as predict's annotated copies, so a re-run may replace them


def check_layer(model, layer: str) -> str:
    names = [n for n, m in model.named_modules() if n and hasattr(m, "forward")]
    if layer not in names:
        stages = ", ".join(n for n in names if n.count(".") == 1 and n.startswith("backbone"))
        raise ConfigError(f"--cam-layer {layer!r} is not a layer of EmotionNet; use one of {stages} (or a deeper "
                          f"name from model.named_modules())")
    return layer


def grad_cam(model, x, *, layer: str = DEFAULT_LAYER,
             class_idx: Optional[list[int]] = None) -> tuple[np.ndarray, list[int]]:
    """Maps (N x h x w, each scaled to [0, 1], at the layer's resolution) for the given classes, by
    default the predicted ones, and those classes."""
    import torch
    from torchcam.methods import GradCAM

    check_layer(model, layer)
    with torch.enable_grad(), GradCAM(model, layer, input_shape=tuple(x.shape[1:])) as extractor:
        scores = model(x)
        idx = scores.argmax(1).tolist() if class_idx is None else list(class_idx)
        maps = extractor(idx, scores)[0].detach().float().cpu().numpy()
    return np.nan_to_num(maps), idx


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map resized (bilinear) to (height, width)."""
    import cv2

    return cv2.resize(cam.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8: the map (same height and width as `image`, gray or RGB) in matplotlib's jet over it."""
    from PIL import Image
    from torchcam.utils import overlay_mask

    rgb = np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image
    return np.asarray(overlay_mask(Image.fromarray(rgb), Image.fromarray(cam.astype(np.float32), mode="F"),
                                   alpha=alpha))


def photo_map(shape: tuple[int, int], faces: list[dict]) -> np.ndarray:
    """The faces' maps (face_cams) put back where their crops came from, through each crop's
    transform (the inverse alignment, or the box crop's offset): H x W, 0 outside every crop."""
    full = np.zeros(shape[:2], np.float32)
    for f in faces:
        full = np.maximum(full, _to_photo(f, f["cam"], shape))
    return full


def _to_photo(face: dict, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.warpAffine(values.astype(np.float32), face["to_photo"], (shape[1], shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def photo_overlay(img: np.ndarray, faces: list[dict]) -> np.ndarray:
    """RGB uint8: the photo with each face's map over the region its crop came from (a rotated
    square for an aligned face), the rest of the photo untouched."""
    canvas = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img.copy()
    for f in faces:
        inside = _to_photo(f, np.ones(f["cam"].shape, np.float32), canvas.shape) > 0.5
        if inside.any():
            canvas[inside] = overlay(canvas, _to_photo(f, f["cam"], canvas.shape))[inside]
    return canvas


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", MARK)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def write_predict_cams(classifier, img: np.ndarray, faces: list, *, stem_path: Path, layer: str,
                       whole_image: bool = False) -> list[Path]:
    """predict --cam for one photo: STEM_faceK_cam.png (the map on the K-th face's crop, aligned
    as the model saw it) and STEM_cam.png (every map mapped back onto the photo). Returns the files
    written."""
    from emotion_dist.utils.fsutil import atomic_write_bytes

    cams = face_cams(classifier, img, faces, layer=layer, whole_image=whole_image)
    written = []
    for k, f in enumerate(cams, 1):
        path = stem_path.with_name(f"{stem_path.name}_face{k}_cam.png")
        atomic_write_bytes(path, png_bytes(overlay(f["crop"], f["cam"])))
        written.append(path)
    path = stem_path.with_name(f"{stem_path.name}_cam.png")
    atomic_write_bytes(path, png_bytes(photo_overlay(img, cams)))
    return written + [path]


def face_cams(classifier, img: np.ndarray, faces: list, *, layer: str, whole_image: bool = False) -> list[dict]:
    """Per face (anything with .box, and .landmarks where aligned: a predict or detector Face): the
    crop exactly as the pipeline classifies it (aligned by the landmarks, else the box grown by the
    model's margin; the whole picture with whole_image), the map at the crop's size, the 2 x 3
    transform from the crop's pixels to the photo's, and the class the map explains."""
    import cv2
    import torch

    from emotion_dist.inference.align import alignment, box_crop_origin, face_crop
    from emotion_dist.inference.pipeline import geometry_of, model_input

    geometry = geometry_of(classifier)
    source = model_input(classifier, img)
    out = []
    for f in faces:
        landmarks = getattr(f, "landmarks", None)
        if getattr(f, "aligned", True) is False:
            landmarks = None
        if whole_image:
            crop, to_photo = source, np.float32([[1, 0, 0], [0, 1, 0]])
        elif landmarks is not None:
            crop, _ = face_crop(source, box=f.box, landmarks=np.asarray(landmarks), geometry=geometry)
            to_photo = cv2.invertAffineTransform(alignment(np.asarray(landmarks), geometry)[0])
        else:
            crop, _ = face_crop(source, box=f.box, landmarks=None, geometry=geometry)
            x0, y0 = box_crop_origin(f.box, geometry.margin)
            to_photo = np.float32([[1, 0, x0], [0, 1, y0]])
        x = torch.from_numpy(classifier.preprocess([crop]).astype(np.float32))
        maps, idx = grad_cam(classifier.model, x, layer=layer)
        out.append({"crop": crop, "cam": upsample(maps[0], crop.shape[:2]), "to_photo": to_photo,
                    "aligned": landmarks is not None and not whole_image, "label": classifier.classes[idx[0]]})
    return out


def evaluate_figure(rows: list[dict], *, title: str) -> bytes:
    """PNG: one row per example, the correct ones left and the wrong ones right (blank where a side
    has fewer), each with its true and predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, max(len(r) for r in rows))
    fig, axes = plt.subplots(n, 2, figsize=(4.4, 2.4 * n + 0.5), squeeze=False)
    for col, (side, items) in enumerate(zip(("correct", "wrong"), rows)):
        axes[0, col].set_title(side, fontsize=10)
        if not items:
            none = "no test image\npredicted " + ("right" if side == "correct" else "wrong")
            axes[0, col].text(0.5, 0.5, none, ha="center", va="center", fontsize=8, transform=axes[0, col].transAxes)
        for i in range(n):
            ax = axes[i, col]
            ax.axis("off")
            if i < len(items):
                ax.imshow(items[i]["overlay"])
                ax.text(0.5, -0.08, items[i]["caption"], transform=ax.transAxes, ha="center", va="top", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": MARK})
    plt.close(fig)
    return buf.getvalue()


def display(image: np.ndarray, size: int = 96) -> np.ndarray:
    """A stored C x S x S uint8 test image as an H x W (x 3) picture big enough to see."""
    import cv2

    img = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_NEAREST)


def evaluate_cams(model, split, transform, classes: list[str], *, per_class: int, layer: str, out_dir: Path,
                  batch_size: int = 64) -> list[Path]:
    """`evaluate --cam N`: for each class, N test images predicted right and N predicted wrong
    (the first in split order), their maps side by side in out_dir/cam_<class>.png."""
    import torch

    from emotion_dist.utils.fsutil import atomic_write_bytes

    check_layer(model, layer)
    index = np.asarray(split.index)
    labels = np.asarray(split.labels[index])
    preds = []
    with torch.no_grad():
        for i in range(0, len(index), batch_size):
            preds.append(model(transform.eval(torch.from_numpy(np.ascontiguousarray(
                split.images[index[i:i + batch_size]])))).argmax(1).cpu().numpy())
    preds = np.concatenate(preds) if preds else np.zeros(0, int)
    written = []
    for c, name in enumerate(classes):
        sides = []
        for right in (True, False):
            pick = np.flatnonzero((labels == c) & ((preds == c) if right else (preds != c)))[:per_class]
            items = []
            if len(pick):
                images = np.ascontiguousarray(split.images[index[pick]])
                maps, _ = grad_cam(model, transform.eval(torch.from_numpy(images)), layer=layer,
                                   class_idx=preds[pick].tolist())
                for img, cam, p in zip(images, maps, preds[pick]):
                    shown = display(img)
                    items.append({"overlay": overlay(shown, upsample(cam, shown.shape[:2])),
                                  "caption": f"true {name} / predicted {classes[int(p)]}"})
            sides.append(items)
        path = Path(out_dir) / f"cam_{name}.png"
        atomic_write_bytes(path, evaluate_figure(sides, title=f"Grad-CAM at {layer}: {name} "
                                                              f"({len(sides[0])} right, {len(sides[1])} wrong)"))
        written.append(path)
    return written
