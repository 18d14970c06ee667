"""The decoded-image cache: every image decoded once to uint8 N x C x S x S in one `.npy` file that
every later run and every rank memory-maps.

Size on disk: N x C x S^2 bytes (+128 header): N images, C channels (1 gray, 3 RGB), S the stored
size. `data.cache_size=auto` keeps the native size when all images share one square size (FER's 48
px) and otherwise stores at `data.image_size`; an integer stores at that size. Non-square images
become square by `data.fit`: resize (stretch), crop (centre square) or pad (centred on black).
Resizing is antialiased (PIL's filters widen with the scale factor).

Build: streamed and parallel. The leader allocates the whole file up front (so a full disk is one
line before any decoding, never a SIGBUS); every member of the node's BuildGroup decodes a contiguous
slice of the images in worker processes, each worker writing its rows straight into the file
(`os.pwrite`), so no process ever holds more than a chunk of images. The leader then closes the
gaps left by unreadable images, writes the final header, fsyncs and renames the file into place,
and writes the metadata last: a cache is a `KEY.npy` with its `KEY.json` that agree, nothing else.

Interrupted builds restart: a stop signal removes the temp file (exit 0); a killed build leaves a
temp file named after its host and pid, which the next build on that host removes before it starts
again from the first image (remote hosts' leftovers go after a day). A damaged cache (truncated or
empty `.npy`, unreadable or missing JSON, too few rows, wrong shape) is reported and rebuilt.

Key: the decoder's fingerprint of every item (for files: the name's bytes, size and mtime), the
labels, channels, fit and the stored size. A decoder is any picklable object with `channels`,
`__call__(item) -> uint8 H x W x C`, `fingerprint(item) -> bytes` and optionally
`native_size(item) -> (h, w)` (see `Decoder`); items must be JSON values (they go into the metadata).

This module imports neither torch nor the distributed code at import time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from emotion_dist.distributed import interrupts
from emotion_dist.errors import DataError
from emotion_dist.utils.fsutil import atomic_write_json, disk_error, remove_stale_temps, temp_path

log = logging.getLogger("emotion_dist")

CACHE_VERSION = 2
HEADER_BYTES = 128  # numpy pads a 4-d uint8 header to 128 bytes whatever the shape's digits
CHUNK_BYTES = 8 << 20  # decoded bytes a worker holds at once
MAX_CHUNK = 256  # images per worker task
FITS = ("resize", "crop", "pad")
MARKER = "decoded-cache"


# ---------------------------------------------------------------- decoders (run in worker processes)
class Decoder:
    """One item -> uint8 H x W x channels. Subclass and pickle-able: workers receive it."""

    channels: int

    def __call__(self, item) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self, item) -> bytes:
        """Bytes that change when the item's content may have changed."""
        raise NotImplementedError

    def native_size(self, item) -> tuple[int, int]:
        """(height, width) before any resizing; decoders that can read it cheaply override this."""
        return tuple(self(item).shape[:2])


class FileDecoder(Decoder):
    """Image files by path (any name the OS allows), through images.read_uint8."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, path) -> np.ndarray:
        from emotion_dist.data.images import read_uint8

        return read_uint8(path, self.channels)

    def fingerprint(self, path) -> bytes:
        try:
            st = os.stat(path)
            stamp = b"%d\0%d" % (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = b"missing"
        return os.fsencode(path) + b"\0" + stamp

    def native_size(self, path) -> tuple[int, int]:
        from PIL import Image

        with Image.open(path) as img:  # reads the header only
            return img.size[1], img.size[0]


def fit_square(a: np.ndarray, size: int, fit: str) -> np.ndarray:
    """uint8 H x W (x C) -> size x size x C: crop/pad non-square images to a square first (or
    stretch them with `resize`), then an antialiased bilinear resize."""
    from PIL import Image

    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    if h != w and fit == "crop":
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        a = a[y:y + side, x:x + side]
    elif h != w and fit == "pad":
        side = max(h, w)
        out = np.zeros((side, side, c), np.uint8)
        y, x = (side - h) // 2, (side - w) // 2
        out[y:y + h, x:x + w] = a
        a = out
    if a.shape[:2] != (size, size):
        img = Image.fromarray(a[:, :, 0] if c == 1 else a)
        a = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a
    return a


def _worker_init(parent: int) -> None:
    """Workers leave stopping to their rank (which cancels the pool and removes the temp file), and
    die with it: a killed rank's forked workers would otherwise wait forever on their task queue,
    holding the rank's sockets open."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the rank died before prctl took effect
        os._exit(1)


