"""`emotion-dist sweep FILE`: a grid of config overrides x seeds, each point an ordinary training run
in a run directory of its own under one sweep folder.

FILE (YAML):

    name: lr-wd                    # the sweep folder: sweeps/lr-wd (or --out)
    config: configs/default.yaml   # optional: one file or a list, merged in order as --config
    base:                          # optional: overrides every point gets (a mapping or key=value list)
      train.epochs: 4
    grid:                          # every combination of these values
      train.lr: [0.001, 0.002]
      train.weight_decay: [0.01, 0.05]
    seeds: [0, 1, 2]               # optional (default [0]): each combination once per seed

Points are numbered in a fixed order (grid combinations in the order written, seeds innermost), so
`--point I` means the same run everywhere: locally, and as Slurm array task I (slurm/sweep.sbatch).
The sweep folder holds `sweep.json` (the points; summarize reads it) and one run directory per
point, named after its overrides. Resumable: a finished point (its test pass recorded) is skipped,
an interrupted one resumes from its checkpoint (run.resume=auto), so rerunning the same command
carries a sweep on. Locally points run one after another or `--parallel N` at a time, each
`emotion-dist train` in a process of its own session; a stop signal is passed on to them once
(each saves and exits), and no new point starts.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from emotion_dist.config import config_paths, format_default, load_config
from emotion_dist.errors import ConfigError
from emotion_dist.utils.fsutil import atomic_write_json
from emotion_dist.utils.output import MARKER, emit, text_stream

SWEEP_FILE = "sweep.json"
KEYS = ("name", "config", "base", "grid", "seeds", "search")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class Point:
    index: int
    overrides: list[str]  # the grid's key=value for this point (without the seed)
    seed: int
    run_dir: str

    @property
    def group(self) -> str:
        """The point without its seed: what summarize averages over."""
        return " ".join(self.overrides) or "(base)"


@dataclass
class Sweep:
    name: str
    folder: Path
    config: list[str]
    base: list[str]
    grid: dict[str, list]
    seeds: list[int]
    points: list[Point] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)  # --search optuna: key -> [choices] or {low, high, log, step}

    def train_args(self, point: Point) -> list[str]:
        """`emotion-dist train`'s arguments for a point (the same locally and under Slurm)."""
        configs = [a for c in self.config for a in ("--config", c)]
        return [*configs, *self.base, *point.overrides, f"train.seed={point.seed}", f"run.dir={point.run_dir}",
                "run.resume=auto"]


def _as_overrides(base, where: str) -> list[str]:
    if base is None:
        return []
    if isinstance(base, dict):
        return [f"{k}={v if isinstance(v, str) else format_default(v)}" for k, v in base.items()]
    if isinstance(base, list) and all(isinstance(o, str) and "=" in o for o in base):
        return list(base)
    raise ConfigError(f"{where}: `base` must be a mapping (train.epochs: 4) or a list of key=value strings")


def _slug(overrides: list[str], seed: int, short: dict[str, str]) -> str:
    parts = []
    for o in overrides:
        key, value = o.split("=", 1)
        parts.append(f"{short[key]}={value}")
    name = "_".join([*parts, f"seed{seed}"])
    return _UNSAFE.sub("-", name)[:200]


