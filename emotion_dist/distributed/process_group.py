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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from emotion_dist import errors
from emotion_dist.config import Config
from emotion_dist.distributed import interrupts
from emotion_dist.errors import ConfigError, LaunchError


@dataclass
class LaunchInfo:
    launcher: str  # python | torchrun | accelerate | slurm
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    # False for one process started without a rendezvous (python, accelerate's one-process launcher)
    rendezvous: bool = True


# what accelerate's one-process launcher (`prepare_simple_launcher_cmd_env`) always sets; it sets no RANK/WORLD_SIZE
ACCELERATE_SIMPLE_LAUNCHER_VARS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")


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
            env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST",
                                                               env.get("SLURM_JOB_NODELIST", ""))),
            _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000,
        )
    else:
        one = "accelerate" if any(k in env for k in ACCELERATE_SIMPLE_LAUNCHER_VARS) else "python"
        info = LaunchInfo(one, 0, 1, 0, "127.0.0.1", 0, rendezvous=False)
    if not (0 <= info.rank < info.world_size):
        raise LaunchError(f"rank {info.rank} is outside world size {info.world_size}; fix the launcher's environment")
    if info.rendezvous and not 0 < info.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={info.master_port} is not a TCP port; use one between 1024 and 65535")
    return info


@dataclass
class DistEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    topology: "Topology" = None  # noqa: F821  (which rank is on which node: topology.py)

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
    """Launch-dependent config checks, before the process group starts (the strategy's own:
    strategy.check_world_size)."""
    if cfg.dist.backend == "nccl" and (cfg.train.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("dist.backend=nccl needs CUDA GPUs and none is in use here; "
                          "use dist.backend=auto (gloo on CPU)")


def _init_error(e: Exception, info: LaunchInfo, timeout_s: float) -> LaunchError:
    """The process group could not form: one line saying why and what to do."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f"{info.master_addr}:{info.master_port}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return LaunchError(f"MASTER_PORT={info.master_port} is already in use on this host; pick a free port "
                           f"(or let torchrun choose: torchrun --standalone)")
    if "waiting for clients" in text:
        return LaunchError(f"rank 0 waited {timeout_s:g} s at {where} for the other {info.world_size - 1} of "
                           f"WORLD_SIZE={info.world_size} processes, and {text.split('.')[-2].strip()}; start every "
                           f"process (torchrun does), or unset RANK/WORLD_SIZE for one process")
    if "connect" in text or "timed out" in text.lower():
        return LaunchError(f"rank {info.rank} could not reach the rendezvous at {where} within {timeout_s:g} s; "
                           f"check MASTER_ADDR/MASTER_PORT and that rank 0 is running")
    return LaunchError(f"the process group could not start ({text[:200]}); check the launch environment")


RESOLVE_RETRY_S = 1.0


def wait_for_master_addr(info: LaunchInfo, timeout_s: float) -> None:
    """MASTER_ADDR resolved here, in Python, before torch's rendezvous: torch retries a name that
    does not resolve for the whole dist.timeout_s, a warning line a second, and cannot be stopped by
    a signal meanwhile. Retried (a cluster's DNS can lag a node's start), a stop signal acted on
    between tries, one note while waiting, one line when it never resolves."""
    start = time.monotonic()
    noted = False
    while True:
        try:  # a resolver that does not answer holds the call for seconds, in C
            with interrupts.stop_at_once(f"resolving MASTER_ADDR={info.master_addr}"):
                socket.getaddrinfo(info.master_addr, info.master_port, type=socket.SOCK_STREAM)
            return
        except (socket.gaierror, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise LaunchError(f"MASTER_ADDR={info.master_addr} does not resolve to an address ({reason}; waited "
                              f"{waited:.0f} s, dist.timeout_s); set MASTER_ADDR to rank 0's host name or IP")
        if not noted:
            print(f"waiting for MASTER_ADDR={info.master_addr} to resolve ({reason}); up to {timeout_s:g} s "
                  f"(dist.timeout_s)", file=sys.stderr, flush=True)
            noted = True
        for _ in range(10):  # a stop signal within RESOLVE_RETRY_S / 10
            interrupts.check()
            time.sleep(RESOLVE_RETRY_S / 10)


def init_distributed(cfg: Config, info: LaunchInfo) -> DistEnv:
    device = select_device(cfg, info.local_rank)
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    if not dist.is_initialized():
        # ultralytics (EmotionNet's blocks) builds its settings on first import inside its
        # torch_distributed_zero_first, which calls dist.barrier() once a process group exists: a first
        # import on one rank alone (rank 0 reading a checkpoint for a decision) would wait for the
        # other ranks forever. Imported on every rank before the group exists, it never does.
        import ultralytics.utils  # noqa: F401
        if not info.rendezvous:
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            wait_for_master_addr(info, cfg.dist.timeout_s)
            kw = {"device_id": device} if backend == "nccl" else {}
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's restarted workers talk to the same agent store as the failed attempt;
                # without a per-attempt prefix they can read the dead peers' addresses (gloo:
                # "connectFullMesh failed ... Connection refused")
                where = f"{info.master_addr}:{info.master_port}"
                with interrupts.stop_at_once(f"connecting to torchrun's store at {where}"):
                    client = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                                           timeout=timeout)
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                kw["store"] = dist.PrefixStore(f"emotion_dist/attempt_{attempt}", client)
            else:
                os.environ.setdefault("MASTER_ADDR", info.master_addr)
                os.environ.setdefault("MASTER_PORT", str(info.master_port))
                kw["init_method"] = "env://"
            try:
                with interrupts.stop_at_once("joining the process group (the rendezvous at "
                                             f"{info.master_addr}:{info.master_port})"):
                    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout, **kw)
            except (RuntimeError, ValueError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
                raise _init_error(e, info, cfg.dist.timeout_s) from None
    from emotion_dist.distributed import liveness
    from emotion_dist.distributed.topology import detect

    liveness.start(info.rank, info.world_size)
    return DistEnv(info.launcher, info.rank, info.world_size, info.local_rank, device, backend, detect(info.local_rank))


CLOSED_KEY = "emotion_dist/closed"


def close_distributed(clean: bool = True, wait_s: float = 60.0) -> None:
    """Ranks leave together: a rank that tears its group down while a peer still talks to it
    can abort in gloo's threads ("terminate called without an active exception").

    Rank 0 leaves last. Without torchrun it hosts the TCPStore that every rank's teardown still
    talks to; when it exited first, a two-node srun job was once left with one node's ranks
    hanging after "done" until Slurm cancelled it. So the others tear down, then count themselves
    in the store, and rank 0 waits for that count (bounded: a peer that died must not hold it)."""
    from emotion_dist.distributed import liveness

    liveness.stop()
    if not dist.is_initialized():
        return
    if not (clean and dist.get_world_size() > 1):
        dist.destroy_process_group()
        return
    dist.barrier()
    rank, world = dist.get_rank(), dist.get_world_size()
    store = liveness.default_store()
    dist.destroy_process_group()
    if store is None:
        return
    try:
        if rank != 0:
            store.add(CLOSED_KEY, 1)
            return
        deadline = time.monotonic() + wait_s
        while store.add(CLOSED_KEY, 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the store's host is gone already: nothing left to wait for
        pass


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


def _error_box(e: BaseException):
    """What a rank's user-facing error looks like on the wire: (class name, message). The class is
    the nearest of errors.py's own (a RunDirBusy travels as the ConfigError it is), so that every
    rank can raise it and ends with the same one line and exit code."""
    if isinstance(e, (errors.UserError, errors.TrainingAborted)):
        name = next(c.__name__ for c in type(e).__mro__ if getattr(errors, c.__name__, None) is c)
        return name, str(e)
    return "RuntimeError", repr(e)


def _raise_box(box) -> None:
    name, message = box
    cls = getattr(errors, name, None)
    raise (cls(message) if isinstance(cls, type) and issubclass(cls, (errors.UserError, errors.TrainingAborted))
           else RuntimeError(f"rank 0 failed: {message}"))


def _on_rank0(fn):
    """(result, error, wire box) of fn run here if this is rank 0, else (None, None, None)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return None, None, None
    try:
        return fn(), None, None
    except Exception as e:
        return None, e, _error_box(e)


def rank0_decides(fn, share_result: bool = True):
    """Run fn on rank 0 and give every rank its result (picklable; with share_result=False the other
    ranks get None: a lease, say); an error it raises (a ConfigError, say) is raised on every rank as
    the same one-line error, so no rank is left waiting. That error carries `on_every_rank`: the
    ranks can close the group together (close_distributed(clean=True), rank 0 last), so a launcher
    sees each rank's own exit code rather than killing the ones still on their way out."""
    result, error, box = _on_rank0(fn)
    shared, box = broadcast_object((result if share_result else None, box))
    if error is None and box is not None:
        try:
            _raise_box(box)
        except Exception as e:
            error = e
    if error is not None:
        error.on_every_rank = True  # every rank raises it here: they can still leave together
        raise error
    on_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return result if on_rank0 else shared
