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
from emotion_dist.errors import CheckpointError, ConfigError
from emotion_dist.inference.predict import preprocessing_recipe
from emotion_dist.model import EmotionNet
from emotion_dist.modelio import load_model, recorded_data
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


def output_path(checkpoint: str, fmt: str, out: str | None) -> Path:
    """Where the export goes, checked before any work: never the checkpoint, never inside the data
    it was trained on, never a file of another kind or one emotion-dist did not write; a folder
    means a file named after the checkpoint in it."""
    suffix = SUFFIXES[fmt]
    path = Path(out) if out else Path(checkpoint).with_suffix(suffix)
    if path.is_dir() or (out and out.endswith(("/", "\\"))):
        path = path / Path(checkpoint).with_suffix(suffix).name
    data = recorded_data(checkpoint)
    guard_output(path, what=f"the {fmt} export", suffixes=(suffix,), inputs=[Path(checkpoint)], ours=is_our_export,
                 data=data)
    guard_output(path.with_suffix(".json"), what="the sidecar", suffixes=(".json",), inputs=[Path(checkpoint)],
                 ours=lambda p: is_our_export(path), option="--out (its sidecar)", data=data)
    return path


def export(checkpoint: str, fmt: str, out: str | None = None) -> Path:
    path = output_path(checkpoint, fmt, out)
    model, meta = load_model(checkpoint)
    interrupts.check()  # a stop signal between phases: Interrupted, nothing written
    meta["preprocessing"] = preprocessing_recipe(meta)  # meta carries face_crop
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in model.state_dict().items()},
                    metadata={"classes": json.dumps(meta["classes"]),
                              "preprocessing": json.dumps(meta["preprocessing"])})
    else:
        data = onnx_bytes(model, meta)
        interrupts.check()
        meta["onnx_parity"] = check_parity(model, data, meta, checkpoint)
    interrupts.check()  # the last point at which nothing is written; the two writes take milliseconds
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return path


def onnx_bytes(model: EmotionNet, meta: dict) -> bytes:
    """The fp32 ONNX model (dynamic batch, OpenCV DNN-compatible reshapes) with the classes and the
    recipe in its metadata_props; check_parity() checks it against PyTorch before anything is written."""
    from emotion_dist.inference.standalone import add_metadata, opencv_compatible

    c, s = meta["in_channels"], meta["image_size"]
    buf = io.BytesIO()
    with opencv_compatible(model):
        torch.onnx.export(model, (torch.zeros(1, c, s, s),), buf, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return add_metadata(buf.getvalue(), meta, meta["preprocessing"])


def check_parity(model: EmotionNet, data: bytes, meta: dict, checkpoint) -> dict:
    """onnx_parity, printed; a graph that is not the model is refused in one line (nothing written)."""
    parity = onnx_parity(model, data, meta)
    print(parity.line(), flush=True)
    if not parity.ok:
        raise CheckpointError(f"ONNX export of {checkpoint} refused, nothing written: {parity.failure()}")
    meta["onnx_max_abs_diff"] = parity.max_abs_diff
    return parity.record()


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


def run_export(args) -> int:
    """`emotion-dist export`: the format's writer; every check that can refuse comes before any work."""
    if args.push_to_hub and args.format != "hf":
        raise ConfigError("--push-to-hub uploads a Hugging Face folder; add --format hf")
    if args.int8 and args.format != "onnx":
        raise ConfigError("--int8 quantizes an ONNX model; use it with --format onnx")
    if args.format == "hf":
        from emotion_dist.inference import hub

        token = hub.hub_token() if args.push_to_hub else None  # refused in one line before any work
        out = hub.check_hf_out(args.out, args.checkpoint)
        folder = hub.write_hf_folder(args.checkpoint, out, license=args.license)
        print(f"exported {folder}/ (config.json, model.safetensors, README.md)")
        if args.push_to_hub:
            url = hub.push_folder(folder, args.push_to_hub, token=token, private=args.private)
            print(f"pushed {folder} to {url}")
        return 0
    if args.int8:
        path = export_int8(args)
    else:
        path = export(args.checkpoint, args.format, args.out)
    print(f"exported {path} (+ {path.with_suffix('.json').name})")
    return 0


def export_int8(args) -> Path:
    """--format onnx --int8: the fp32 graph, quantized on training images, checked against fp32 on the
    test split; written (model + sidecar with the check) only when they agree well enough or --force."""
    from emotion_dist.inference import quantize
    from emotion_dist.inference.standalone import add_metadata
    from emotion_dist.modelio import checkpoint_config, load_checkpoint

    if not 0 < args.min_agreement <= 1:
        raise ConfigError(f"--min-agreement {args.min_agreement} is not a fraction in (0, 1]; e.g. 0.98")
    path = output_path(args.checkpoint, "onnx", args.out or str(Path(args.checkpoint).with_suffix(".int8.onnx")))
    cfg = checkpoint_config(load_checkpoint(args.checkpoint), args.overrides)
    model, meta = load_model(args.checkpoint)
    meta["preprocessing"] = preprocessing_recipe(meta)
    fp32 = onnx_bytes(model, meta)
    check_parity(model, fp32, meta, args.checkpoint)
    calibration, _, _ = quantize.split_arrays(cfg, split="train", limit=args.calibration, seed=cfg.train.seed)
    x, labels, classes = quantize.split_arrays(cfg, split="test")
    if classes != meta["classes"]:
        raise ConfigError(f"the data's classes {classes} are not the checkpoint's {meta['classes']}; give "
                          f"data.root=PATH of the data it was trained on")
    int8 = quantize.quantize(fp32, calibration)
    check = {**quantize.compare(fp32, int8, x, labels), "calibration_images": int(len(calibration)),
             "min_agreement": args.min_agreement}
    print(f"int8 vs fp32 on {check['test_images']} test images: agreement {check['agreement']:.4f}, accuracy "
          f"{check['int8_accuracy']:.4f} (fp32 {check['fp32_accuracy']:.4f}), {check['speed_ratio']:.2f}x the "
          f"speed, {check['int8_bytes'] / check['fp32_bytes']:.2f}x the size")
    if check["agreement"] < args.min_agreement and not args.force:
        raise ConfigError(f"int8 agrees with fp32 on {check['agreement']:.2%} of the test images, below "
                          f"--min-agreement {args.min_agreement}; nothing written: calibrate on more images "
                          f"(--calibration N), use the fp32 export, or pass --force")
    meta.pop("onnx_max_abs_diff", None)  # that figure is fp32's; int8's is the agreement below
    meta["precision"], meta["int8"] = "int8", check
    atomic_write_bytes(path, add_metadata(int8, meta, meta["preprocessing"]))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return path
