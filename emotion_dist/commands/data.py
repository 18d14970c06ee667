"""`emotion-dist data cache`: prepare the data and its decoded cache as training would (same config,
same launchers, once per node or job) ahead of training, e.g. in a Slurm job of its own, and report
what it cost: images, seconds, images/s per core, size on disk, peak memory."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from emotion_dist.data.cache import _Chunks, human_bytes


def proc_field(path: str, name: str) -> int:
    """A `Name:  N kB` field of a /proc status file, in bytes (0 when unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


class _MemoryPeaks:
    """Samples the anonymous memory of this process (RssAnon) and, while a pool of decode workers
    runs, the memory those workers add (Private_Dirty: a forked worker shares our pages until it
    writes them, so its RssAnon would count our memory again)."""

    def __init__(self, every_s: float = 0.1):
        self.own = self.workers = 0
        self.every_s, self.stop = every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, name="memory-peaks", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.own = max(self.own, proc_field("/proc/self/status", "RssAnon:"))
            if _Chunks.pools_alive:  # other children (ldconfig's vfork at import) share our memory outright
                kids = descendants(os.getpid())
                self.workers = max(self.workers, sum(proc_field(f"/proc/{k}/smaps_rollup", "Private_Dirty:")
                                                     for k in kids))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_data_cache(config_path, overrides) -> int:
    """Prepare the data and its decoded cache as training would (same config, same launchers,
    once per node or job), then report what it cost. Rank 0 prints."""
    from emotion_dist.config import load_config
    from emotion_dist.distributed import process_group
    from emotion_dist.training.build import prepare_data
    from emotion_dist.training.loggers import setup_logging

    cfg, _ = load_config(config_path, overrides)
    info = process_group.detect_launch()
    process_group.check_launch(cfg, info)
    env = process_group.init_distributed(cfg, info)
    setup_logging(env.rank)
    started = time.time()
    ok = False
    try:
        with _MemoryPeaks() as peaks:
            ds = prepare_data(cfg, env)
        if env.is_main:
            print(f"data ready in {time.time() - started:.1f} s (scan, sizes, decoding, checks)", flush=True)
            splits = [("train+val", ds.train.images)] + ([("test", ds.test.images)] if ds.test is not None else [])
            splits = [(name, images) for name, images in splits if getattr(images, "filename", None)]  # memory-mapped
            hwm = proc_field("/proc/self/status", "VmHWM:")
            for name, images in splits:
                print(_describe(name, Path(images.filename), started), flush=True)
            print(f"peak memory: {hwm / 1e9:.2f} GB resident in this process ({peaks.own / 1e9:.2f} GB anonymous); "
                  f"decode workers added {peaks.workers / 1e9:.2f} GB in total", flush=True)
        ok = True
        return 0
    finally:
        process_group.close_distributed(clean=ok)


def _describe(split: str, npy: Path, started: float) -> str:
    meta = json.loads(npy.with_suffix(".json").read_text())
    n, c, s, _ = meta["shape"]
    b = meta["build"]
    head = (f"{split}: {n} images ({len(meta['skipped'])} skipped) as {c} x {s} x {s} uint8 = "
            f"{human_bytes(npy.stat().st_size)} on disk in {npy}")
    workers = max(1, b["workers"])
    wall = b["images"] / max(b["seconds"], 1e-9)
    rate = (f"{wall:,.0f} img/s, {wall / workers:,.0f} img/s per core ({workers} worker process"
            f"{'es' if workers > 1 else ''} on {b['ranks']} rank{'s' if b['ranks'] > 1 else ''}), "
            f"{b['images'] / max(b['cpu_seconds'], 1e-9):,.0f} img/s per CPU-second")
    if b["finished_at"] >= started:
        return f"{head}; decoded in {b['seconds']:.1f} s: {rate}"
    return f"{head}; already built (earlier: {b['seconds']:.1f} s, {rate})"
