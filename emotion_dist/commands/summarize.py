"""`emotion-dist summarize RUN_DIR... [--json]`: the figure a paper should quote, mean ± std of the
test accuracy and macro-F1 over several runs (seeds) of one recipe.

Each argument is a run directory (its metrics.jsonl's last "test" record: best.pt on the test split,
written at the end of training) or an `emotion-dist evaluate --json` report file. std is the sample
standard deviation (n - 1); with one run there is none. Runs measured on different splits, TTA or
image counts are not one figure and are refused.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from emotion_dist.errors import ConfigError
from emotion_dist.utils.output import MARKER, check_json_out, emit, text_stream

METRICS = ("accuracy", "macro_f1")


# keys that say where and how a run was kept, not what it trained: runs differing only in these are one recipe
NOT_RECIPE = ("run.", "log.", "ckpt.", "train.seed", "data.num_workers", "data.prepare_scope", "data.prepare_timeout_s",
              "dist.timeout_s", "train.max_bad_steps", "data.cache_size")


def _settings(run_dir: Path) -> Optional[dict]:
    """A run directory's config.yaml as flat dotted keys, or None when it has none that reads."""
    import yaml

    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(tree, dict):
        return None
    return {f"{sec}.{k}": v for sec, keys in tree.items() if isinstance(keys, dict) for k, v in keys.items()}


def setting_warnings(runs: list[dict]) -> list[str]:
    """What makes a mean over these runs not one recipe's: settings other than the seed that differ
    (train.epochs 12 and 2, say), and seeds that repeat."""
    known = [r for r in runs if r.get("settings") is not None]
    warnings = []
    keys = sorted({k for r in known for k in r["settings"]})
    differ = []
    for k in keys:
        if k.startswith(NOT_RECIPE):
            continue
        values = {repr(r["settings"].get(k)) for r in known}
        if len(values) > 1:
            differ.append(f"{k} ({', '.join(sorted(values))})")
    if differ:
        warnings.append(f"the runs differ in more than the seed: {'; '.join(differ[:6])}"
                        f"{f' and {len(differ) - 6} more' if len(differ) > 6 else ''}; their mean mixes recipes")
    seeds = [r["seed"] for r in runs if r.get("seed") is not None]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        warnings.append(f"seed {', '.join(map(str, repeated))} appears more than once: those runs are not "
                        f"independent samples")
    return warnings


def load_result(path: str | Path) -> dict:
    """One run's test figures: {"run", "seed", "split", "tta", "count", "accuracy", "macro_f1", "source"}."""
    p = Path(path)
    if p.is_dir():
        metrics = p / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(f"{p} has no metrics.jsonl; pass a run directory (run.dir) or an evaluate --json report")
        record = None
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(r, dict) and r.get("type") == "test":
                record = r
        if record is None:
            raise ConfigError(f"{metrics} has no test record (the run did not finish, or train.eval_test=false); "
                              f"run emotion-dist evaluate --checkpoint {p}/checkpoints/best.pt "
                              "--json-out FILE and pass "
                              f"FILE")
        settings = _settings(p)
        source, seed = "metrics.jsonl", (settings or {}).get("train.seed")
    elif p.is_file():
        try:
            record = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{p} is not JSON; "
                              "pass a run directory or an emotion-dist evaluate --json report") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), (int, float)) for k in METRICS):
            raise ConfigError(f"{p} has no accuracy and macro_f1; pass an emotion-dist evaluate --json report")
        source, seed, settings = "evaluate report", record.get("seed"), None
    else:
        raise ConfigError(f"{p} does not exist; pass run directories or evaluate --json reports")
    return {"run": str(p), "seed": seed, "split": record.get("split", "test"), "tta": record.get("tta") or "none",
            "count": record.get("count"), **{k: float(record[k]) for k in METRICS}, "source": source,
            "settings": settings}


def mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std}


def summarize_runs(paths: list[str | Path]) -> dict:
    runs = [load_result(p) for p in paths]
    for key in ("split", "tta", "count"):
        seen = sorted({str(r[key]) for r in runs})
        if len(seen) > 1:
            raise ConfigError(f"the runs differ in {key} ({', '.join(seen)}): mean ± std needs one protocol; "
                              f"summarize runs of the same recipe and evaluation")
    warnings = setting_warnings(runs)
    for r in runs:
        r.pop("settings", None)
    return {"n": len(runs), "split": runs[0]["split"], "tta": runs[0]["tta"], "count": runs[0]["count"],
            **{k: mean_std([r[k] for r in runs]) for k in METRICS}, "runs": runs, "warnings": warnings}


def _pm(m: dict) -> str:
    std = "n/a" if m["std"] is None else f"{100 * m['std']:.2f}"
    return f"{100 * m['mean']:.2f} ± {std}"