def load_sweep(path: str, out: Optional[str] = None) -> Sweep:
    """The sweep FILE, checked (its keys, and every point's config, validated before any run starts)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path} not found; pass a YAML file with `grid:` (see docs/experiments.md)")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"sweep file {path} is not valid YAML; fix its syntax") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with name, grid, seeds, ...")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: `grid` must map config keys to non-empty lists of values "
                          f"(train.lr: [0.001, 0.002])")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"sweep file {path}: `seeds` must be a list of whole numbers >= 0 (e.g. [0, 1, 2])")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep file {path}: `seeds` lists a seed twice; each seed once")
    if "train.seed" in grid:
        raise ConfigError(f"sweep file {path}: put the seeds under `seeds:`, not in the grid")
    name = str(spec.get("name") or p.stem)
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"sweep file {path}: name={name!r} must be a plain folder name")
    configs = config_paths(spec.get("config"))
    configs = [c if Path(c).is_absolute() or Path(c).exists() else str(p.parent / c) for c in configs]
    sweep = Sweep(name, Path(out) if out else Path("sweeps") / name, configs, _as_overrides(spec.get("base"), path),
                  {str(k): v for k, v in grid.items()}, seeds)
    shorts = [k.split(".")[-1] for k in sweep.grid]
    short = {k: (s if shorts.count(s) == 1 else k) for k, s in zip(sweep.grid, shorts)}
    combos = itertools.product(*[[f"{k}={v if isinstance(v, str) else format_default(v)}" for v in values]
                                 for k, values in sweep.grid.items()])
    for combo in combos:
        for seed in seeds:
            sweep.points.append(Point(len(sweep.points), list(combo), seed,
                                      str(sweep.folder / _slug(list(combo), seed, short))))
    sweep.search = _check_search(spec.get("search"), path, configs, sweep.base)
    for point in sweep.points:  # every point's config, before anything runs: a typo fails the sweep at once
        try:
            load_config(configs or None, [*sweep.base, *point.overrides, f"train.seed={point.seed}",
                                          f"run.dir={point.run_dir}"])
        except ConfigError as e:
            raise ConfigError(f"sweep point {point.index} ({point.group}): {e}") from None
    return sweep


def _check_search(search, where: str, configs: list[str], base: list[str]) -> dict:
    """`search:` for --search optuna: each key a list of choices or {low, high} (+ log: true, step)."""
    if not search:
        return {}
    if not isinstance(search, dict):
        raise ConfigError(f"{where}: `search` must map config keys to [choices] or {{low: X, high: Y}}")
    for key, space in search.items():
        if isinstance(space, list) and space:
            sample = space[0]
        elif isinstance(space, dict) and {"low", "high"} <= set(space) and set(space) <= {"low", "high", "log", "step"}:
            if not (isinstance(space["low"], (int, float)) and isinstance(space["high"], (int, float))
                    and space["low"] < space["high"]):
                raise ConfigError(f"{where}: search {key}: low must be a number below high")
            if space.get("log") and space["low"] <= 0:
                raise ConfigError(f"{where}: search {key}: log: true needs low > 0")
            sample = space["low"]
        else:
            raise ConfigError(f"{where}: search {key} must be a list of choices or {{low: X, high: Y}} "
                              f"(log: true and step: S allowed)")
        try:
            load_config(configs or None,
                        [*base, f"{key}={sample if isinstance(sample, str) else format_default(sample)}"])
        except ConfigError as e:
            raise ConfigError(f"{where}: search {key}: {e}") from None
    return dict(search)


def record(sweep: Sweep) -> None:
    """sweep.json in the sweep folder: the points and their run directories (summarize reads it)."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    marker = sweep.folder / SWEEP_FILE
    if marker.exists():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict) or theirs.get(MARKER) != "sweep":
            raise ConfigError(f"{marker} exists and emotion-dist did not write it; choose another --out")
    search = bool(getattr(sweep, "searching", False))  # --search optuna: trials, not the grid's points
    atomic_write_json(marker, {MARKER: "sweep", "name": sweep.name, "config": sweep.config, "base": sweep.base,
                               "grid": sweep.grid, "seeds": sweep.seeds,
                               **({"search": sweep.search} if search else {}),
                               "points": [] if search else [point_doc(p) for p in sweep.points]})


def point_doc(p: Point) -> dict:
    return {"index": p.index, "group": p.group, "overrides": p.overrides, "seed": p.seed, "run_dir": p.run_dir}


def point_done(sweep: Sweep, point: Point) -> bool:
    """Finished with its test pass (or without one, where its config asks for none)."""
    from emotion_dist.training.checkpoint import finished_message

    cfg, _ = load_config(sweep.config or None, [*sweep.base, *point.overrides, f"train.seed={point.seed}",
                                                f"run.dir={point.run_dir}"])
    return finished_message(Path(point.run_dir), cfg.train) is not None


def _child_argv(sweep_file: str, args, point: Point) -> list[str]:
    argv = [sys.executable, "-m", "emotion_dist.cli", "sweep", sweep_file, "--point", str(point.index)]
    return argv + (["--out", args.out] if args.out else [])


