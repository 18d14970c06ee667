#!/usr/bin/env python3
"""GPU acceptance run: one command that checks and records on a CUDA machine what the CPU
test suite cannot: bf16 and fp16 (GradScaler) training, NCCL on one GPU and on all visible GPUs
(torchrun), each torch.compile mode, and `emotion-dist bench` at 96 and 224 px (CUDA-event timing,
compilation and warm-up reported apart, MFU, peak memory, the input pipeline's share of a step).

Writes OUT/gpu_acceptance.json (everything), OUT/gpu_acceptance.md (tables ready for
docs/benchmarks.md) and OUT/gpu_acceptance_logs.txt (the end of each check's output), after every
check, so a run cut short keeps what it measured. Checks run in order of importance while the
budget lasts; the rest are recorded as skipped. Without CUDA, or with --dry-run, it lists the
checks and their commands, checks every command's arguments against the CLI and the config, and
exits 0 (1 if a command would be refused).

Needs torch >= 2.11 and ultralytics (on the lent machines, carried as wheels: scripts/gpu_wheels.sh);
not wandb, kagglehub or accelerate. Usage: scripts/gpu_acceptance.sh [--quick] [--out DIR] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (  # the targets in docs/benchmarks.md, on one H100 or H200
    ("end to end >= 60,000 img/s at 96 px, bf16 (stretch 150,000)",
     "bench_96_reduce-overhead", "e", "img_per_s", 60_000),
    (">= 15,000 img/s at 224 px", "bench_224_reduce-overhead", "e", "img_per_s", 15_000),
    ("input pipeline <= 3 % of the step", "bench_96_reduce-overhead", None, "input_share_of_step", 0.03),
)


@dataclass
class Check:
    name: str
    what: str
    argv: list[str]  # run from the repository root; [] = in this process
    estimate_s: float  # a guess for one H100, for the budget
    kind: str  # env | data | bench | train
    quick: bool = True  # part of --quick
    min_gpus: int = 1
    run_dir: Optional[Path] = None  # train: its run directory
    json_out: Optional[Path] = None  # bench: its report
    status: str = "planned"  # pass | fail | skipped
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def build_plan(work: Path, quick: bool, steps: int, cpu: bool = False) -> list[Check]:
    """The checks, most important first. cpu: the same plan at toy sizes on the CPU (gloo, dynamo's eager
    backend instead of inductor), to rehearse the script itself before spending device time."""
    py = sys.executable
    cli = [py, "-m", "emotion_dist.cli"]
    data = ["data.source=folder", f"data.root={work / 'data'}", f"run.cache_dir={work / 'cache'}"]
    n_train = 200 if cpu else 4096 if quick else 8192
    px = {96: 32, 224: 64} if cpu else {96: 96, 224: 224}
    batch = 8 if cpu else 256
    nccl = [] if cpu else ["dist.backend=nccl"]

    def compiled(mode: Optional[str]) -> list[str]:
        if not mode:
            return []
        return ["train.compile=true", *(["train.compile_backend=eager"] if cpu else [f"train.compile_mode={mode}"])]

    def bench(size: int, rows: str, mode: Optional[str], estimate: float, quick_too: bool, *extra: str) -> Check:
        name = f"bench_{size}_{mode or 'eager'}" + ("_host" if "data.on_device=false" in extra else "")
        out = work / f"{name}.json"
        argv = [*cli, "bench", *data, f"data.image_size={px[size]}",
                f"train.batch_size={batch}", "train.precision=bf16",
                f"data.num_workers={0 if cpu else 8}", *compiled(mode), *extra,
                "--rows", rows, "--steps", str(steps), "--json-out", str(out), "--workdir", str(work / name)]
        what = (f"bench {px[size]} px, bf16, batch {batch}, {'compiled ' + mode if mode else 'eager'}, rows {rows}"
                + (", batches gathered on the host" if extra else ""))
        return Check(name, what, argv, estimate, "bench", quick_too, json_out=out)

    def train(name: str, what: str, precision: str, nproc: Optional[str], estimate: float, quick_too: bool,
              *extra: str) -> Check:
        """nproc: None = plain python; "1"; "gpu" = torchrun's one process per visible GPU."""
        run_dir = work / "runs" / name
        overrides = [*data, f"data.image_size={px[96]}", f"train.batch_size={batch}", f"train.precision={precision}",
                     "train.epochs=1", f"data.limit={8 * batch}", "log.every_steps=1", "log.wandb=off",
                     f"run.dir={run_dir}", "run.resume=never", *extra]
        procs = "2" if cpu and nproc == "gpu" else nproc
        launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if nproc else [py]
        return Check(name, what, [*launcher, "launch/train.py", *overrides], estimate, "train", quick_too,
                     min_gpus=2 if nproc == "gpu" and not cpu else 1, run_dir=run_dir)

    checks = [
        Check("env", "versions, devices, bf16 support, ultralytics importable", [], 5, "env"),
        Check("data", f"synthetic FER-like set ({n_train} train images), decoded once into the cache",
              [*cli, "data", "synthetic", "--out", str(work / "data"),
               "--train", str(n_train), "--test", str(n_train // 5)],
              10 if quick else 20, "data"),
        train("train_bf16_nccl1", "train one epoch in bf16 under torchrun, 1 GPU, NCCL (validation and test pass "
              "included)", "bf16", "1", 30, True, *nccl),
        train("train_fp16", "train one epoch in fp16 with GradScaler", "fp16", None, 25, True),
        train("train_nccl_all", "train one epoch under torchrun on every visible GPU, NCCL, bf16 gradient all-reduce, "
              "1 MB buckets, static graph", "bf16", "gpu", 40, True, *nccl, "dist.grad_compression=bf16",
              "dist.bucket_cap_mb=1", "dist.static_graph=true"),
        bench(96, "abcde", None, 40, True),
        bench(96, "bce", "reduce-overhead", 90, True),
        bench(224, "ce", "reduce-overhead", 90, True),
        bench(96, "bce", "default", 80, False),
        train("train_compiled", "train one epoch compiled (default mode), to compare with train_bf16_nccl1's "
              "eager losses", "bf16", "1", 60, False, *nccl, *compiled("default")),
        bench(224, "ce", None, 30, False),
        bench(96, "be", "reduce-overhead", 40, False, "data.on_device=false"),
        bench(96, "bce", "max-autotune", 240, False),
    ]
    return [c for c in checks if c.quick or not quick]


# ---------------------------------------------------------------- figures from each check's output
def env_figures() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
               "nccl": str(torch.cuda.nccl.version()) if cuda else None}
    for name in ("ultralytics", "torchvision", "wandb", "kagglehub", "accelerate"):
        try:
            figures[name] = __import__(name).__version__
        except ImportError:
            figures[name] = None
    return figures


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_figures(check: Check, stdout: str) -> dict:
    recs = _records(check.run_dir)
    steps = [r for r in recs if r.get("type") == "step"]
    epochs = [r for r in recs if r.get("type") == "epoch"]
    tests = [r for r in recs if r.get("type") == "test"]
    speeds = [r["img_per_s"] for r in steps[2:]]  # after compilation / warm-up
    start = next((line for line in stdout.splitlines() if "| world size" in line), "")
    figures = {"start_line": start.split("] ", 1)[-1], "steps": len(steps), "losses": [r["loss"] for r in steps],
               "median_img_per_s": statistics.median(speeds) if speeds else None,
               "bad_steps": sum(r.get("type") == "bad_step" for r in recs),
               "val_accuracy": epochs[-1]["val_accuracy"] if epochs else None,
               "test_accuracy": tests[-1]["accuracy"] if tests else None}
    last = check.run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        from emotion_dist.training.checkpoint import load_checkpoint

        scaler = load_checkpoint(last).get("scaler_state_dict") or {}
        figures["grad_scaler_scale"] = scaler.get("scale")
    return figures


def train_verdict(check: Check, figures: dict) -> str:
    """Empty when the run did what it should; else why not."""
    import math

    start, want = figures["start_line"], []
    precision = next(a.split("=")[1] for a in check.argv if a.startswith("train.precision="))
    want.append(f"precision {precision}")
    if "dist.backend=nccl" in check.argv:
        want.append("backend nccl")
    missing = [w for w in want if w not in start]
    if missing:
        return f"start line lacks {', '.join(missing)}: {start!r}"
    if not figures["losses"] or not all(math.isfinite(x) for x in figures["losses"]):
        return "no finite training loss logged"
    if figures["val_accuracy"] is None or figures["test_accuracy"] is None:
        return "no validation or test pass recorded"
    if precision == "fp16" and not figures.get("grad_scaler_scale"):
        return "no GradScaler scale in last.pt"
    return ""


def bench_figures(check: Check) -> dict:
    return json.loads(check.json_out.read_text()) if check.json_out.is_file() else {}


def bench_verdict(figures: dict) -> str:
    if not figures:
        return "no bench report written"
    recompiles = (figures.get("compiled") or {}).get("recompiles", 0)
    return f"recompiled {recompiles} times (static shapes should compile once)" if recompiles else ""


# ---------------------------------------------------------------- running
def run_check(check: Check, timeout_s: float, env: dict) -> str:
    """Run one check's command in its own process group (killed whole on timeout); returns its output."""
    proc = subprocess.Popen(check.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        check.status, check.reason = "fail", f"timed out after {timeout_s:.0f} s"
        return out
    if proc.returncode != 0:
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["(no output)"]
        check.status, check.reason = "fail", f"exit {proc.returncode}: {last[0][:300]}"
    return out


def compare_compiled(checks: list[Check]) -> None:
    """train_compiled against the eager bf16 run: the same steps from the same seed and data."""
    by = {c.name: c for c in checks}
    eager, comp = by.get("train_bf16_nccl1"), by.get("train_compiled")
    if not (eager and comp and eager.status == comp.status == "pass"):
        return
    a, b = eager.figures["losses"], comp.figures["losses"]
    worst = max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b))
    comp.figures["max_relative_loss_difference_vs_eager"] = worst
    if worst > 0.05:  # bf16 autocast: fused kernels round differently; a real divergence is far larger
        comp.status, comp.reason = "fail", f"losses differ from eager by up to {worst:.1%} (> 5 %)"


