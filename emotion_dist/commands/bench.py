"""`emotion-dist bench`: where the time goes, side by side on the same images, settings and machine.

It takes train's config (`--config`, `key=value`): the data source and root, image size, batch,
precision, strategy, compile and data.on_device of a training run, so it times the user's own data
and settings, through the same entry points training uses (build_trainer, loader.train_batches,
Trainer.train_step). Under torchrun every rank takes part; rank 0 reports.

(a) classic loader alone   (b) fast loader alone   (c) model step alone on a ready batch
(d) end-to-end classic     (e) end-to-end fast     (f) ultralytics' trainer, (g) ours (--ultralytics)

Timing: CUDA events on a GPU (perf_counter on the CPU). The model step's first call (with
train.compile: the compilation) and the warm-up steps after it are reported apart from the timed
steps. MFU = model FLOPs per image x img/s / the device's dense bf16 peak (known cards), else a
matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROWS = "abcde"
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s; first match wins
DENSE_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12))


def rows_arg(text: str) -> str:
    """--rows: letters of a-e, e.g. `ce` (the model step and the fast pipeline)."""
    letters = text.replace(",", "").lower()
    if not letters or set(letters) - set(ROWS):
        raise argparse.ArgumentTypeError(f"{text!r}: give letters of {ROWS} (e.g. ce); f and g come with --ultralytics")
    return "".join(sorted(set(letters)))


def known_peak(device_name: str) -> tuple[float, str] | None:
    for key, flops in DENSE_BF16_PEAK:
        if key in device_name:
            return flops, f"{key} dense bf16 (data sheet)"
    return None


class Stopwatch:
    """Time summed over regions: CUDA events on a GPU, so a region's time is what the device spent
    from reaching its start to reaching its end (no sync between regions); perf_counter elsewhere."""

    def __init__(self, device):
        self.device, self.spans = device, []

    @contextlib.contextmanager
    def region(self):
        import torch

        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.spans.append(time.perf_counter() - t)

    def seconds(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(s.elapsed_time(e) for s, e in self.spans) / 1000
        return sum(self.spans)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops(device, dtype) -> float:
    """Measured dense matmul throughput on this device and dtype."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    sw = Stopwatch(device)
    _sync(device)
    with sw.region():
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / sw.seconds()


def train_step_flops(cfg, x, y) -> float:
    """Counted on an eager copy: a compiled model must not be traced under a dispatch mode."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from emotion_dist.model import build_model

    model = build_model(cfg.model.in_channels, cfg.model.num_classes, cfg.data.image_size).to(x.device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).float(), y).backward()
    return counter.get_total_flops()


def bench_config(args, workdir: Path):
    """Train's config (file, overrides, accelerate's precision) plus what a bench run must not do:
    resume, write into the user's run directory, log to W&B, or evaluate the test split."""
    from emotion_dist.distributed.env_settings import resolve_config

    own = [f"run.dir={workdir / 'run'}", "run.resume=never", "train.eval_test=false", "log.every_steps=1000000",
           "log.wandb=off", "log.sample_ids=false"]
    cfg, _ = resolve_config(args.config, [*args.overrides, *(["train.compile=true"] if args.compile else []), *own])
    return cfg


def bench_sources(batches) -> dict:
    """The batch sources bench times, by pipeline: the run's own for `fast` (resident on the device
    when data.on_device put it there) and the same with the classic per-sample pipeline."""
    return {"fast": replace(batches, pipeline="fast"), "classic": replace(batches, pipeline="classic")}


def plan_steps(sampler, n: int) -> list:
    """n training steps from epoch 0 on (more than an epoch's worth: the next epochs' steps)."""
    steps, epoch = [], 0
    while len(steps) < n:
        sampler.set_epoch(epoch)
        steps += sampler.plan()
        epoch += 1
    sampler.set_epoch(0)
    return steps[:n]


