"""Train a recipe on recipe sets and record test accuracy, macro-F1 and time.

    python tools/recipe/recipe_eval.py --label baseline --sets dev-101 -- train.epochs=20
    python tools/recipe/recipe_eval.py --table                      # the results so far, as markdown

Each (label, set) trains `launch/train.py --config CONFIG data.source=folder data.root=SET` under
`nice -n 10` with OMP_NUM_THREADS unset (training uses every core), a fresh decode cache (so the
time includes decoding, not drawing: `recipe_sets.py` draws once) and `run.resume=never`, then reads
the final test pass (best.pt on the test split) from metrics.jsonl. One JSON line per run goes to
--results: accuracy, macro-F1, wall seconds, the CPU seconds the run used (user + sys of the child,
which contention on a shared machine does not inflate much), the 1-minute load average before and
after, and the exact command.

Not imported by the package: a tool of the recipe's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recipe_sets import BY_NAME, write_set  # noqa: E402  (same folder)

from emotion_dist.utils.fsutil import atomic_write_text  # noqa: E402


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def child_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "configs", "emotion_dist"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def read_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("type") == "epoch"]
    test = [r for r in rows if r.get("type") == "test"]
    if not test:
        raise RuntimeError(f"no test record in {run_dir / 'metrics.jsonl'}")
    best = max(epochs, key=lambda r: r["val_macro_f1"])  # the first best, as the trainer keeps it
    times = sorted(r["time_s"] for r in epochs)
    return {"accuracy": test[-1]["accuracy"], "macro_f1": test[-1]["macro_f1"], "epochs": len(epochs),
            "best_epoch": best["epoch"], "best_val_macro_f1": best["val_macro_f1"],
            "epoch_s_median": times[len(times) // 2]}


def evaluate(run_dir: Path, name: str, tta: bool, env: dict, *extra: str) -> dict:
    """`emotion-dist evaluate` on best.pt (flip TTA or not); its JSON report."""
    report = run_dir / f"{name}{'_tta' if tta else ''}.json"
    cmd = ["nice", "-n", "10", sys.executable, "-m", "emotion_dist.cli", "evaluate", "--checkpoint",
           str(run_dir / "checkpoints" / "best.pt"), "--json-out", str(report), "--out", str(run_dir),
           *(["--tta", "flip"] if tta else []), *extra]
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(report.read_text())


def evaluate_best(run_dir: Path, env: dict) -> dict:
    """best.pt on the test split again through `emotion-dist evaluate`, without and with flip TTA:
    per-class F1 (the rare class) and what TTA would add, from the same checkpoint."""
    out = {}
    for tta in (False, True):
        r = evaluate(run_dir, "test", tta, env)
        key = "tta_" if tta else ""
        out[f"{key}eval_accuracy"], out[f"{key}eval_macro_f1"] = r["accuracy"], r["macro_f1"]
        out[f"{key}per_class_f1"] = {c: round(m["f1"], 4) for c, m in r["per_class"].items()}
    return out


PROBE = "dev-probe-103"


def reweighted(cm: list[list[int]], prior: list[float]) -> dict:
    """Accuracy and macro-F1 that a test split drawn with class proportions `prior` would show, from
    a confusion matrix measured on a class-balanced one: each true-class row is rescaled to its share."""
    rows = [[v * p / max(sum(r), 1) for v in r] for r, p in zip(cm, prior)]
    k = len(rows)
    f1 = []
    for c in range(k):
        tp, pred, true = rows[c][c], sum(rows[i][c] for i in range(k)), sum(rows[c])
        f1.append(2 * tp / (pred + true) if pred + true else 0.0)
    return {"accuracy": sum(rows[c][c] for c in range(k)), "macro_f1": sum(f1) / k,
            "f1": [round(x, 4) for x in f1]}


def probe_best(run_dir: Path, args, env: dict) -> dict:
    """best.pt on the probe set (300 test faces per class): the rare class measured on 300 images,
    and accuracy / macro-F1 reweighted to the FER proportions of the 1,000-image test splits."""
    from emotion_dist.data.readers.synthetic import CLASSES, FER_COUNTS

    data = write_set(BY_NAME[PROBE], Path(args.sets_dir))
    prior = [c / sum(FER_COUNTS) for c in FER_COUNTS]
    out = {}
    for tta in (False, True):
        r = evaluate(run_dir, "probe", tta, env, f"data.root={data}",
                     f"run.cache_dir={Path(args.work) / 'probe-cache'}")
        assert list(r["per_class"]) == CLASSES
        w = reweighted(r["confusion_matrix"], prior)
        key = "probe_tta_" if tta else "probe_"
        out[f"{key}disgust_recall"] = round(r["per_class"]["disgust"]["recall"], 4)
        out[f"{key}angry_as_disgust"] = r["confusion_matrix"][0][1] / max(sum(r["confusion_matrix"][0]), 1)
        out[f"{key}fer_accuracy"], out[f"{key}fer_macro_f1"] = round(w["accuracy"], 4), round(w["macro_f1"], 4)
        out[f"{key}fer_f1"] = dict(zip(CLASSES, w["f1"]))
    return out


def run_one(label: str, set_name: str, args, overrides: list[str]) -> dict:
    data = write_set(BY_NAME[set_name], Path(args.sets_dir))
    run_dir = Path(args.work) / label / set_name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # ours: everything under --work is written by this script's runs
    cmd = ["nice", "-n", "10", sys.executable, str(ROOT / "launch" / "train.py"), "--config", args.config,
           "data.source=folder", f"data.root={data}", f"run.dir={run_dir}", f"run.cache_dir={run_dir / 'cache'}",
           "run.resume=never", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    if args.threads:  # accuracy-only runs on a crowded machine: one thread thrashes less than two
        env["OMP_NUM_THREADS"] = str(args.threads)
    before_load, before_cpu, start = load1(), child_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu, after_load = child_cpu_s() - before_cpu, load1()
    (Path(args.work) / label).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.work) / label / f"{set_name}.log", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: {label} on {set_name} exited {proc.returncode}; "
                         f"see {args.work}/{label}/{set_name}.log")
    row = {"label": label, "what": args.what, "set": set_name, "role": BY_NAME[set_name].role, **read_metrics(run_dir),
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load1_start": before_load, "load1_end": after_load,
           "threads": args.threads or "unset", "overrides": overrides,
           "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": shlex.join(cmd)}
    if not args.no_extras:
        row.update(evaluate_best(run_dir, env))
        if BY_NAME[set_name].role == "dev":
            row.update(probe_best(run_dir, args, env))
    if not args.keep:
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return row


def probe_checkpoint(args, checkpoint: str) -> dict:
    """The probe figures for a kept checkpoint (a run made before the probe existed)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.work) as d:
        run_dir = Path(d)
        (run_dir / "checkpoints").mkdir()
        os.symlink(Path(checkpoint).resolve(), run_dir / "checkpoints" / "best.pt")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = str(ROOT)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        return probe_best(run_dir, args, env)


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    by_label: dict[str, dict] = defaultdict(dict)
    for r in rows:
        by_label[r["label"]][r["set"]] = r  # the latest run of a (label, set) wins
    out = ["| recipe | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for label, cells in by_label.items():
        out.append(f"| {label} | " + " | ".join(
            f"{c['accuracy']:.4f} / {c['macro_f1']:.4f} ({c['wall_s']:.0f} s, "
            f"{c['cpu_s']:.0f} cpu-s, load {c['load1_start']:.1f})"
            if (c := cells.get(s)) else "" for s in sets) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", help="short name of this recipe variant (a row of the table; a folder name)")
    p.add_argument("--what", default="", help="what the variant changes, in words")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the run (default: unset)")
    p.add_argument("--sets", nargs="+", default=["dev-101"], help=f"sets to train on: {', '.join(BY_NAME)}")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--sets-dir", default="/tmp/recipe/sets")
    p.add_argument("--work", default="/tmp/recipe/runs")
    p.add_argument("--results", default=str(Path(__file__).with_name("runs.jsonl")))
    p.add_argument("--keep", action="store_true", help="keep checkpoints and the decode cache")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the evaluate passes after training (flip TTA, probe set)")
    p.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    p.add_argument("--probe", metavar="CHECKPOINT", help="print the probe figures of a kept best.pt and exit")
    args, overrides = p.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    results = Path(args.results)
    if args.table:
        print(table(results))
        return 0
    if args.probe:
        print(json.dumps(probe_checkpoint(args, args.probe)))
        return 0
    if not args.label:
        p.error("--label is required to run")
    for name in args.sets:
        if name not in BY_NAME:
            p.error(f"unknown set {name}; choose from {', '.join(BY_NAME)}")
    for name in args.sets:
        row = run_one(args.label, name, args, overrides)
        with open(results, "a") as f:  # one line per finished run; a killed run leaves no line
            f.write(json.dumps(row) + "\n")
        print(f"{args.label} on {name}: accuracy {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
              f"best epoch {row['best_epoch']}/{row['epochs']} {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} cpu-s, "
              f"load {row['load1_start']:.2f} -> {row['load1_end']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
