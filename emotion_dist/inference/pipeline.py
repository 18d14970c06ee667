"""The one face pipeline that predict (images), video and the web demo share:
image -> faces (a detector, given boxes, or the whole image) -> crops at the model's training
geometry (aligned by landmarks, else the box crop) -> classifier -> one record per face.

The classifier is any object with `classes`, `channels`, `meta` and `probabilities(crops)`
(predict.Classifier: a .pt checkpoint or an .onnx model); nothing here imports torch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from emotion_dist.config import FaceCrop, parse_face_crop
from emotion_dist.inference.align import face_crop
from emotion_dist.inference.faces import DEFAULT_DETECTOR, Face, FaceDetector, get_detector


def geometry_of(classifier) -> FaceCrop:
    """The crop geometry the model was trained with (its checkpoint or sidecar), else the default."""
    if isinstance(getattr(classifier, "geometry", None), FaceCrop):
        return classifier.geometry
    return parse_face_crop(classifier.meta.get("face_crop"), key="the model's face_crop")


def face_record(classifier, p: np.ndarray) -> dict:
    """label, probability and per-class probabilities of one face."""
    k = int(p.argmax())
    return {"label": classifier.classes[k], "probability": float(p[k]),
            "probabilities": {c: round(float(v), 6) for c, v in zip(classifier.classes, p)}}


def find_faces(image: np.ndarray, *, detector: Union[str, FaceDetector, None] = DEFAULT_DETECTOR,
               boxes: Optional[Sequence[Sequence[int]]] = None) -> list[Face]:
    """The faces of one picture: the given boxes (no landmarks), the detector's faces, or with
    detector=None the whole picture as one face."""
    if boxes is not None:
        return [Face(tuple(int(v) for v in b), None, None) for b in boxes]
    if detector is None:
        return [Face((0, 0, image.shape[1], image.shape[0]), None, None)]
    if isinstance(detector, str):
        detector = get_detector(detector)
    return detector.detect(image)


def model_input(classifier, image: np.ndarray) -> np.ndarray:
    """The picture in the classifier's channels: gray for a 1-channel model, RGB for 3."""
    import cv2

    if classifier.channels == 1:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def classify_found(classifier, image: np.ndarray, faces: Sequence[Face], *, whole_image: bool = False,
                   align: bool = True, geometry: Optional[FaceCrop] = None) -> list[dict]:
    """The faces already found in one picture, classified: one record per face (as classify_faces,
    with "p", the raw probability vector, besides). whole_image: the picture is one face crop, used
    as it is."""
    if not faces:
        return []
    source = model_input(classifier, image)
    if whole_image:
        crops, aligned = [source], [False]
        faces = faces[:1]
    else:
        geometry = geometry or geometry_of(classifier)
        pairs = [face_crop(source, box=f.box, landmarks=f.landmarks, geometry=geometry, align=align) for f in faces]
        crops, aligned = [c for c, _ in pairs], [a for _, a in pairs]
    probs = classifier.probabilities(crops)
    return [{"box": [int(v) for v in f.box], "score": f.score, "landmarks": f.landmarks_list(), "aligned": a,
             **face_record(classifier, p), "p": p} for f, a, p in zip(faces, aligned, probs)]


def classify_faces(classifier, image: np.ndarray, *, detector: Union[str, FaceDetector, None] = DEFAULT_DETECTOR,
                   boxes: Optional[Sequence[Sequence[int]]] = None, align: bool = True,
                   geometry: Optional[FaceCrop] = None) -> list[dict]:
    """One record per face of one picture (uint8 H x W gray or H x W x 3 RGB), largest face first:
    {"box": [x, y, w, h], "score", "landmarks": [[x, y] x 5] or None, "aligned": bool, "label",
    "probability", "probabilities": {class: p}}.

    detector: a name (`retinaface`, `haar`), a FaceDetector, or None for "the picture is one face
    crop" (used as it is, no margin); boxes: faces already found (x, y, w, h), detection skipped;
    align=False: box crops even where there are landmarks; geometry: the crop geometry (default:
    the model's own, geometry_of(classifier))."""
    faces = find_faces(image, detector=detector, boxes=boxes)
    records = classify_found(classifier, image, faces, whole_image=detector is None and boxes is None,
                             align=align, geometry=geometry)
    for r in records:
        del r["p"]
    return records
