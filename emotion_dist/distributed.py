"""Launch environment, process group and the collectives the trainer needs.

One code path for every launcher: torchrun and `accelerate launch` (RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_*), Slurm `srun` without torchrun (SLURM_PROCID/...; master = first host of the job), and
plain `python` (world size 1). A process group always exists, even for one process, so the
trainer has no single-process special cases.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import Config, ConfigError


@dataclass
class LaunchInfo:
    launcher: str  # python | torchrun | accelerate | slurm
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[(\d+)[^\]]*\])?", nodelist)  # "node[03-05,9],x" -> node03
    return m.group(1) + (m.group(2) or "") if m else "127.0.0.1"


def _int_env(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer; fix the launch script") from None


def detect_launch(env: dict | None = None) -> LaunchInfo:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        if "SLURM_JOB_ID" in env and launcher == "torchrun" and "TORCHELASTIC_RUN_ID" not in env:
            launcher = "slurm"
        info = LaunchInfo(
            launcher,
            _int_env(env, "RANK"),
            _int_env(env, "WORLD_SIZE"),
            _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside srun, no torchrun
        job = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        info = LaunchInfo(
            "slurm",
            _int_env(env, "SLURM_PROCID"),
            _int_env(env, "SLURM_STEP_NUM_TASKS"),
            _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))),
            _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000,
        )
    else:
        info = LaunchInfo("python", 0, 1, 0, "127.0.0.1", 0)
    if not (0 <= info.rank < info.world_size):
        raise ConfigError(f"rank {info.rank} is outside world size {info.world_size}; fix the launcher's environment")
    return info


@dataclass
class DistEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                f"launch at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_launch(cfg: Config, info: LaunchInfo) -> None:
    """Launch-dependent config checks, before the process group starts."""
    if cfg.dist.strategy == "fsdp" and info.world_size < 2:
        raise ConfigError("dist.strategy=fsdp needs at least 2 processes; launch with torchrun or use dist.strategy=ddp")


def init_distributed(cfg: Config, info: LaunchInfo) -> DistEnv:
    device = select_device(cfg, info.local_rank)
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    if not dist.is_initialized():
        if info.launcher == "python":
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            kw = {"device_id": device} if backend == "nccl" else {}
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's restarted workers talk to the same agent store as the failed attempt;
                # without a per-attempt prefix they can read the dead peers' addresses (gloo:
                # "connectFullMesh failed ... Connection refused")
                client = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                                       timeout=timeout)
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                kw["store"] = dist.PrefixStore(f"emotion_dist/attempt_{attempt}", client)
            else:
                os.environ.setdefault("MASTER_ADDR", info.master_addr)
                os.environ.setdefault("MASTER_PORT", str(info.master_port))
                kw["init_method"] = "env://"
            dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout, **kw)
    return DistEnv(info.launcher, info.rank, info.world_size, info.local_rank, device, backend)


def close_distributed(clean: bool = True) -> None:
    """Ranks leave together: a rank that tears its group down while a peer still talks to it
    can abort in gloo's threads ("terminate called without an active exception")."""
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def agree_any(flags: list, device: torch.device) -> list[bool]:
    """All ranks learn whether any rank raised each flag (bools or 0-dim tensors, read once here):
    decisions that end or change the loop (stop signal, non-finite step) must be taken together,
    or the others hang or diverge."""
    t = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def gather_objects(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]

