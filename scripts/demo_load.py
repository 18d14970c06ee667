"""Load check of `emotion-dist demo`: requests per second and p50/p95 latency of POST /api/predict
for one photo at 1, 4 and 16 concurrent clients (the figures in docs/benchmarks.md).

It starts the demo itself on 127.0.0.1 at a free port and talks to nothing else (loopback only), sends
a bounded number of requests per level, prints a Markdown table (and --json-out FILE), then stops
the server with Ctrl-C's signal. Speed does not depend on the weights, so `--random-model` writes a
checkpoint at random weights with the default config's input (64 px, gray) into a temp folder.

    python scripts/demo_load.py --random-model [--onnx] [--clients 1,4,16] [--requests 48]
    python scripts/demo_load.py --checkpoint runs/NAME/checkpoints/best.pt
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_model(folder: Path, onnx: bool) -> Path:
    import torch

    from emotion_dist.config import Config
    from emotion_dist.data.datasets import normalization
    from emotion_dist.data.readers.synthetic import CLASSES
    from emotion_dist.model import EmotionNet
    from emotion_dist.modelio import CheckpointMeta

    cfg = Config()
    size, channels = cfg.data.image_size, cfg.model.in_channels
    torch.manual_seed(0)
    mean, std = normalization(channels)
    meta = CheckpointMeta(classes=list(CLASSES), image_size=size, in_channels=channels,
                          normalization={"mean": mean, "std": std}, data_size=size)
    path = folder / "random.pt"
    torch.save({"model_state_dict": EmotionNet(channels, len(CLASSES)).eval().state_dict(), **meta.to_state()}, path)
    if onnx:
        subprocess.run([sys.executable, "-m", "emotion_dist.cli", "export", "--checkpoint", str(path), "--format",
                        "onnx"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        return path.with_suffix(".onnx")
    return path


def start_demo(checkpoint: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "emotion_dist.cli", "demo", "--checkpoint", str(checkpoint),
                             "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"the demo did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = "emotiondistload"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), boundary


def level(port: int, body: bytes, boundary: str, clients: int, requests: int) -> dict:
    """`requests` POSTs shared by `clients` threads, each on its own keep-alive connection."""
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    share = [requests // clients + (i < requests % clients) for i in range(clients)]
    latencies, lock, failures = [], threading.Lock(), []
    go = threading.Barrier(clients)

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        go.wait()
        for _ in range(n):
            t = time.perf_counter()
            conn.request("POST", "/api/predict", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                if r.status != 200 or not json.loads(data)["faces"]:
                    failures.append(r.status)
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, share))
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed or found no face: {failures[:5]}")
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"clients": clients, "requests": requests, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 2), "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(q[18] * 1000, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .pt or .onnx model")
    src.add_argument("--random-model", action="store_true", help="a checkpoint at random weights (default config)")
    p.add_argument("--onnx", action="store_true", help="with --random-model: export it and serve the .onnx")
    p.add_argument("--image", default=None, help="the photo to send (default: scikit-image's astronaut)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=48, help="requests per level, at most 500 (default 48)")
    p.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if not 1 <= args.requests <= 500:
        p.error("--requests must be 1..500")
    clients = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= 64 for c in clients):
        p.error("--clients: each level 1..64")
    image = (Path(args.image) if args.image
             else Path(__import__("skimage.data", fromlist=["x"]).__file__).parent / "astronaut.png")
    body, boundary = multipart(image)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.checkpoint) if args.checkpoint else random_model(Path(tmp), args.onnx)
        proc, port = start_demo(model)
        try:
            level(port, body, boundary, 1, 3)  # warm-up: the cascade and the model's first call
            rows = [level(port, body, boundary, c, max(args.requests, c)) for c in clients]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    print(f"model {model.name}, photo {image.name}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print("| clients | requests | req/s | p50 ms | p95 ms |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": model.name, "image": image.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