def _sizes_task(decoder: Decoder, items: list) -> list[list[int]]:
    """Distinct (h, w) among `items`, stopping at two (then the set is mixed anyway)."""
    found: set[tuple[int, int]] = set()
    for item in items:
        try:
            found.add(tuple(int(v) for v in decoder.native_size(item)))
        except Exception:  # unreadable: it will be skipped at decode time
            continue
        if len(found) > 1:
            break
    return [list(s) for s in found]


def _decode_task(decoder: Decoder, items: list, first_row: int, path: str, offset: int, size: int,
                 fit: str) -> tuple[list[tuple[int, str]], float]:  # positional: the worker pool passes a tuple
    """Decode `items` into rows first_row.. of the cache file; returns (row, reason) of unreadable
    ones and the CPU seconds spent (images/s per core on a machine that other work shares)."""
    cpu = time.process_time()
    c = decoder.channels
    out = np.zeros((len(items), c, size, size), np.uint8)
    failed = []
    for j, item in enumerate(items):
        try:
            a = fit_square(decoder(item), size, fit)
            if a.shape[2] != c:
                raise ValueError(f"decoded to {a.shape[2]} channels, expected {c}")
            out[j] = a.transpose(2, 0, 1)
        except Exception as e:  # corrupt, truncated, zero-byte, not an image
            failed.append((first_row + j, f"{type(e).__name__}: {str(e)[:120]}"))
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_all(fd, memoryview(out).cast("B"), offset + first_row * out[0].nbytes)
    finally:
        os.close(fd)
    return failed, time.process_time() - cpu


def _pwrite_all(fd: int, buf: memoryview, pos: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, pos)
        buf, pos = buf[n:], pos + n


# ---------------------------------------------------------------- keys and files
def parse_cache_size(spec) -> Optional[int]:
    """data.cache_size: None for auto, else the stored size in pixels."""
    return None if str(spec) == "auto" else int(spec)


def content_key(items: Sequence, labels: Sequence[int], decoder: Decoder, fit: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} {type(decoder).__qualname__} c{decoder.channels} fit={fit}\n".encode())
    for item, label in zip(items, labels):
        h.update(decoder.fingerprint(item))
        h.update(b"\0%d\n" % label)
    return h.hexdigest()[:20]


def cache_key(content: str, size: int) -> str:
    return hashlib.sha256(f"{content} s{size}".encode()).hexdigest()[:20]


def npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    assert len(buf.getvalue()) == HEADER_BYTES, shape  # 4-d shapes of any size stay within 128 bytes
    return buf.getvalue()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


@dataclass
class Cached:
    images: np.ndarray  # N x C x S x S uint8, memory-mapped
    labels: np.ndarray  # N int64
    items: list  # the decoded items (file names), row by row
    skipped: list[tuple[Any, str]]  # (item, reason)
    path: Path  # the .npy
    meta: dict


