"""int8 vs fp32 ONNX on this CPU, for docs/benchmarks.md: size, latency at batch 1 and 64 (the fastest of many calls)
(onnxruntime, CPUExecutionProvider, default threads), and the agreement and accuracies that
`export --int8` measured on the test split (read from the int8 model's sidecar).

    python scripts/int8_bench.py FP32.onnx INT8.onnx
"""

import json
import sys
from pathlib import Path

import numpy as np

from emotion_dist.inference.quantize import latency_ms, session


def main(fp32: str, int8: str) -> None:
    check = json.loads(Path(int8).with_suffix(".json").read_text())["int8"]
    meta = json.loads(Path(fp32).with_suffix(".json").read_text())
    c, s = meta["in_channels"], meta["image_size"]
    x = np.random.default_rng(0).standard_normal((64, c, s, s)).astype(np.float32)
    rows = []
    for name, path in (("fp32", fp32), ("int8", int8)):
        sess = session(Path(path).read_bytes())
        rows.append((name, Path(path).stat().st_size / 1e6, latency_ms(sess, x, 1, 200), latency_ms(sess, x, 64, 30),
                     check[f"{name}_accuracy"]))
    print("| model | size MB | batch 1 ms | batch 64 ms | test accuracy |\n|---|---:|---:|---:|---:|")
    for name, mb, b1, b64, acc in rows:
        print(f"| {name} | {mb:.2f} | {b1:.2f} | {b64:.1f} | {acc:.4f} |")
    print(f"\nagreement {check['agreement']:.4f} on {check['test_images']} test images; calibration "
          f"{check['calibration_images']} training images; speed at batch 1 {rows[0][2] / rows[1][2]:.2f}x, "
          f"at batch 64 {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:3])
