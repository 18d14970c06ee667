"""`emotion-dist export`: ONNX (dynamic batch, verified with onnxruntime) or safetensors, each with
a JSON sidecar (classes, image size, channels, normalization) so no part of this repo is needed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from emotion_dist.errors import ConfigError
from emotion_dist.modelio import load_model
from emotion_dist.utils.fsutil import atomic_write_bytes, guard_output
from emotion_dist.model import EmotionNet

MAX_ONNX_DIFF = 1e-4
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}


def is_our_export(path: Path) -> bool:
    """An export emotion-dist wrote: its JSON sidecar says so."""
    sidecar = Path(path).with_suffix(".json")
    try:
        return json.loads(sidecar.read_text()).get("format") == "emotion-dist"
    except (OSError, ValueError, AttributeError):
        return False


def output_path(checkpoint: str, fmt: str, out: str | None) -> Path:
    """Where the export goes, checked before any work: never the checkpoint, never a file of another
    kind or one emotion-dist did not write; a folder means a file named after the checkpoint in it."""
    suffix = SUFFIXES[fmt]
    path = Path(out) if out else Path(checkpoint).with_suffix(suffix)
    if path.is_dir() or (out and out.endswith(("/", "\\"))):
        path = path / Path(checkpoint).with_suffix(suffix).name
    guard_output(path, what=f"the {fmt} export", suffixes=(suffix,), inputs=[Path(checkpoint)], ours=is_our_export)
    guard_output(path.with_suffix(".json"), what="the sidecar", suffixes=(".json",), inputs=[Path(checkpoint)],
                 ours=lambda p: is_our_export(path), option="--out (its sidecar)")
    return path


def export(checkpoint: str, fmt: str, out: str | None = None) -> Path:
    path = output_path(checkpoint, fmt, out)
    model, meta = load_model(checkpoint)
    meta["preprocessing"] = recipe_of(checkpoint, meta)
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in model.state_dict().items()},
                    metadata={"classes": json.dumps(meta["classes"]), "preprocessing": json.dumps(meta["preprocessing"])})
    else:
        data = onnx_bytes(model, meta)
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return path


def recipe_of(checkpoint: str, meta: dict) -> dict:
    """The preprocessing recipe of a checkpoint (its config says whether faces were aligned)."""
    from emotion_dist.inference.predict import preprocessing_recipe
    from emotion_dist.modelio import load_checkpoint

    return preprocessing_recipe(meta, load_checkpoint(checkpoint).get("config", {}))


def onnx_bytes(model: EmotionNet, meta: dict) -> bytes:
    """The fp32 ONNX model (dynamic batch, OpenCV DNN-compatible reshapes), checked against PyTorch
    before anything is written, with the classes and the recipe in its metadata_props."""
    from emotion_dist.inference.standalone import add_metadata, opencv_compatible

    c, s = meta["in_channels"], meta["image_size"]
    buf = io.BytesIO()
    with opencv_compatible(model):
        torch.onnx.export(model, (torch.randn(1, c, s, s),), buf, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    data = buf.getvalue()
    diff = onnx_max_diff(model, data, c, s)  # verified before anything is written
    if diff > MAX_ONNX_DIFF:
        raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.2e} (> {MAX_ONNX_DIFF}); export refused")
    meta["onnx_max_abs_diff"] = diff
    return add_metadata(data, meta, meta["preprocessing"])


def onnx_max_diff(model: EmotionNet, onnx_model: bytes, channels: int, size: int) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


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
    from emotion_dist.commands.evaluate import checkpoint_config
    from emotion_dist.inference import quantize
    from emotion_dist.inference.standalone import add_metadata
    from emotion_dist.modelio import load_checkpoint

    if not 0 < args.min_agreement <= 1:
        raise ConfigError(f"--min-agreement {args.min_agreement} is not a fraction in (0, 1]; e.g. 0.98")
    path = output_path(args.checkpoint, "onnx", args.out or str(Path(args.checkpoint).with_suffix(".int8.onnx")))
    cfg = checkpoint_config(load_checkpoint(args.checkpoint), args.overrides)
    model, meta = load_model(args.checkpoint)
    meta["preprocessing"] = recipe_of(args.checkpoint, meta)
    fp32 = onnx_bytes(model, meta)
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