def print_summary(s: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{s['split']} split, {s['count']} images, TTA {s['tta']}: {s['n']} runs (mean ± sample std)")
    for col in ("run", "seed", "accuracy %", "macro-F1 %"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in s["runs"]:
        t.add_row(r["run"], "-" if r["seed"] is None else str(r["seed"]),
                  f"{100 * r['accuracy']:.2f}", f"{100 * r['macro_f1']:.2f}")
    t.add_row("mean ± std", "", _pm(s["accuracy"]), _pm(s["macro_f1"]), style="bold")
    Console(file=file or sys.stdout, width=120).print(t)


SWEEP_FILE = "sweep.json"  # what `emotion-dist sweep` writes in its sweep folder


def is_sweep(path: Path) -> bool:
    try:
        return json.loads((Path(path) / SWEEP_FILE).read_text()).get(MARKER) == "sweep"
    except (OSError, ValueError, AttributeError):
        return False


def summarize_sweep(folder: Path, metric: str = "macro_f1") -> dict:
    """One row per point of the grid (its seeds averaged), best first by `metric`'s mean; points
    with no finished seed yet are listed as pending."""
    spec = json.loads((Path(folder) / SWEEP_FILE).read_text())
    groups: dict[str, list[dict]] = {}
    for p in spec["points"]:
        groups.setdefault(p["group"], []).append(p)
    for trial in sorted(Path(folder).glob("trial-*")) if spec.get("search") else []:  # --search optuna
        settings = _settings(trial) or {}
        group = f"{trial.name}: " + " ".join(f"{k}={settings.get(k)}" for k in spec["search"])
        groups[group] = [{"run_dir": str(trial), "overrides": [f"{k}={settings.get(k)}" for k in spec["search"]]}]
    rows, pending = [], []
    for group, points in groups.items():
        runs = []
        for p in points:
            try:
                runs.append(load_result(p["run_dir"]))
            except ConfigError:  # not finished yet (or never started)
                continue
        if not runs:
            pending.append(group)
            continue
        rows.append({"point": group, "overrides": points[0]["overrides"], "n": len(runs), "of": len(points),
                     "seeds": [r["seed"] for r in runs], **{k: mean_std([r[k] for r in runs]) for k in METRICS},
                     "values": [r[metric] for r in runs], "runs": [r["run"] for r in runs]})
    rows.sort(key=lambda r: -r[metric]["mean"])
    return {"sweep": spec.get("name"), "folder": str(folder), "metric": metric, "points": rows, "pending": pending}


def print_sweep(s: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sweep {s['sweep']} ({s['folder']}): test figures, mean ± sample std over seeds, best "
                    f"{s['metric']} first")
    for col in ("#", "point", "seeds", "accuracy %", "macro-F1 %"):
        t.add_column(col, justify="left" if col == "point" else "right")
    for i, r in enumerate(s["points"], 1):
        t.add_row(str(i), r["point"], f"{r['n']}/{r['of']}", _pm(r["accuracy"]), _pm(r["macro_f1"]))
    Console(file=file or sys.stdout, width=140).print(t)
    if s["pending"]:
        print(f"{len(s['pending'])} point(s) with no finished seed yet: {'; '.join(s['pending'][:5])}",
              file=file or sys.stdout)
    if s.get("plot"):
        print(f"plot: {s['plot']}", file=file or sys.stdout)


def plot_sweep(s: dict, path: Path) -> None:
    """The points as horizontal bars, best on top: the metric's mean over seeds, ± its std, each
    seed's figure as a dot (the sweep folder is emotion-dist's own: the PNG goes there)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emotion_dist.utils.fsutil import atomic_write_bytes

    key, rows = s["metric"], list(reversed(s["points"]))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(len(rows), 1)), dpi=100)
    try:
        means = [100 * r[key]["mean"] for r in rows]
        stds = [100 * (r[key]["std"] or 0.0) for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color="#4c72b0", alpha=0.8, capsize=3)
        for i, r in enumerate(rows):
            ax.plot([100 * v for v in r.get("values", [])], [i] * len(r.get("values", [])), "k.", markersize=4)
        ax.set_yticks(range(len(rows)), [r["point"] for r in rows], fontsize=8)
        ax.set_xlabel(f"test {key.replace('_', '-')} % (mean ± std over seeds)")
        ax.set_title(f"sweep {s['sweep']}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def run_summarize(args) -> int:
    check_json_out(args, inputs=[Path(r) for r in args.runs])
    if len(args.runs) == 1 and is_sweep(Path(args.runs[0])):
        s = summarize_sweep(Path(args.runs[0]), getattr(args, "metric", "macro_f1"))
        if s["points"]:
            s["plot"] = str(Path(args.runs[0]) / "summary.png")
            plot_sweep(s, Path(s["plot"]))
        print_sweep(s, text_stream(args))
        emit(args, {MARKER: "summarize", **s})
        return 0
    s = summarize_runs(args.runs)
    print_summary(s, text_stream(args))
    for w in s["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    emit(args, {MARKER: "summarize", **s})
    return 0