def run_bench(args) -> int:
    from emotion_dist.distributed import process_group
    from emotion_dist.errors import ConfigError
    from emotion_dist.training.strategy import check_world_size
    from emotion_dist.utils.output import check_json_out, emit, stdout_to_stderr, text_stream
    from emotion_dist.utils.paths import check_outside_data, data_paths

    check_json_out(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emotion-bench-"))
    cfg = bench_config(args, workdir)  # validates run.dir (in the workdir) against data.root
    data = data_paths(cfg.data.root, cfg.data.ferplus)
    check_json_out(args, data=data)
    check_outside_data(workdir, data, option="--workdir")
    info = process_group.detect_launch()
    process_group.check_launch(cfg, info)
    check_world_size(cfg.dist.strategy, info.world_size)
    if args.ultralytics and info.world_size > 1:
        raise ConfigError("--ultralytics runs ultralytics' own trainer in one process; run bench without torchrun "
                          "for the comparison")
    env = process_group.init_distributed(cfg, info)
    ok = False
    try:
        with stdout_to_stderr(args.json):  # ultralytics' logger and C code too: stdout holds the JSON alone
            summary = _bench(cfg, env, args, workdir)
        if env.is_main:
            print_report(summary, text_stream(args))
            emit(args, summary)
        ok = True
        return 0
    finally:
        process_group.close_distributed(clean=ok)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(cfg, env, args, workdir: Path) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from emotion_dist.training.build import build_trainer, prepare_data
    from emotion_dist.training.loggers import setup_logging
    from emotion_dist.utils.output import MARKER

    setup_logging(1)  # warnings only: the bench prints its own table
    ds = prepare_data(cfg, env)
    trainer = build_trainer(cfg, env, ds=ds)
    dev, world, rows = env.device, env.world_size, args.rows
    warmup, timed_n = args.warmup, args.steps
    plan = plan_steps(trainer.sampler, warmup + timed_n)
    warm, timed = plan[:warmup], plan[warmup:]
    n_img = sum(sum(s.real) for s in timed)  # this rank's real images in the timed steps
    results: list[dict] = []

    # an epoch past train.augment_warmup_epochs: the augmentation timed at full strength
    augmented_epoch = math.ceil(cfg.train.augment_warmup_epochs)

    sources = bench_sources(trainer.batches)

    def batches(pipeline: str, steps):
        return sources[pipeline].epoch(steps, augmented_epoch)

    def record(key: str, name: str, images: int, seconds: float, **extra) -> None:
        row = {"row": f"({key}) {name}", "img_per_s": images / seconds, "seconds": seconds, "images": images,
               "peak_rss_mb": round(_peak_rss_mb(), 1), **extra}
        if dev.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(dev)
        results.append(row)

    def loader_alone(pipeline: str) -> float:
        it = batches(pipeline, warm + timed)
        for _ in warm:
            next(it)
        _sync(dev)
        sw = Stopwatch(dev)
        with sw.region():
            for _ in it:
                pass
        return sw.seconds()

    if "b" in rows:
        record("b", "fast loader", n_img, loader_alone("fast"), per_rank=True)
    if "a" in rows:
        record("a", "classic loader", n_img, loader_alone("classic"), per_rank=True)

    # (c) the model step on one ready batch; its first call (compilation) and warm-up timed apart
    first = plan[0]
    _, ready = next(batches("fast", [first]))
    step_images = sum(first.real)
    x, y, _ = ready[0]
    flops = train_step_flops(cfg, x, y) / len(y)
    t = time.perf_counter()
    trainer.train_step(first, ready)
    _sync(dev)
    first_step_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in warm:
        trainer.train_step(first, ready)
    _sync(dev)
    warmup_s = time.perf_counter() - t

    if "d" in rows:
        it = batches("classic", warm + timed)
        for s, b in (next(it) for _ in warm):
            trainer.train_step(s, b)
        _sync(dev)
        sw = Stopwatch(dev)
        with sw.region():
            for s, b in it:
                trainer.train_step(s, b)
        record("d", "end-to-end classic", n_img * world, sw.seconds())

    # (c) and (e) interleaved in rounds of 5 steps: throughput drifts over seconds on a shared machine,
    # which would land on one of them if they were timed one after the other
    if "c" in rows or "e" in rows:
        fast = batches("fast", warm + timed)
        for _ in warm:
            trainer.train_step(*next(fast))
        sw_c, sw_e = Stopwatch(dev), Stopwatch(dev)
        n_c = n_e = 0
        _sync(dev)
        for r in range(0, len(timed), 5):
            chunk = timed[r: r + 5]
            if "c" in rows:
                with sw_c.region():
                    for _ in chunk:
                        trainer.train_step(first, ready)
                n_c += step_images * len(chunk)
            if "e" in rows:
                with sw_e.region():
                    for _ in chunk:
                        s, b = next(fast)
                        trainer.train_step(s, b)
                        n_e += sum(s.real)
        if "c" in rows:
            record("c", "model step", n_c * world, sw_c.seconds(), first_step_s=round(first_step_s, 3),
                   warmup_s=round(warmup_s, 3))
        if "e" in rows:
            record("e", "end-to-end fast", n_e * world, sw_e.seconds())
    compiled = {"graphs": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values())}

    # measured before ultralytics, which lowers torch's thread count for the rest of the process
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # a CPU's fast path is fp32
    measured = matmul_flops(dev, dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak, peak_source = known_peak(name) or (measured, f"a {str(dtype).removeprefix('torch.')} matmul measured in "
                                                       f"this run")
    if args.ultralytics:
        results += compare_with_ultralytics(cfg, env, ds, args=args, workdir=workdir)

    by = {r["row"][1]: r for r in results}
    for key in "ce":
        if key in by:
            by[key]["mfu"] = flops * by[key]["img_per_s"] / world / peak
    ratios = {}
    for label, num, den in (("fast_loader_vs_model_step (b/c)", "b", "c"),
                            ("end_to_end_fast_vs_model_step (e/c)", "e", "c"),
                            ("end_to_end_fast_vs_classic (e/d)", "e", "d")):
        if num in by and den in by:
            ratios[label] = by[num]["img_per_s"] / by[den]["img_per_s"]
    t = cfg.train
    summary = {
        MARKER: "bench", "device": name, "torch": torch.__version__, "world_size": world,
        "timing": "cuda events" if dev.type == "cuda" else "perf_counter",
        "data": {"root": ds.root, "train_images": len(ds.train), "image_size": cfg.data.image_size,
                 "on_device": sources["fast"].resident is not None},
        "batch": t.batch_size, "grad_accum": t.grad_accum, "precision": t.precision, "strategy": cfg.dist.strategy,
        "adamw_fused": bool(trainer.optimizer.defaults.get("fused")),  # fused on CUDA (Strategy._adamw_impl)
        "compile": t.compile, "compile_mode": t.compile_mode if t.compile else None,
        "compile_backend": t.compile_backend if t.compile else None, "compiled": compiled if t.compile else None,
        "steps": timed_n, "warmup_steps": warmup, "first_step_s": first_step_s, "warmup_s": warmup_s,
        "train_step_gflops_per_image": flops / 1e9, "peak_tflops": peak / 1e12, "peak_source": peak_source,
        "matmul_tflops": measured / 1e12, "ratios": ratios, "rows": results,
    }
    if "c" in by and "e" in by:  # the input pipeline's share of an end-to-end step
        summary["input_share_of_step"] = 1 - by["e"]["img_per_s"] / by["c"]["img_per_s"]
    trainer.close()
    return summary


def compare_with_ultralytics(cfg, env, ds, *, args, workdir: Path) -> list[dict]:
    """Same images (our train/val split as folders), image size, batch, epochs and compile mode:
    epoch time and final validation accuracy of ultralytics' classification trainer against ours."""
    from emotion_dist.errors import ConfigError
    from emotion_dist.training.build import build_trainer

    if not Path(ds.train.files[int(ds.train.index[0])]).is_file():
        raise ConfigError(f"--ultralytics reads image files and {ds.root} holds none (a CSV data set); bench it "
                          f"without --ultralytics or on an image folder")
    ul = workdir / "ultralytics-data"
    for split_name, split in (("train", ds.train), ("val", ds.val)):
        for i in split.index:
            src = Path(split.files[i])
            dst = ul / split_name / src.parent.name / f"{i}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(src.resolve(), dst)
    cfg.run.dir = str(workdir / "ours")
    cfg.train.epochs = args.epochs
    tr = build_trainer(cfg, env, ds=ds)
    t = time.perf_counter()
    tr.fit()
    ours_s = time.perf_counter() - t
    ours = {"row": "(g) ours, fit with validation", "seconds_per_epoch": ours_s / args.epochs,
            "val_accuracy": tr.progress.history[-1]["val_accuracy"], "epochs": args.epochs,
            "img_per_s": len(ds.train) * args.epochs / ours_s, "peak_rss_mb": round(_peak_rss_mb(), 1)}
    tr.close()

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO("yolo12n-cls.yaml")
    compile_mode = cfg.train.compile_mode if cfg.train.compile else False  # ultralytics 8.4: compile=bool|mode
    t = time.perf_counter()
    res = model.train(data=str(ul), epochs=args.epochs, imgsz=cfg.data.image_size, batch=cfg.train.batch_size,
                      device="cpu" if env.device.type == "cpu" else env.device.index, workers=cfg.data.num_workers,
                      plots=False, amp=cfg.train.precision != "fp32", project=str(workdir / "ul-runs"), name="bench",
                      exist_ok=True, verbose=False, pretrained=False, val=True, seed=cfg.train.seed,
                      compile=compile_mode)
    ul_s = time.perf_counter() - t
    top1 = float(getattr(res, "top1", None) or res.results_dict.get("metrics/accuracy_top1", float("nan")))
    theirs = {"row": "(f) ultralytics YOLO(yolo12n-cls).train", "seconds_per_epoch": ul_s / args.epochs,
              "val_accuracy": top1, "epochs": args.epochs, "img_per_s": len(ds.train) * args.epochs / ul_s,
              "peak_rss_mb": round(_peak_rss_mb(), 1), "compile": compile_mode}
    return [ours, theirs]


def print_report(summary: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    d = summary["data"]
    compiled = (f", compiled ({summary['compile_backend']}, {summary['compile_mode']})" if summary["compile"] else "")
    t = Table(title=f"emotion-dist bench: {summary['device']} x {summary['world_size']}, {d['image_size']} px, batch "
                    f"{summary['batch']}, {summary['precision']}{compiled}, torch {summary['torch']}")
    for col in ("row", "img/s", "s/epoch", "val acc", "MFU", "peak RSS MB", "peak GPU MB"):
        t.add_column(col, justify="right")
    for r in summary["rows"]:
        t.add_row(r["row"], f"{r['img_per_s']:,.0f}", _f(r.get("seconds_per_epoch"), ".1f"),
                  _f(r.get("val_accuracy"), ".4f"), _f(r.get("mfu"), ".1%"), f"{r['peak_rss_mb']:,.0f}",
                  _f(r.get("peak_gpu_mb"), ",.0f"))
    c = Console(file=file or sys.stdout, width=120)
    c.print(t)
    for k, v in summary["ratios"].items():
        c.print(f"  {k}: {v:.2f}x")
    if "input_share_of_step" in summary:
        c.print(f"  input pipeline's share of an end-to-end step (1 - e/c): {summary['input_share_of_step']:.1%}")
    c.print(f"  model step: first call {summary['first_step_s']:.2f} s"
            f"{' (compilation included)' if summary['compile'] else ''}, then {summary['warmup_steps']} warm-up "
            f"steps {summary['warmup_s']:.2f} s; timed: {summary['steps']} steps per row ({summary['timing']})")
    if summary["compiled"]:
        c.print(f"  compiled graphs: {summary['compiled']['graphs']}, recompiles: {summary['compiled']['recompiles']}")
    c.print(f"  train step: {summary['train_step_gflops_per_image']:.3f} GFLOP/image; MFU against "
            f"{summary['peak_tflops']:.3g} TFLOP/s ({summary['peak_source']}); measured matmul "
            f"{summary['matmul_tflops']:.3g} TFLOP/s; data {d['root']} ({d['train_images']} train images"
            f"{', resident on the device' if d['on_device'] else ''})")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
