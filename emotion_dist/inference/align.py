"""Face crops at the geometry the model trained on (config `data.face_crop`, a config.FaceCrop).

With 5 landmarks (faces.LANDMARK_NAMES) a similarity transform (rotation, uniform scale,
translation) maps the face onto a 5-point template whose eyes lie level at `eye_y` of the crop's
height, `eye_distance` of its width apart and centred: a tilted head reaches the model upright. All
five points enter the fit (least squares), so a face turned aside, whose eyes come closer together,
is not blown up as it would be by the eyes alone. A face without landmarks (the Haar detector,
`predict --boxes`) falls back to the box grown by `margin`, and the caller reports `aligned: false`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from emotion_dist.config import FaceCrop

# The 5-point template of ArcFace (Deng et al. 2019; insightface's 112 x 112 alignment): an upright,
# frontal face's eyes, nose tip and mouth corners, as seen in the image
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
MAX_NATIVE_SIDE = 2048  # an aligned crop is warped at most this large before it is resized


def template(geometry: FaceCrop) -> np.ndarray:
    """The 5 template points in a 1 x 1 crop: ArcFace's face, scaled and shifted so its eye
    midpoint sits at (0.5, eye_y) and its eyes are eye_distance apart."""
    eyes = ARCFACE_112[:2]
    mid = eyes.mean(axis=0)
    scale = geometry.eye_distance / np.linalg.norm(eyes[1] - eyes[0])
    return (ARCFACE_112 - mid) * scale + [0.5, geometry.eye_y]


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (2 x 3) taking points src to dst (Umeyama 1991). Written out
    because cv2.estimateAffinePartial2D fits only by RANSAC or LMedS, which with 5 points may drop
    one and whose result then depends on a random draw."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sing, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sing) @ sign) / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = md - scale * rot @ ms
    return m


def alignment(landmarks: np.ndarray, geometry: FaceCrop) -> tuple[np.ndarray, int]:
    """(the 2 x 3 similarity taking the picture's pixels to the aligned crop's, the crop's side at
    the face's own resolution: its eye distance over the template's)."""
    landmarks = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_px = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    native = int(np.clip(round(max(eye_px, 1.0) / geometry.eye_distance), 8, MAX_NATIVE_SIDE))
    return similarity(landmarks, template(geometry) * native), native


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, geometry: FaceCrop,
                 size: Optional[int] = None) -> np.ndarray:
    """The square crop with the face placed by `geometry`: `size` x `size` pixels, or the face's
    own resolution when size is None. Pixels beyond the image repeat its edge."""
    import cv2

    m, native = alignment(landmarks, geometry)
    crop = cv2.warpAffine(image, m, (native, native), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if size and size != native:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if size < native else cv2.INTER_LINEAR)
    return crop


def box_crop_origin(box, margin: float) -> tuple[int, int]:
    """(x0, y0): where box_crop's crop of `box` starts in the image."""
    x, y, w, h = (int(v) for v in box)
    return max(0, x - int(w * margin)), max(0, y - int(h * margin))


def box_crop(image: np.ndarray, box, margin: float) -> np.ndarray:
    """The box (x, y, w, h) grown by `margin` of its size on every side, cut at the image's edges."""
    x, y, w, h = (int(v) for v in box)
    x0, y0 = box_crop_origin(box, margin)
    crop = image[y0: y + h + int(h * margin), x0: x + w + int(w * margin)]
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise ValueError(f"box ({x},{y},{w},{h}) lies outside the {image.shape[1]}x{image.shape[0]} image")
    return crop


def face_crop(image: np.ndarray, *, box, landmarks: Optional[np.ndarray], geometry: FaceCrop,
              align: bool = True, size: Optional[int] = None) -> tuple[np.ndarray, bool]:
    """(the crop, whether it is aligned): aligned by the landmarks where there are any (and
    `align`), else the box crop (resized to `size` x `size` when given)."""
    if align and landmarks is not None:
        return aligned_crop(image, landmarks, geometry, size), True
    crop = box_crop(image, box, geometry.margin)
    if size:
        import cv2

        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop, False
