"""Grad-CAM: where in the face crop the model looked for its answer (torchcam's GradCAM, which needs
only torch, numpy, pillow and matplotlib; `grad-cam` would bring a second OpenCV).

`predict --cam` writes, per photo, the map on each face crop (the crop the model classified) and the
maps put back onto the photo at their crops; `evaluate --cam N` writes, per class, N test images it
got right beside N it got wrong. The layer is named in every figure and set with --cam-layer.
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


def crop_box(shape: tuple[int, int], box, margin: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of predict's crop (predict.crop) of `box` in a picture of `shape`."""
    x, y, w, h = box
    mx, my = int(w * margin), int(h * margin)
    return max(0, x - mx), max(0, y - my), min(shape[1], x + w + mx), min(shape[0], y + h + my)


def photo_map(shape: tuple[int, int], crops: list[tuple[tuple, np.ndarray]]) -> np.ndarray:
    """The crops' maps (each at its crop's size) put back where they were cut: H x W, 0 elsewhere
    (NAME_cam.png draws exactly this, over the photo inside the crops)."""
    full = np.zeros(shape[:2], np.float32)
    for (x0, y0, x1, y1), cam in crops:
        full[y0:y1, x0:x1] = np.maximum(full[y0:y1, x0:x1], cam[: y1 - y0, : x1 - x0])
    return full


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", MARK)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def write_predict_cams(classifier, img: np.ndarray, boxes: list, *, stem_path: Path, layer: str,
                       margin: float) -> list[Path]:
    """predict --cam for one photo: STEM_faceK_cam.png (the map on the K-th face crop) and
    STEM_cam.png (every map on the photo, at its crop). Returns the files written."""
    from emotion_dist.utils.fsutil import atomic_write_bytes

    faces = face_cams(classifier, img, boxes, layer=layer, margin=margin)
    written = []
    for k, f in enumerate(faces, 1):
        path = stem_path.with_name(f"{stem_path.name}_face{k}_cam.png")
        atomic_write_bytes(path, png_bytes(overlay(f["crop"], f["cam"])))
        written.append(path)
    canvas = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img.copy()
    for f in faces:  # each map over its own crop of the photo (in the photo's colours); the rest untouched
        x0, y0, x1, y1 = f["box"]
        canvas[y0:y1, x0:x1] = overlay(canvas[y0:y1, x0:x1], f["cam"])
    path = stem_path.with_name(f"{stem_path.name}_cam.png")
    atomic_write_bytes(path, png_bytes(canvas))
    return written + [path]


def face_cams(classifier, img: np.ndarray, boxes: list, *, layer: str, margin: float) -> list[dict]:
    """Per face: its crop (as classified), the map at the crop's size, the crop box and the class."""
    import cv2
    import torch

    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)  # as predict.classify_faces
    source = gray if classifier.channels == 1 else (cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img)
    out = []
    for box in boxes:
        x0, y0, x1, y1 = crop_box(source.shape, box, margin)
        crop = source[y0:y1, x0:x1]
        x = torch.from_numpy(classifier.preprocess([crop]).astype(np.float32))
        maps, idx = grad_cam(classifier.model, x, layer=layer)
        out.append({"crop": crop, "box": (x0, y0, x1, y1), "cam": upsample(maps[0], crop.shape[:2]),
                    "label": classifier.classes[idx[0]]})
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