def targets(checks: list[Check]) -> list[dict]:
    by = {c.name: c for c in checks}
    out = []
    for label, name, row, key, goal in TARGETS:
        c = by.get(name)
        value = None
        if c and c.figures:
            if row:
                value = next((r[key] for r in c.figures.get("rows", []) if r["row"].startswith(f"({row})")), None)
            else:
                value = c.figures.get(key)
        met = None if value is None else (value <= goal if key == "input_share_of_step" else value >= goal)
        out.append({"target": label, "check": name, "measured": value, "met": met})
    return out


def write_outputs(out: Path, report: dict, checks: list[Check], logs: dict) -> None:
    from emotion_dist.utils.fsutil import atomic_write_json, atomic_write_text

    report["checks"] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()} for c in checks]
    report["targets"] = targets(checks)
    atomic_write_json(out / "gpu_acceptance.json", report)
    atomic_write_text(out / "gpu_acceptance.md", markdown(report, checks))
    atomic_write_text(out / "gpu_acceptance_logs.txt",
                      "".join(f"===== {name}\n{text}\n" for name, text in logs.items()))


def _n(v, spec=",.0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict, checks: list[Check]) -> str:
    env = report.get("env", {})
    gpus = env.get("gpus") or ["?"]
    lines = [f"### GPU acceptance: {gpus[0]} x {len(gpus)}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"{report['started']} ({'quick' if report['quick'] else 'full'}, {report['wall_s']:.0f} s)", "",
             f"`{report['command']}`", "", "| check | status | figures |", "|---|---|---|"]
    for c in checks:
        f = c.figures
        if c.kind == "train" and f:
            figs = (f"{_n(f.get('median_img_per_s'))} img/s (median step); val acc {_n(f.get('val_accuracy'), '.3f')}; "
                    f"test acc {_n(f.get('test_accuracy'), '.3f')}; bad steps {f.get('bad_steps')}"
                    + (f"; GradScaler scale {f['grad_scaler_scale']:g}" if f.get("grad_scaler_scale") else "")
                    + (f"; loss vs eager {f['max_relative_loss_difference_vs_eager']:.2%}"
                       if "max_relative_loss_difference_vs_eager" in f else ""))
        elif c.kind == "bench" and f:
            e = next((r for r in f["rows"] if r["row"].startswith("(e)")), None) or f["rows"][-1]
            figs = (f"{e['row']}: {_n(e['img_per_s'])} img/s, MFU {_n(e.get('mfu'), '.1%')}; first step "
                    f"{f['first_step_s']:.1f} s; compiled graphs {(f.get('compiled') or {}).get('graphs', '-')}")
        elif c.kind == "env" and f:
            figs = (f"torch {f['torch']}, CUDA {f['cuda']}, NCCL {f['nccl']}, ultralytics {f['ultralytics']}, "
                    f"bf16 {f['bf16_supported']}")
        else:
            figs = ""
        status = c.status + (f": {c.reason}" if c.reason else "")
        lines.append(f"| {c.name}: {c.what} | {status} | {figs} |")
    lines += ["", "| bench | row | img/s | MFU | peak GPU MB | first step s | warm-up s | input share |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in checks:
        if c.kind != "bench" or not c.figures:
            continue
        f = c.figures
        for r in f["rows"]:
            lines.append(f"| {c.name} | {r['row']} | {_n(r['img_per_s'])} | {_n(r.get('mfu'), '.1%')} | "
                         f"{_n(r.get('peak_gpu_mb'))} | {_n(r.get('first_step_s'), '.2f')} | "
                         f"{_n(r.get('warmup_s'), '.2f')} | "
                         f"{_n(f.get('input_share_of_step') if r['row'].startswith('(e)') else None, '.1%')} |")
    lines += ["", "| target | measured | met? |", "|---|---:|---|"]
    for t in report["targets"]:
        v = t["measured"]
        shown = "-" if v is None else (f"{v:.1%}" if "share" in t["target"] or "%" in t["target"] else f"{v:,.0f}")
        lines.append(f"| {t['target']} | {shown} | {'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the dry run
def check_arguments(check: Check) -> str:
    """Empty when the command's arguments pass the CLI's parser and the config's validation."""
    from emotion_dist.cli import build_parser
    from emotion_dist.config import load_config
    from emotion_dist.errors import ConfigError

    argv = check.argv
    try:
        if "emotion_dist.cli" in argv:
            args = build_parser().parse_args(argv[argv.index("emotion_dist.cli") + 1:])
            if args.command == "bench":
                load_config(args.config, args.overrides)
        elif "launch/train.py" in argv:
            load_config(None, argv[argv.index("launch/train.py") + 1:])
    except SystemExit as e:
        return f"the CLI refuses it (exit {e.code})"
    except ConfigError as e:
        return str(e)
    return ""


def dry_run(checks: list[Check], why: str, quick: bool, budget: float) -> int:
    print(f"gpu_acceptance: {why}; on a CUDA machine it would run {len(checks)} checks "
          f"({'quick' if quick else 'full'}, budget {budget:.0f} s, estimates for one H100):")
    bad = 0
    for i, c in enumerate(checks, 1):
        problem = check_arguments(c)
        bad += bool(problem)
        print(f"{i:3d}. {c.name}  ~{c.estimate_s:.0f} s  {c.what}"
              + (f"  [needs {c.min_gpus} GPUs]" if c.min_gpus > 1 else ""))
        print("       " + (" ".join(a.replace(sys.executable, "python") for a in c.argv) or "(in this process)"))
        if problem:
            print(f"       REFUSED: {problem}")
    print(f"arguments of every command checked against the CLI and the config: "
          f"{'all accepted' if not bad else f'{bad} refused'}")
    return 1 if bad else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="scripts/gpu_acceptance.sh")
    p.add_argument("--quick", action="store_true", help="the essential checks only (~5 minutes on one H100)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-acceptance",
                   help="where the JSON, markdown and logs go (default: $OUT, else runs/gpu-acceptance)")
    p.add_argument("--work", default="/tmp/emotion-dist-gpu-acceptance", help="data, cache and run folders")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting checks after this long "
                   "(default 300 with --quick, else 540: a device call is limited to 600 s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per bench row (default 30)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated check names (env and data always run)")
    p.add_argument("--dry-run", action="store_true", help="list the checks and check their arguments; run nothing")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run the same plan at toy sizes on the CPU, to test this script without a GPU")
    args = p.parse_args(argv)
    budget = args.budget_s or (300.0 if args.quick else 540.0)
    work = Path(args.work)
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpus = torch.cuda.device_count() if cuda else 1
        why = f"no CUDA device visible (torch {torch.__version__})"
    except ImportError:
        cuda, gpus, why = False, 1, "torch is not importable by this Python"
    checks = build_plan(work, args.quick, 3 if args.cpu_rehearsal else args.steps, args.cpu_rehearsal)
    if args.only:
        names = {"env", "data", *args.only.split(",")}
        unknown = names - {c.name for c in checks}
        if unknown:
            p.error(f"--only: no check named {', '.join(sorted(unknown))}")
        checks = [c for c in checks if c.name in names]
    if args.cpu_rehearsal:
        cuda, gpus = True, 2  # the plan's commands run on the CPU at toy sizes
    if args.dry_run or not cuda:
        return dry_run(checks, "--dry-run" if args.dry_run else why, args.quick, budget)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + budget
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                 "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1", "WANDB_MODE": "disabled"}
    report = {"emotion_dist": "gpu_acceptance", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": "scripts/gpu_acceptance.sh " + " ".join(sys.argv[1:] if argv is None else argv),
              "quick": args.quick, "budget_s": budget, "host": platform.node(), "wall_s": 0.0}
    logs: dict[str, str] = {}
    for c in checks:
        left = deadline - time.time()
        if c.min_gpus > gpus:
            c.status, c.reason = "skipped", f"needs {c.min_gpus} GPUs, {gpus} visible"
            continue
        if c.estimate_s > left:
            c.status, c.reason = "skipped", f"budget: ~{c.estimate_s:.0f} s needed, {max(left, 0):.0f} s left"
            continue
        t = time.time()
        print(f"[{t - started:6.0f} s] {c.name}: {c.what}", flush=True)
        try:
            if c.kind == "env":
                c.figures = report["env"] = env_figures()
                if c.figures["ultralytics"] is None:
                    c.status, c.reason = ("fail",
                                          "ultralytics is not importable: carry its wheel (scripts/gpu_wheels.sh)")
            else:
                logs[c.name] = run_check(c, max(left - 5, 1), child_env)[-6000:]
                if c.kind == "train":
                    c.figures = train_figures(c, logs[c.name])
                    c.reason = c.reason or train_verdict(c, c.figures)
                elif c.kind == "bench":
                    c.figures = bench_figures(c)
                    c.reason = c.reason or bench_verdict(c.figures)
        except Exception as e:  # a check that cannot be read is a failed check, not a lost report
            c.status, c.reason = "fail", f"{type(e).__name__}: {e}"[:300]
        c.seconds = round(time.time() - t, 1)
        c.status = "fail" if c.reason else "pass"
        print(f"          {c.status} in {c.seconds:.0f} s {c.reason}", flush=True)
        compare_compiled(checks)
        report["wall_s"] = time.time() - started
        write_outputs(out, report, checks, logs)
        if c.name in ("env", "data") and c.status == "fail":
            for rest in checks[checks.index(c) + 1:]:
                rest.status, rest.reason = "skipped", f"{c.name} failed"
            break
    report["wall_s"] = time.time() - started
    write_outputs(out, report, checks, logs)
    print((out / "gpu_acceptance.md").read_text())
    return 0 if all(c.status != "fail" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
