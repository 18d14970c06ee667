"""`emotion-dist bench`: where the time goes, side by side on the same images and machine.

(a) classic loader alone   (b) fast loader alone   (c) model step alone on ready tensors
(d) end-to-end classic     (e) end-to-end fast     (f) ultralytics' own trainer (--ultralytics)
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(device, dtype) -> float:
    """Measured dense matmul throughput: the denominator of MFU on this machine."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def train_step_flops(cfg, x, y) -> float:
    """Counted on an eager copy: a compiled model must not be traced under a dispatch mode."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from .model import build_model

    model = build_model(cfg.model.in_channels, cfg.model.num_classes, cfg.data.image_size).to(x.device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).float(), y).backward()
    return counter.get_total_flops()


def run_bench(args) -> int:
    import torch

    from . import distributed as D
    from .augment import ClassicDataset, gather_uint8
    from .config import load_config
    from .build import build_trainer
    from .data import dataset_root, load_datasets
    from .engine import Trainer
    from .loader import train_batches
    from .loggers import setup_logging

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emotion-bench-"))
    overrides = [
        f"data.synthetic_train={args.images}", f"data.synthetic_test={max(7, args.images // 10)}",
        f"data.image_size={args.image_size}", f"train.batch_size={args.batch}", f"train.precision={args.precision}",
        f"train.device={args.device}", f"data.num_workers={args.workers}", f"run.dir={workdir / 'run'}",
        f"run.cache_dir={args.cache_dir}", "run.resume=never", "train.eval_test=false", "log.every_steps=1000000",
        f"train.epochs={args.epochs}", f"train.compile={'true' if args.compile else 'false'}",
    ]
    cfg, _ = load_config(None, overrides)
    env = D.init_distributed(cfg, D.detect_launch({}))
    setup_logging(1)  # quiet: the bench prints its own table
    root = dataset_root(cfg)
    ds = load_datasets(cfg, root)
    dev = env.device
    rows: list[dict] = []

    def new_trainer(pipeline: str) -> Trainer:
        cfg.data.pipeline = pipeline
        return build_trainer(cfg, env, ds)

    def batches(tr: Trainer, steps):
        return train_batches(ds.train, steps, 0, tr.transform, cfg.data.pipeline, ds.channels, cfg.data.image_size,
                             cfg.train.seed, cfg.data.num_workers)

    def record(name: str, images: int, seconds: float, extra: dict | None = None) -> None:
        row = {"row": name, "img_per_s": images / seconds, "seconds": seconds, "images": images,
               "peak_rss_mb": round(_peak_rss_mb(), 1)}
        if dev.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(dev)
        rows.append({**row, **(extra or {})})

    trainer = new_trainer("fast")
    steps = trainer.sampler.plan()[: args.steps + 2]
    n_img = sum(sum(s.real) for s in steps[2:])

    # (b) fast loader alone
    for s in steps[:2]:
        x, y, idx = gather_uint8(ds.train, s.micro_batches[0])
        trainer.transform.train(x, idx, 0)
    _sync(dev)
    t = time.perf_counter()
    for s in steps[2:]:
        for pos in s.micro_batches:
            x, y, idx = gather_uint8(ds.train, pos)
            trainer.transform.train(x, idx, 0)
    _sync(dev)
    record("(b) fast loader", n_img, time.perf_counter() - t)

    # (a) classic loader alone
    dataset = ClassicDataset(ds.train, ds.channels, cfg.data.image_size, True, cfg.train.seed)
    batches = [m.tolist() for s in steps for m in s.micro_batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=dev.type == "cuda")
    it = iter(loader)
    next(it), next(it)
    t = time.perf_counter()
    for x, y, _ in it:
        x.to(dev, non_blocking=True)
    _sync(dev)
    record("(a) classic loader", n_img, time.perf_counter() - t)

    # (c) model step alone on a ready batch (timed below, interleaved with (e))
    x, y, idx = gather_uint8(ds.train, steps[0].micro_batches[0])
    x, y = trainer.transform.train(x, idx, 0), y.to(dev)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    flops = train_step_flops(cfg, x, y) / len(y)
    ready = [(x, y, torch.ones(len(y), dtype=torch.bool, device=dev))]
    t = time.perf_counter()
    for s in steps[:2]:  # warm-up (with --compile: the compilation)
        trainer.train_step(s, ready)
    _sync(dev)
    warmup_s = time.perf_counter() - t

    # (d) end-to-end classic: loader + augmentation + step, as in training
    tr = new_trainer("classic")
    t = None
    for i, (s, b) in enumerate(batches(tr, tr.sampler.plan()[: args.steps + 2])):
        if i == 2:
            _sync(dev)
            t = time.perf_counter()
        tr.train_step(s, b)
    _sync(dev)
    record("(d) end-to-end classic", n_img, time.perf_counter() - t)

    # (c) and (e) interleaved in short rounds: on a shared machine throughput drifts by +-10 % over
    # seconds, which would swamp the few-percent difference between them if timed one after the other
    tr = new_trainer("fast")
    fast = batches(tr, tr.sampler.plan()[: args.steps + 2])
    for _ in range(2):
        tr.train_step(*next(fast))
    t_c = t_e = 0.0
    n_c = n_e = 0
    timed = steps[2:]
    for r in range(0, len(timed), 5):
        chunk = timed[r: r + 5]
        _sync(dev)
        t = time.perf_counter()
        for s in chunk:
            trainer.train_step(s, ready)
        _sync(dev)
        t_c += time.perf_counter() - t
        n_c += len(y) * len(chunk)
        t = time.perf_counter()
        for _ in chunk:
            s, b = next(fast)
            tr.train_step(s, b)
            n_e += sum(s.real)
        _sync(dev)
        t_e += time.perf_counter() - t
    record("(c) model step", n_c, t_c, {"warmup_s": round(warmup_s, 2)})
    record("(e) end-to-end fast", n_e, t_e)

    # measured before ultralytics, which lowers torch's thread count for the rest of the process
    peak = matmul_peak_flops(dev, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    threads = torch.get_num_threads()
    if args.ultralytics:
        ours, theirs = compare_with_ultralytics(cfg, env, ds, root, args, workdir)
        rows += [ours, theirs]

    by = {r["row"][:3]: r for r in rows}
    for key in ("(c)", "(e)"):
        by[key]["mfu"] = flops * by[key]["img_per_s"] / peak
    summary = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": threads, "image_size": args.image_size,
        "batch": args.batch, "precision": args.precision, "images": args.images, "steps": args.steps,
        "compile": bool(args.compile), "train_step_gflops_per_image": flops / 1e9, "matmul_peak_tflops": peak / 1e12,
        "ratios": {
            "fast_loader_vs_model_step (b/c)": by["(b)"]["img_per_s"] / by["(c)"]["img_per_s"],
            "end_to_end_fast_vs_model_step (e/c)": by["(e)"]["img_per_s"] / by["(c)"]["img_per_s"],
            "end_to_end_fast_vs_classic (e/d)": by["(e)"]["img_per_s"] / by["(d)"]["img_per_s"],
        },
        "rows": rows,
    }
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    D.close_distributed()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def compare_with_ultralytics(cfg, env, ds, root, args, workdir: Path) -> tuple[dict, dict]:
    """Same images (our train/val split as folders), image size, batch and epochs: epoch time
    and final validation accuracy of ultralytics' classification trainer against ours."""
    from .build import build_trainer

    ul = workdir / "ultralytics-data"
    for split_name, split in (("train", ds.train), ("val", ds.val)):
        for i in split.index:
            src = Path(split.files[i])
            dst = ul / split_name / src.parent.name / f"{i}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(src.resolve(), dst)
    cfg.data.pipeline = "fast"
    cfg.run.dir = str(workdir / "ours")
    tr = build_trainer(cfg, env, ds)
    t = time.perf_counter()
    tr.fit()
    ours_s = time.perf_counter() - t
    ours = {"row": "(g) ours, fit with validation", "seconds_per_epoch": ours_s / args.epochs,
            "val_accuracy": tr.progress.history[-1]["val_accuracy"], "epochs": args.epochs,
            "img_per_s": len(ds.train) * args.epochs / ours_s, "peak_rss_mb": round(_peak_rss_mb(), 1)}

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO("yolo12n-cls.yaml")
    t = time.perf_counter()
    res = model.train(data=str(ul), epochs=args.epochs, imgsz=args.image_size, batch=args.batch,
                      device="cpu" if env.device.type == "cpu" else env.device.index, workers=args.workers,
                      plots=False, amp=args.precision != "fp32", project=str(workdir / "ul-runs"), name="bench",
                      exist_ok=True, verbose=False, pretrained=False, val=True, seed=cfg.train.seed)
    ul_s = time.perf_counter() - t
    top1 = float(getattr(res, "top1", None) or res.results_dict.get("metrics/accuracy_top1", float("nan")))
    theirs = {"row": "(f) ultralytics YOLO(yolo12n-cls).train", "seconds_per_epoch": ul_s / args.epochs,
              "val_accuracy": top1, "epochs": args.epochs, "img_per_s": len(ds.train) * args.epochs / ul_s,
              "peak_rss_mb": round(_peak_rss_mb(), 1)}
    return ours, theirs


