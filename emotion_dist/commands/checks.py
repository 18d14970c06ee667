"""`emotion-dist checks`: what this machine offers a run, as `yolo checks` or `accelerate env` report
it: package versions, CUDA and NCCL, the GPUs, Slurm, the launcher environment this process sees,
and the free space where the config caches data and writes its run. Then what the config needs
that is missing (train.device=cuda with no GPU, a tracker without its package, ...): each a
problem line, and exit code 2 when there is any, so a job script can stop before it queues."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

from emotion_dist import __version__
from emotion_dist.utils.output import MARKER, emit, text_stream

# distribution names (what pip knows them as), in the order the report lists them
PACKAGES = ("torch", "torchvision", "ultralytics", "numpy", "opencv-python", "onnx", "onnxruntime", "safetensors",
            "accelerate", "wandb", "tensorboard", "kagglehub", "huggingface_hub", "optuna")
LOW_SPACE_BYTES = 1 << 30  # under 1 GiB free where the cache or the run goes: a warning


def package_versions() -> dict[str, str | None]:
    """Installed version of each package, None when it is not installed (read from the metadata:
    nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cuda_report() -> dict:
    """What torch sees: its CUDA build, the GPUs (name, memory, capability), NCCL."""
    import torch
    import torch.distributed as dist

    report = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(),
              "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": [],
              "nccl_available": dist.is_available() and dist.is_nccl_available(), "nccl_version": None,
              "gloo_available": dist.is_available() and dist.is_gloo_available()}
    if report["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                   "capability": f"{p.major}.{p.minor}"})
        try:
            v = torch.cuda.nccl.version()
            report["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # a CPU build, or NCCL absent from this one
            report["nccl_version"] = None
    return report


def slurm_report(environ=None) -> dict:
    environ = os.environ if environ is None else environ
    return {"commands": {c: shutil.which(c) for c in ("sinfo", "srun", "sbatch", "scontrol")},
            "env": {k: v for k, v in sorted(environ.items()) if k.startswith("SLURM_")}}


def launch_report(environ=None) -> dict:
    """The launcher this process would train under (process_group.detect_launch), or the error."""
    from emotion_dist.distributed import process_group
    from emotion_dist.errors import UserError

    try:
        info = process_group.detect_launch(environ)
    except UserError as e:
        return {"error": str(e)}
    seen = {k: v for k, v in sorted((os.environ if environ is None else environ).items())
            if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
            or k.startswith("ACCELERATE_")}
    return {"launcher": info.launcher, "rank": info.rank, "world_size": info.world_size,
            "local_rank": info.local_rank, "env": seen}


def free_space(path: str) -> dict:
    """Free space on the filesystem `path` is (or would be) on: its nearest existing folder."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    return {"path": str(path), "on": str(p), "free_gib": round(usage.free / 2**30, 2),
            "total_gib": round(usage.total / 2**30, 2), "low": usage.free < LOW_SPACE_BYTES}


def problems(cfg, report: dict) -> list[str]:
    """What the config needs that this machine lacks, one line each naming the fix."""
    out = []
    cuda, versions = report["cuda"], report["versions"]
    if cfg.train.device == "cuda" and not cuda["gpus"]:
        out.append("train.device=cuda but no CUDA device is visible; use train.device=cpu (or auto), or run on a "
                   "GPU node")
    if cfg.dist.backend == "nccl" and not (cuda["gpus"] and cuda["nccl_available"]):
        out.append("dist.backend=nccl needs CUDA GPUs and NCCL; use dist.backend=auto (gloo on CPU)")
    if cfg.log.wandb != "off" and versions["wandb"] is None:
        out.append(f"log.wandb={cfg.log.wandb} needs the wandb package; pip install 'emotion-dist[all]' or use "
                   f"log.wandb=off")
    if cfg.log.tensorboard and versions["tensorboard"] is None:
        out.append("log.tensorboard=true needs the tensorboard package; pip install 'emotion-dist[tensorboard]'")
    if cfg.data.source == "kaggle" and versions["kagglehub"] is None:
        out.append("data.source=kaggle needs the kagglehub package; pip install 'emotion-dist[all]'")
    if cfg.data.root and cfg.data.source != "synthetic" and not Path(cfg.data.root).exists():
        out.append(f"data.root={cfg.data.root} does not exist; point data.root at the data set")
    if "error" in report["launch"]:
        out.append(report["launch"]["error"])
    return out


def gather(cfg) -> dict:
    """The whole report for this config (no problem lines yet)."""
    return {"emotion_dist_version": __version__, "python": sys.version.split()[0],
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}",  # no `uname -p` process
            "executable": sys.executable, "cpus": os.cpu_count(), "versions": package_versions(),
            "cuda": cuda_report(), "slurm": slurm_report(), "launch": launch_report(),
            "space": {"run.cache_dir": free_space(cfg.run.cache_dir),
                      "run.dir": free_space(cfg.run.dir or f"runs/{cfg.run.name}")}}


def format_report(report: dict) -> str:
    cuda, slurm, launch = report["cuda"], report["slurm"], report["launch"]
    lines = [f"emotion-dist {report['emotion_dist_version']}  python {report['python']}  ({report['platform']}, "
             f"{report['cpus']} CPUs)"]

    def row(label: str, text: str) -> None:
        lines.append(f"{label + ':':<15}{text}")

    row("packages", "" + "  ".join(f"{k} {v or '-'}" for k, v in report["versions"].items()))
    gpus = ", ".join(f"{g['index']}: {g['name']} {g['memory_gib']} GiB (sm {g['capability']})" for g in cuda["gpus"])
    row("CUDA", f"torch built with {cuda['torch_cuda'] or 'no CUDA'}; "
                 f"{len(cuda['gpus'])} GPU(s) visible{': ' + gpus if gpus else ''}"
                 " (CUDA_VISIBLE_DEVICES="
                 f"{cuda['CUDA_VISIBLE_DEVICES'] if cuda['CUDA_VISIBLE_DEVICES'] is not None else 'unset'})")
    row("NCCL", f"{'available' if cuda['nccl_available'] else 'not available'}"
                 f"{' ' + cuda['nccl_version'] if cuda['nccl_version'] else ''}; gloo "
                 f"{'available' if cuda['gloo_available'] else 'not available'}")
    found = [c for c, where in slurm["commands"].items() if where]
    row("Slurm", f"commands on PATH: {', '.join(found) or 'none'}; "
                 f"{len(slurm['env'])} SLURM_* variable(s)"
                 f"{' (job ' + slurm['env']['SLURM_JOB_ID'] + ')' if 'SLURM_JOB_ID' in slurm['env'] else ''}")
    if "error" in launch:
        row("launcher", f"cannot tell: {launch['error']}")
    else:
        row("launcher", f"{launch['launcher']} (rank {launch['rank']} of {launch['world_size']}, local rank "
                     f"{launch['local_rank']})"
                     f"{'; ' + ' '.join(f'{k}={v}' for k, v in launch['env'].items()) if launch['env'] else ''}")
    for key, s in report["space"].items():
        low = "  (low)" if s["low"] else ""
        row(key, f"{s['path']}: {s['free_gib']} GiB free of {s['total_gib']} GiB{low}")
    for p in report["problems"]:
        row("problem", f"{p}")
    lines.append("ok: nothing the config needs is missing" if not report["problems"] else
                 f"{len(report['problems'])} problem(s): fix them before training with this config")
    return "\n".join(lines) + "\n"


def run_checks(args) -> int:
    from emotion_dist.config import load_config

    cfg, _ = load_config(args.config, args.overrides)
    report = gather(cfg)
    report["problems"] = problems(cfg, report)
    text_stream(args).write(format_report(report))
    emit(args, {MARKER: "checks", **report})
    return 2 if report["problems"] else 0