def open_cache(folder: Path, key: str) -> tuple[Optional[Cached], Optional[str]]:
    """(the cache, None), (None, None) when there is none, or (None, what is wrong with it)."""
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if not meta_path.exists():
        # none, or one being published: a build renames its .npy into place and writes the .json
        # last, so another job sharing run.cache_dir (a sweep's parallel trials) may look in between;
        # an .npy left alone by a crash there is replaced by the next build
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"{meta_path.name} is unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("emotion_dist") != MARKER or not isinstance(meta.get("items"), list):
        return None, f"{meta_path.name} is not a decoded-cache record"
    try:
        images = np.load(npy, mmap_mode="r")
    except FileNotFoundError:
        return None, "the .npy file is missing"
    except Exception as e:  # truncated (ValueError: mmap length ...), empty (EOFError), bad header
        return None, f"{type(e).__name__}: {str(e)[:100]}"
    n = len(meta["items"])
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape) != meta.get("shape"):
        return None, f"shape {images.shape} does not match the record's {meta.get('shape')}"
    if images.shape[0] != n or len(meta.get("labels", ())) != n:
        return None, f"{images.shape[0]} rows for {n} images"
    if npy.stat().st_size != images.offset + images.nbytes:
        return None, f"{npy.stat().st_size} bytes where {images.offset + images.nbytes} were expected"
    skipped = [(s[0], s[1]) for s in meta.get("skipped", [])]
    return Cached(images, np.asarray(meta["labels"], dtype=np.int64), meta["items"], skipped, npy, meta), None


def _discard(folder: Path, key: str, why: str) -> None:
    """Our own damaged cache: warn, naming the file, and remove it so it is built again."""
    log.warning("the decoded cache %s is damaged (%s); rebuilding it", folder / f"{key}.npy", why)
    for suffix in (".npy", ".json"):
        (folder / f"{key}{suffix}").unlink(missing_ok=True)


def _sizes_record(folder: Path, content: str) -> Path:
    return folder / f"{content}.sizes.json"