def print_report(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"emotion-dist bench: {summary['device']}, {summary['image_size']} px, batch {summary['batch']}, "
                    f"{summary['precision']}, torch {summary['torch']} ({summary['threads']} threads)")
    for col in ("row", "img/s", "s/epoch", "val acc", "MFU", "peak RSS MB", "peak GPU MB"):
        t.add_column(col, justify="right")
    for r in summary["rows"]:
        t.add_row(r["row"], f"{r['img_per_s']:,.0f}", _f(r.get("seconds_per_epoch"), ".1f"),
                  _f(r.get("val_accuracy"), ".4f"), _f(r.get("mfu"), ".1%"), f"{r['peak_rss_mb']:,.0f}",
                  _f(r.get("peak_gpu_mb"), ",.0f"))
    c = Console(file=sys.stdout, width=120)
    c.print(t)
    for k, v in summary["ratios"].items():
        c.print(f"  {k}: {v:.2f}x")
    model_step = next(r for r in summary["rows"] if r["row"].startswith("(c)"))
    c.print(f"  model-step warm-up (2 steps{', compilation included' if summary['compile'] else ''}): "
            f"{model_step['warmup_s']:.1f} s")
    c.print(f"  train step: {summary['train_step_gflops_per_image']:.3f} GFLOP/image; "
            f"measured matmul peak {summary['matmul_peak_tflops']:.3f} TFLOP/s")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
