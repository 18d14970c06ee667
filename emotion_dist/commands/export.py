"""`emotion-dist export`: ONNX (dynamic batch, verified with onnxruntime) or safetensors, each with
a JSON sidecar (classes, image size, channels, normalization) so no part of this repo is needed.
The ONNX graph is checked against PyTorch before anything is written (onnx_parity): the same
in-range images, logits within a tolerance scaled to their size, the same predicted classes."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emotion_dist.distributed import interrupts
from emotion_dist.errors import CheckpointError
from emotion_dist.model import EmotionNet
from emotion_dist.modelio import load_model
from emotion_dist.utils.fsutil import atomic_write_bytes, guard_output

# The ONNX graph must give PyTorch's logits to within PARITY_RTOL of their magnitude (at least 1):
# float32 carries ~7 digits, and onnxruntime folds BatchNorm into the convolutions and sums in other
# orders, which moves the logits by ~1e-6..1e-5 of their size through EmotionNet's 20-odd layers
# (measured on 64 px EmotionNets with N(0, g^2/fan_in) weights, g 1.15..1.35, logits of 0.1 to 2e4:
# 6.6e-7..9.7e-6; that is 1.4e-4 absolute on logits of 209, which an absolute 1e-4 bound refuses).
# A wrong graph (a lost op, a wrong weight, a transposed layout) moves them by a good part of their
# own size. 1e-3 sits 100x above the noise and far under a real error; below magnitude 1 an absolute
# 1e-3 moves no probability by more than 5e-4 (softmax's slope is at most 1/2). The predicted classes
# must agree as well, unless PyTorch's top two are within twice the tolerance (a tie either side may break).
PARITY_RTOL = 1e-3
PARITY_BATCHES = (1, 5)  # the batch axis is dynamic: one image, then several
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}


def is_our_export(path: Path) -> bool:
    """An export emotion-dist wrote: its JSON sidecar says so."""
    sidecar = Path(path).with_suffix(".json")
    try:
        return json.loads(sidecar.read_text()).get("format") == "emotion-dist"
    except (OSError, ValueError, AttributeError):
        return False


def trained_on(checkpoint: str) -> list:
    """The data the checkpoint was trained on, as its config records it (data.root, data.ferplus):
    the one data root export knows. Only absolute paths: a relative one was relative to a working
    folder nobody recorded. Read with the checkpoint loader (weights_only); a file it cannot read
    gives no data here (loading it for the export says why, in one line)."""
    from emotion_dist.errors import UserError
    from emotion_dist.modelio import load_checkpoint
    from emotion_dist.utils.paths import data_paths

    try:
        data = load_checkpoint(checkpoint).get("config", {}).get("data", {})
        found = data_paths(data.get("root"), data.get("ferplus")) if isinstance(data, dict) else []
    except (UserError, AttributeError, TypeError):
        return []
    return [(key, path) for key, path in found if path.is_absolute()]


def output_path(checkpoint: str, fmt: str, out: str | None) -> Path:
    """Where the export goes, checked before any work: never the checkpoint, never inside the data
    it was trained on, never a file of another kind or one emotion-dist did not write; a folder
    means a file named after the checkpoint in it."""
    suffix = SUFFIXES[fmt]
    path = Path(out) if out else Path(checkpoint).with_suffix(suffix)
    if path.is_dir() or (out and out.endswith(("/", "\\"))):
        path = path / Path(checkpoint).with_suffix(suffix).name
    data = trained_on(checkpoint)
    guard_output(path, what=f"the {fmt} export", suffixes=(suffix,), inputs=[Path(checkpoint)], ours=is_our_export,
                 data=data)
    guard_output(path.with_suffix(".json"), what="the sidecar", suffixes=(".json",), inputs=[Path(checkpoint)],
                 ours=lambda p: is_our_export(path), option="--out (its sidecar)", data=data)
    return path


def export(checkpoint: str, fmt: str, out: str | None = None) -> Path:
    path = output_path(checkpoint, fmt, out)
    model, meta = load_model(checkpoint)
    interrupts.check()  # a stop signal between phases: Interrupted, nothing written
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in model.state_dict().items()},
                    metadata={"classes": json.dumps(meta["classes"])})
    else:
        data = onnx_bytes(model, meta["in_channels"], meta["image_size"])
        interrupts.check()
        parity = onnx_parity(model, data, meta)  # verified before anything is written
        print(parity.line(), flush=True)
        if not parity.ok:
            raise CheckpointError(f"ONNX export of {checkpoint} refused, nothing written: {parity.failure()}")
        meta["onnx_max_abs_diff"] = parity.max_abs_diff
        meta["onnx_parity"] = parity.record()
    interrupts.check()  # the last point at which nothing is written; the two writes take milliseconds
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return path


def onnx_bytes(model: EmotionNet, channels: int, size: int) -> bytes:
    """The model as an ONNX graph: input `images` N x C x H x W, output `logits` N x classes, N dynamic."""
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, channels, size, size),), buf, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return buf.getvalue()


def parity_images(meta: dict, batch: int, seed: int) -> np.ndarray:
    """Inputs as the model meets them: `batch` pictures in [0, 255] with a photo's structure
    (gradients, a bright blob, blurred noise; random pixels look like no face and sit outside what
    a model was trained on), normalised as predict normalises a crop."""
    c, s = meta["in_channels"], meta["image_size"]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(1, s - 1)
    out = []
    for i in range(batch):
        kind = i % 4
        if kind == 0:
            img = 255 * (xx * rng.uniform(0.3, 1) + yy * rng.uniform(0, 0.7))
        elif kind == 1:
            cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.4)]
            img = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        else:  # blurred noise: coarse random values, upsampled smoothly (bilinear)
            coarse = rng.uniform(0, 255, (4 + 4 * kind, 4 + 4 * kind)).astype(np.float32)
            pos = np.linspace(0, coarse.shape[0] - 1, s)
            i0 = np.minimum(pos.astype(int), coarse.shape[0] - 2)
            f = (pos - i0)[:, None]
            rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f
            img = rows[:, i0] * (1 - f.T) + rows[:, i0 + 1] * f.T
        img = np.clip(img, 0, 255)
        out.append(np.stack([np.clip(img * rng.uniform(0.8, 1.2), 0, 255) for _ in range(c)]))
    x = np.stack(out).astype(np.float32) / 255.0
    mean = np.asarray(meta["normalization"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["normalization"]["std"], np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


@dataclass(kw_only=True)
class Parity:
    """What the ONNX graph was checked on against PyTorch, and whether it passed."""

    images: int
    max_abs_diff: float
    max_abs_logit: float
    agree: int  # images whose predicted class is the same in both
    ties: int  # of the others: PyTorch's top two logits within the tolerance (a coin toss, not an error)
    finite: bool

    @property
    def tolerance(self) -> float:
        return PARITY_RTOL * max(1.0, self.max_abs_logit)

    @property
    def ok(self) -> bool:
        return (self.finite and self.max_abs_diff <= self.tolerance
                and self.agree + self.ties == self.images)

    def line(self) -> str:
        return (f"ONNX parity on {self.images} in-range images: max |diff| {self.max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.2e} = {PARITY_RTOL:g} x max(1, max |logit| "
                f"{self.max_abs_logit:.3g})); predicted class agrees on {self.agree}/{self.images}"
                f"{f' (+{self.ties} near-ties)' if self.ties else ''}")

    def failure(self) -> str:
        if not self.finite:
            return ("the model's outputs are not finite (NaN/inf) on in-range images; check the checkpoint with "
                    "emotion-dist ckpt inspect and export an earlier one")
        return (f"onnxruntime's logits differ from PyTorch's by {self.max_abs_diff:.2e} (tolerance "
                f"{self.tolerance:.2e}) and the predicted class agrees on {self.agree}/{self.images} images; the "
                f"graph is not the model: use --format safetensors, or report it with your torch and onnxruntime "
                f"versions")

    def record(self) -> dict:
        return {"images": self.images, "max_abs_diff": self.max_abs_diff, "max_abs_logit": self.max_abs_logit,
                "tolerance": self.tolerance, "classes_agree": self.agree, "near_ties": self.ties}


def onnx_parity(model: EmotionNet, onnx_model: bytes, meta: dict) -> Parity:
    """PyTorch and onnxruntime on the same in-range images (parity_images): the largest logit
    difference against a tolerance scaled to the logits' size, and the predicted classes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    refs, gots = [], []
    for batch in PARITY_BATCHES:
        x = parity_images(meta, batch, seed=batch)
        with torch.no_grad():
            refs.append(model(torch.from_numpy(x)).numpy().astype(np.float64))
        gots.append(sess.run(None, {"images": x})[0].astype(np.float64))
    ref, got = np.concatenate(refs), np.concatenate(gots)
    finite = bool(np.isfinite(ref).all() and np.isfinite(got).all())
    if not finite:
        return Parity(images=len(ref), max_abs_diff=math.nan, max_abs_logit=math.nan, agree=0, ties=0, finite=False)
    diff, scale = float(np.abs(ref - got).max()), float(np.abs(ref).max())
    tolerance = PARITY_RTOL * max(1.0, scale)
    agree = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(ref, 1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    ties = int((~agree & (top2[:, 1] - top2[:, 0] <= 2 * tolerance)).sum())
    return Parity(images=len(ref), max_abs_diff=diff, max_abs_logit=scale, agree=int(agree.sum()), ties=ties,
                  finite=True)
