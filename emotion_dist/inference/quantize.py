"""A static int8 ONNX model and its check against fp32: onnxruntime's `quant_pre_process`, then
`quantize_static` (QDQ, per-channel signed int8 weights, unsigned int8 activations: on this
CPU (AVX-512 VNNI) U8S8 ran 2-3x faster than S8S8 for this graph), calibrated on training images
read exactly as training reads
them (the data pipeline's decoded images, BatchTransform.eval's resize and normalisation). Dynamic
int8 is not offered: on this CNN it was 2-5x slower than fp32 on CPU.

Quantization changes some answers, more so on pictures unlike the calibration ones, so `compare`
measures agreement with fp32 and both accuracies on the test split; export refuses below a floor.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from emotion_dist.errors import ConfigError

METHOD = "onnxruntime quantize_static: QDQ, per-channel, int8 weights, uint8 activations, MinMax calibration"
BATCH = 64


def split_arrays(cfg, *, split: str, limit: Optional[int] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """(float32 N x C x S x S model inputs, labels, the data's classes) of the train or test split:
    decoded by the data pipeline (its cache) and normalised by BatchTransform.eval as training does.
    `limit` picks that many images, seeded, spread over the split."""
    import torch

    from emotion_dist.data.augment import BatchTransform
    from emotion_dist.data.datasets import dataset_root, load_datasets

    ds = load_datasets(cfg, dataset_root(cfg), check_classes=False)
    part = ds.train if split == "train" else ds.test
    if part is None or len(part) == 0:
        raise ConfigError(f"{ds.root} has no {split} split; --int8 calibrates on train and checks on test: give "
                          f"data.root=PATH of a data set with both")
    index = np.asarray(part.index)
    if limit and limit < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, limit, replace=False))
    transform = BatchTransform(ds.channels, cfg.data.image_size, torch.device("cpu"), cfg.train.seed)
    chunks = [transform.eval(torch.from_numpy(np.ascontiguousarray(part.images[index[i:i + 256]]))).numpy()
              for i in range(0, len(index), 256)]
    return np.concatenate(chunks).astype(np.float32), np.asarray(part.labels[index]), ds.classes


def quantize(fp32: bytes, calibration: np.ndarray, *, batch: int = 16) -> bytes:
    """The int8 model of an fp32 ONNX model, calibrated on `calibration` (model inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="emotion-dist-int8-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return out.read_bytes()


def session(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def predictions(sess, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Arg-max classes over `x` in batches of BATCH, and the seconds it took."""
    start = time.perf_counter()
    out = [sess.run(None, {"images": x[i:i + BATCH]})[0].argmax(1) for i in range(0, len(x), BATCH)]
    return np.concatenate(out), time.perf_counter() - start


def latency_ms(sess, x: np.ndarray, batch: int, repeats: int = 20) -> float:
    """The fastest of `repeats` calls at `batch`, in milliseconds (after two warm-up calls): on a
    shared machine the neighbours only ever add time, so the minimum is the figure that repeats."""
    inputs = {"images": np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))}
    for _ in range(2):
        sess.run(None, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return float(min(times) * 1000)


def compare(fp32: bytes, int8: bytes, x: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement, both accuracies and the speed ratio (fp32 seconds / int8 seconds over the split,
    batches of BATCH) of the two models on the same inputs."""
    a, b = session(fp32), session(int8)
    predictions(a, x[:BATCH]), predictions(b, x[:BATCH])  # warm-up: first calls allocate
    pa, ta = predictions(a, x)
    pb, tb = predictions(b, x)
    return {"test_images": int(len(x)), "agreement": float((pa == pb).mean()),
            "fp32_accuracy": float((pa == labels).mean()), "int8_accuracy": float((pb == labels).mean()),
            "speed_ratio": round(ta / tb, 3), "fp32_bytes": len(fp32), "int8_bytes": len(int8), "method": METHOD}