def run_local(sweep: Sweep, args) -> dict:
    """Every point not yet finished, `args.parallel` at a time, each in a process of its own."""
    from emotion_dist.distributed import interrupts

    interrupts.install()
    todo = [p for p in sweep.points if not point_done(sweep, p)]
    skipped = len(sweep.points) - len(todo)
    out = text_stream(args)
    print(f"sweep {sweep.name}: {len(sweep.points)} points in {sweep.folder} ({skipped} finished, {len(todo)} to run, "
          f"{args.parallel} at a time)", file=out, flush=True)
    running: dict[int, tuple[subprocess.Popen, Point, Any]] = {}
    codes: dict[int, int] = {}
    forwarded = False
    queue = list(todo)
    while queue or running:
        signame = interrupts.requested()
        if signame and not forwarded:  # once: a second signal would make a run leave without saving
            forwarded = True
            for proc, _, _ in running.values():
                proc.send_signal(getattr(signal, signame))
        while queue and len(running) < args.parallel and not signame:
            point = queue.pop(0)
            Path(point.run_dir).mkdir(parents=True, exist_ok=True)
            log = None if args.parallel == 1 and not args.json else open(Path(point.run_dir) / "sweep.log", "a")
            print(f"point {point.index}: {point.group} seed {point.seed} -> {point.run_dir}"
                  f"{'' if log is None else ' (output in ' + log.name + ')'}", file=out, flush=True)
            proc = subprocess.Popen(_child_argv(args.file, args, point), start_new_session=True,
                                    stdout=log or (sys.stderr if args.json else None), stderr=log or None)
            running[point.index] = (proc, point, log)
        for index, (proc, _point, log) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            codes[index] = code
            if log:
                log.close()
            del running[index]
            print(f"point {index}: {'done' if code == 0 else f'exit {code}'}", file=out, flush=True)
        if signame and not running:
            break
        time.sleep(0.2)
    failed = sorted(i for i, c in codes.items() if c not in (0, 130))
    stopped = interrupts.requested()
    return {"points": len(sweep.points), "skipped": skipped, "ran": len(codes), "failed": failed,
            "stopped": stopped, "codes": codes}


def run_point(sweep: Sweep, index: int) -> int:
    """One point, in this process (a Slurm array task, or a child of run_local)."""
    from emotion_dist.commands.train import run_training

    if not 0 <= index < len(sweep.points):
        raise ConfigError(f"--point {index}: the sweep has points 0 to {len(sweep.points) - 1}")
    point = sweep.points[index]
    args = sweep.train_args(point)
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    return run_training(configs or None, overrides)  # a finished point says so and does nothing


def run_sweep(args) -> int:
    sweep = load_sweep(args.file, args.out)
    if args.list:
        for p in sweep.points:
            print(f"{p.index}\t{p.run_dir}\t{' '.join([*p.overrides, f'train.seed={p.seed}'])}", file=text_stream(args))
        emit(args, {MARKER: "sweep", "name": sweep.name, "folder": str(sweep.folder),
                    "points": [point_doc(p) for p in sweep.points]})
        return 0
    record(sweep)
    if args.point is not None:
        if args.args:  # for slurm/sweep.sbatch: train's arguments, one per line
            if not 0 <= args.point < len(sweep.points):
                raise ConfigError(f"--point {args.point}: the sweep has points 0 to {len(sweep.points) - 1}")
            sys.stdout.write("".join(a + "\n" for a in sweep.train_args(sweep.points[args.point])))
            return 0
        return run_point(sweep, args.point)
    result = run_local(sweep, args)
    print(f"sweep {sweep.name}: {result['ran']} ran, {result['skipped']} already finished"
          f"{', failed: points ' + ', '.join(map(str, result['failed'])) if result['failed'] else ''}"
          f"{'; stopped by ' + result['stopped'] + ': the same command carries on' if result['stopped'] else ''}; "
          f"emotion-dist summarize {sweep.folder}", file=text_stream(args), flush=True)
    emit(args, {MARKER: "sweep", "name": sweep.name, "folder": str(sweep.folder), **result})
    from emotion_dist.distributed import interrupts

    if result["stopped"]:
        return interrupts.exit_code(result["stopped"])
    return 1 if result["failed"] else 0