def _read_native(folder: Path, content: str) -> tuple[bool, Optional[int]]:
    """(known, native square size or None) from an earlier header pass over the same images."""
    try:
        rec = json.loads(_sizes_record(folder, content).read_text())
        return True, rec["native"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, None


# ---------------------------------------------------------------- running chunks
def _workers_for(items: int, cpus: int) -> int:
    return max(1, min(cpus, -(-items // 64)))


class _Chunks:
    """Run tasks in worker processes (or inline with one worker), a few in flight per worker,
    checking for stop signals while they run."""

    pools_alive = 0  # read by `data cache`'s memory sampler

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            _Chunks.pools_alive += 1
            import multiprocessing

            # fork, as DataLoader workers do: starts in milliseconds and needs no re-importable
            # __main__ (spawn/forkserver re-run an unguarded script); the workers only run PIL and
            # numpy, nothing that the parent's other threads (gloo, the heartbeat) could hold
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_init, initargs=(os.getpid(),))

    def run(self, fn, tasks, on_result, on_idle=lambda: None) -> None:
        if self.pool is None:
            for args in tasks:
                interrupts.check()
                on_result(fn(*args), args)
                on_idle()
            return
        pending: dict[Future, tuple] = {}
        tasks = iter(tasks)
        more = True
        while more or pending:
            while more and len(pending) < 2 * self.workers:
                args = next(tasks, None)
                if args is None:
                    more = False
                    break
                pending[self.pool.submit(fn, *args)] = args
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            interrupts.check()
            for f in done:
                on_result(f.result(), pending.pop(f))
            on_idle()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # no worker writes after we return
            self.pool = None
            _Chunks.pools_alive -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _chunk_len(row_bytes: int) -> int:
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // max(1, row_bytes)))


class _Bar:
    """Images/s on rank 0's console: a rich bar on a terminal, a plain line every 10 s otherwise."""

    def __init__(self, enabled: bool, total: int, what: str):
        self.enabled, self.total, self.what = enabled, total, what
        self.start = self.last_line = time.monotonic()
        self.done = 0
        self.progress = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"decoding {what}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("decode", total=total, rate="")
        elif enabled:
            log.info("decoding %d %s into the cache", total, what)

    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.start)

    def update(self, done: int) -> None:
        self.done = done
        if self.progress is not None:
            self.progress.update(self.task, completed=done, rate=f"{self.rate():,.0f} img/s")
        elif self.enabled and time.monotonic() - self.last_line >= 10:
            self.last_line = time.monotonic()
            log.info("decoding %s: %d/%d (%.0f %%), %.0f img/s", self.what, done, self.total,
                     100 * done / max(1, self.total), self.rate())

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ---------------------------------------------------------------- the build
def build(folder: Path, items: Sequence, labels: Sequence[int], decoder: Decoder, *, cache_size="auto",
          image_size: int = 64, fit: str = "resize", what: str = "images", team=None) -> Cached:
    """The cache of `items` in `folder`, built now if it is missing or damaged. Called by every
    member of a prepare.BuildGroup at once (they share the work), alone, or by a rank that only reads
    (prepare.READER: another node built it)."""
    from emotion_dist.data import prepare

    if fit not in FITS:
        raise DataError(f"data.fit={fit!r} is invalid; allowed: {', '.join(FITS)}")
    folder = Path(folder)
    items, labels = list(items), list(labels)
    role = team if team is not None else prepare.current_role()
    content = content_key(items, labels, decoder, fit)
    fixed = parse_cache_size(cache_size)
    if role == prepare.READER:
        return _read_only(folder, content, fixed, image_size)
    team = role if role is not None else prepare.BuildGroup.solo()
    b = SharedCacheBuild(folder, items=items, labels=labels, decoder=decoder, fixed=fixed, image_size=image_size,
                         fit=fit, what=what, team=team, content=content)
    return b.run()


def _read_only(folder: Path, content: str, fixed: Optional[int], image_size: int) -> Cached:
    size, why = fixed, "no record of the images' sizes"
    if size is None:
        known, native = _read_native(folder, content)
        size = (native or image_size) if known else None
    cached = None
    if size is not None:
        cached, why = open_cache(folder, cache_key(content, size))
    if cached is None:
        raise DataError(
            f"the decoded cache that another node built is not in {folder} here ({why or 'missing'}): "
            f"run.cache_dir is not shared between the nodes; set data.prepare_scope=node (or auto)"
        )
    return cached


class SharedCacheBuild:
    """One build, run by every member of the team. The leader decides (ready / read the sizes
    first / build) and posts JSON decisions; every member does its slice of each phase."""

    def __init__(self, folder, *, items, labels, decoder, fixed, image_size, fit, what, team, content):
        self.folder, self.items, self.labels, self.decoder = folder, items, labels, decoder
        self.fixed, self.image_size, self.fit, self.what, self.team = fixed, image_size, fit, what, team
        self.content = content
        n, k = len(items), team.size
        self.lo, self.hi = team.index * n // k, (team.index + 1) * n // k  # this member's slice
        self.tmp: Optional[Path] = None  # the leader's temp file, once allocated

    def run(self) -> Cached:
        team = self.team
        try:
            hello = team.gather(json.dumps({"content": self.content, "cpus": sorted(os.sched_getaffinity(0))}))
            plan = json.loads(team.broadcast(json.dumps(self._decide(hello)) if team.is_leader else None))
            if plan["do"] == "sizes":
                found: set[tuple[int, int]] = set()
                with _Chunks(self._workers(plan)) as chunks:
                    chunks.run(_sizes_task, ((self.decoder, self.items[i:min(i + 512, self.hi)])
                                             for i in range(self.lo, self.hi, 512)),
                               lambda r, _: found.update(tuple(s) for s in r), team.check_abort)
                sizes = team.gather(json.dumps(sorted(found)))
                plan = json.loads(team.broadcast(json.dumps(self._after_sizes(sizes, plan))
                                                 if team.is_leader else None))
            if plan["do"] == "build":
                self._build(plan)
        except OSError as e:
            raise DataError(disk_error(e, f"the decoded cache in {self.folder}",
                                       "free space or set run.cache_dir to a larger disk")) from None
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)  # after a successful rename there is nothing left
        cached, why = open_cache(self.folder, cache_key(self.content, plan["size"]))
        if cached is None:  # only if something else removed the files meanwhile
            raise DataError(f"the decoded cache in {self.folder} vanished after it was built ({why or 'missing'}); "
                            f"is another program cleaning run.cache_dir?")
        return cached

    def _workers(self, plan: dict) -> int:
        return _workers_for(self.hi - self.lo, plan["workers"][self.team.index])

    # -- the leader decides
    def _decide(self, hello: list[str]) -> dict:
        members = [json.loads(h) for h in hello]
        if any(m["content"] != self.content for m in members):
            raise DataError(f"the ranks of one node see different {self.what} (file lists, sizes or times "
                            f"differ); make sure the data does not change while a run starts")
        # each member's cpus: cpus its members share are split, cpus bound to one member are its own
        union = set().union(*(m["cpus"] for m in members))
        share = max(1, len(union) // len(members))
        plan = {"workers": [max(1, min(len(m["cpus"]), share)) for m in members]}
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        if self.fixed is not None:
            return self._ready_or_build(self.fixed, plan)
        known, native = _read_native(self.folder, self.content)
        if known:
            return self._ready_or_build(native or self.image_size, plan)
        return {**plan, "do": "sizes"}

    def _after_sizes(self, sizes: list[str], plan: dict) -> dict:
        found = {tuple(s) for member in sizes for s in json.loads(member)}
        native = None
        if len(found) == 1:
            ((h, w),) = found
            native = h if h == w else None
        atomic_write_json(_sizes_record(self.folder, self.content),
                          {"emotion_dist": "decoded-cache-sizes", "native": native, "sizes_seen": sorted(found)})
        return self._ready_or_build(native or self.image_size, plan)

    def _ready_or_build(self, size: int, plan: dict) -> dict:
        key = cache_key(self.content, size)
        cached, why = open_cache(self.folder, key)
        if cached is not None:
            return {**plan, "do": "ready", "size": size}
        if why is not None:
            _discard(self.folder, key, why)
        self.tmp = self._allocate(size)
        return {**plan, "do": "build", "size": size, "tmp": str(self.tmp)}

    def _allocate(self, size: int) -> Path:
        """The whole file, header first, with its blocks reserved: a full disk fails here, before
        any decoding, and never later as a SIGBUS or a torn file."""
        shape = (len(self.items), self.decoder.channels, size, size)
        need = HEADER_BYTES + int(np.prod(shape))
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise self._no_space(need, free, shape)
        tmp = temp_path(self.folder / f"{cache_key(self.content, size)}.npy")
        try:
            with open(tmp, "wb") as f:
                f.write(npy_header(shape))
                f.flush()
                try:
                    os.posix_fallocate(f.fileno(), 0, need)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    f.truncate(need)  # no fallocate on this filesystem: a full disk shows up as ENOSPC in a write
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise self._no_space(need, shutil.disk_usage(self.folder).free, shape) from None
            raise
        return tmp

    def _no_space(self, need: int, free: int, shape) -> DataError:
        n, c, s, _ = shape
        return DataError(
            f"no space for the decoded cache in {self.folder}: it needs {human_bytes(need)} ({n} images x {c} "
            f"channel{'s' if c > 1 else ''} x {s}x{s} px) and {human_bytes(free)} is free; free space or set "
            f"run.cache_dir to a larger disk (or lower data.cache_size)"
        )

    # -- every member decodes its slice into the leader's file; the leader finishes
    def _build(self, plan: dict) -> None:
        team, size, tmp = self.team, plan["size"], plan["tmp"]
        start = time.monotonic()
        step = _chunk_len(self.decoder.channels * size * size)
        failed: list[tuple[int, str]] = []
        cpu = [0.0]
        workers = self._workers(plan)
        bar = _Bar(team.shows_progress, len(self.items), self.what)
        try:
            def on_result(result, args):
                failed.extend(result[0])
                cpu[0] += result[1]
                bar.update(team.add_progress(len(args[1])))

            def on_idle():
                team.check_abort()
                if bar.enabled:
                    bar.update(team.add_progress(0))

            with _Chunks(workers) as chunks:
                chunks.run(_decode_task, ((self.decoder, self.items[i:min(i + step, self.hi)], i, tmp,
                                           HEADER_BYTES, size, self.fit) for i in range(self.lo, self.hi, step)),
                           on_result, on_idle)
            report = {"failed": failed, "images": self.hi - self.lo, "workers": workers,
                      "seconds": round(time.monotonic() - start, 3), "cpu_seconds": round(cpu[0], 3)}
            reports = team.gather(json.dumps(report))
            if team.is_leader:
                bar.update(team.add_progress(0))
                bar.close()  # before the log lines of the finish
                self._finish(size, [json.loads(r) for r in reports], start)
        finally:
            bar.close()
        team.broadcast("done" if team.is_leader else None)

    def _finish(self, size: int, reports: list[dict], start: float) -> None:
        interrupts.check()
        failed = dict(sorted((int(r), why) for rep in reports for r, why in rep["failed"]))
        keep = [i for i in range(len(self.items)) if i not in failed]
        if not keep:
            first = next(iter(failed.values()), "no images")
            raise DataError(f"none of the {len(self.items)} {self.what} could be decoded ({first}); check the files")
        c = self.decoder.channels
        row = c * size * size
        shape = (len(keep), c, size, size)
        with open(self.tmp, "r+b") as f:
            if failed:
                _close_gaps(f.fileno(), keep, row)
            f.seek(0)
            f.write(npy_header(shape))
            f.truncate(HEADER_BYTES + len(keep) * row)
            f.flush()
            os.fsync(f.fileno())
        interrupts.check()  # the last point before the rename; after it the metadata follows in milliseconds
        key = cache_key(self.content, size)
        os.replace(self.tmp, self.folder / f"{key}.npy")
        self.tmp = None
        seconds = time.monotonic() - start
        if self.team.shows_progress:
            log.info("decoded %d %s in %.1f s (%.0f img/s) into %s", len(self.items), self.what, seconds,
                     len(self.items) / max(seconds, 1e-9), self.folder / f"{key}.npy")
        atomic_write_json(self.folder / f"{key}.json", {
            "emotion_dist": MARKER, "version": CACHE_VERSION, "shape": list(shape), "stored_size": size,
            "channels": c, "fit": self.fit, "items": [self.items[i] for i in keep],
            "labels": [int(self.labels[i]) for i in keep],
            "skipped": [[self.items[i], why] for i, why in failed.items()],
            "build": {"images": len(self.items), "seconds": round(seconds, 3), "ranks": len(reports),
                      "workers": sum(rep["workers"] for rep in reports),
                      "cpu_seconds": round(sum(rep["cpu_seconds"] for rep in reports), 3),
                      "per_rank": [{k: rep[k] for k in ("images", "workers", "seconds", "cpu_seconds")}
                                   for rep in reports],
                      "finished_at": time.time()},
        }, indent=None)


def _close_gaps(fd: int, keep: list[int], row: int) -> None:
    """Move the kept rows up over the unreadable ones, in order and a block at a time (a row
    only ever moves to a lower position, so reading before writing each block is safe)."""
    block = max(1, CHUNK_BYTES // row)
    runs: list[list[int]] = []  # runs of consecutive kept rows: [source start, length]
    for i in keep:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    dest = 0
    for src, length in runs:
        for k in range(0, length, block):
            interrupts.check()  # a block at a time (8 MiB): the temp file goes, the next start builds again
            n = min(block, length - k)
            if src + k != dest:
                data = os.pread(fd, n * row, HEADER_BYTES + (src + k) * row)
                _pwrite_all(fd, memoryview(data), HEADER_BYTES + dest * row)
            dest += n


# ---------------------------------------------------------------- `emotion-dist data cache`
