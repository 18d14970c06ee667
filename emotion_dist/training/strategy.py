"""Data-parallel strategies, one class each, chosen once (`make_strategy`): ddp (DistributedDataParallel),
zero (DDP + ZeroRedundancyOptimizer: optimizer state sharded) and fsdp (FSDP2 `fully_shard`).

A strategy wraps the model, builds the optimizer, says how micro-batches skip the gradient sync, clips
the global gradient norm, and moves *full* state dicts in and out. Checkpoints always hold the full
model and optimizer state keyed by parameter name (the format of
torch.distributed.checkpoint.state_dict with full_state_dict=True), so any strategy on any world
size loads what any other saved. Nothing outside this module asks which strategy is running.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from emotion_dist.config import DistConfig
from emotion_dist.distributed.process_group import DistEnv
from emotion_dist.errors import ConfigError


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU/gloo (torch's own refuses non-GPU modules): batch statistics are
    all-reduced with the differentiable collective, so gradients flow through them too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        # two passes in float64: E[x^2] - E[x]^2 in fp32 loses digits when |mean| >> std
        count = float(_AllReduceSum.apply(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64)))
        mean = _AllReduceSum.apply(x.sum(dim=(0, 2, 3), dtype=torch.float64)) / count
        centered = x - mean.to(x.dtype).view(1, -1, 1, 1)
        var = _AllReduceSum.apply((centered.double() ** 2).sum(dim=(0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach().to(x.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var.detach() * count / (count - 1)).to(x.dtype), alpha=m)
        y = centered / torch.sqrt(var.to(x.dtype).view(1, -1, 1, 1) + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model


def _multi_process() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _full_options(**kw):
    # imported here: torch.distributed.checkpoint pulls in DTensor and sympy, a second per process
    # start, and only FSDP needs it
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Strategy:
    """Plain data parallelism's common ground; subclasses change what differs."""

    name = ""
    min_world_size = 1

    def __init__(self, env: DistEnv, cfg: DistConfig | None = None):
        self.env, self.cfg = env, cfg or DistConfig()
        self.sync_bn = self.cfg.sync_bn

    # ---------------------------------------------------------------- building
    def wrap(self, model: nn.Module, channels_last: bool) -> nn.Module:
        if self.sync_bn and self.env.world_size > 1:
            model = convert_sync_bn(model, self.env.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return self._wrap(model.to(self.env.device))

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        decay, no_decay = self._param_groups(model)  # no weight decay on norms and biases
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, **self._adamw_impl())

    @staticmethod
    def _param_groups(model: nn.Module) -> tuple[list, list]:
        params = list(model.named_parameters())
        return [p for _, p in params if p.ndim > 1], [p for _, p in params if p.ndim <= 1]

    def _adamw_impl(self) -> dict:
        return {"fused": True} if self.env.device.type == "cuda" else {"foreach": True}

    def sync_initial_weights(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's weights (seeded alike already; this makes it certain)."""
        if _multi_process():
            for t in self.unwrap(model).state_dict().values():
                dist.broadcast(t, src=0)

    # ---------------------------------------------------------------- the step
    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        """The context a micro-batch's backward runs in: gradients are synced on the last one only."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm (after clipping to max_norm, when finite), as a plain tensor."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def after_eval(self, model: nn.Module) -> None:
        """Called after forwards without backward (evaluation)."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    # ---------------------------------------------------------------- state (collective)
    # The checkpoint's format is that of torch.distributed.checkpoint's full state dicts (names for
    # keys, optimizer state and param_groups keyed by parameter name), which FSDPStrategy gets from
    # DCP itself. Unsharded weights need no DCP: the module's own state dict is already full.
    def full_state_dict(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """Every rank calls it; rank 0 gets the full name-keyed model and optimizer state."""
        if _multi_process() and dist.get_rank() != 0:  # only rank 0 writes it: no copies elsewhere
            return {}, {}
        sd = optimizer.state_dict()
        names = self._param_names(model, optimizer)
        state = {names[i]: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in sd["state"].items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        return self.full_model_state_dict(model), {"state": state, "param_groups": groups}

    def full_model_state_dict(self, model: nn.Module) -> dict:
        """A copy of the full name-keyed model state (weights and buffers) on rank 0."""
        if _multi_process() and dist.get_rank() != 0:
            return {}
        # a copy: on CPU the values would alias the live tensors
        return {k: v.detach().cpu().clone() for k, v in self.unwrap(model).state_dict().items()}

    def load_model_state_dict(self, model: nn.Module, model_sd: dict) -> None:
        self.unwrap(model).load_state_dict(model_sd, strict=True)

    def load_state_dict(self, model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
        """Load a full name-keyed state, from any strategy and world size, on every rank."""
        self.load_model_state_dict(model, model_sd)
        index = {n: i for i, n in enumerate(self._param_names(model, optimizer))}
        state = {index[n]: s for n, s in optim_sd["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _param_names(self, model: nn.Module, optimizer) -> list[str]:
        """Parameter names in the optimizer's global order (param_groups, then position)."""
        names = {id(p): n for n, p in self.unwrap(model).named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


class DDPStrategy(Strategy):
    """DistributedDataParallel, tuned by dist.* for a small model: EmotionNet's 7 MB of fp32 gradients
    fit torch's default 25 MB bucket whole, so no all-reduce starts before the backward pass ends;
    a smaller `bucket_cap_mb` overlaps them. Gradients are views into the buckets (no copy), the graph
    can be declared static, and the all-reduce can run in bfloat16 (half the bytes, ~3 significant
    digits per gradient element)."""

    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        c = self.cfg
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids, bucket_cap_mb=c.bucket_cap_mb,
                  gradient_as_bucket_view=c.gradient_as_bucket_view, static_graph=c.static_graph)
        if c.grad_compression == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            ddp.register_comm_hook(None, bf16_compress_hook)  # None: the default process group
        return ddp

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        if self.env.world_size == 1 or last_micro_batch:
            return contextlib.nullcontext()
        return model.no_sync()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if self.env.world_size > 1 else model


class ZeroStrategy(DDPStrategy):
    """DDP for the gradients, ZeroRedundancyOptimizer for the optimizer state (each rank keeps a
    shard). Its state dict is positional and sharded: consolidated to rank 0 and keyed by name."""

    name = "zero"

    def build_optimizer(self, model: nn.Module, lr: float, weight_decay: float):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        decay, no_decay = self._param_groups(model)
        zero = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=weight_decay,
                                       **self._adamw_impl())
        zero.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return zero

    def full_state_dict(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        optimizer.consolidate_state_dict(to=0)  # collective: every rank, before rank 0 reads it
        return super().full_state_dict(model, optimizer)


class FSDPStrategy(Strategy):
    """FSDP2: each backbone block and the root sharded with `fully_shard`; parameters are DTensors."""

    name = "fsdp"
    min_world_size = 2

    def wrap(self, model: nn.Module, channels_last: bool) -> nn.Module:
        return super().wrap(model, channels_last=False)  # FSDP2 shards contiguous parameters only

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone:
            fully_shard(block)
        fully_shard(model)
        return model

    def sync_initial_weights(self, model: nn.Module) -> None:
        pass  # sharded from identically seeded weights; the shards are each rank's own

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return super().clip_grad_norm(model, max_norm).full_tensor()  # a DTensor: the global norm

    def after_eval(self, model: nn.Module) -> None:
        """FSDP2 keeps the root's parameters gathered after a forward without backward: free them,
        so the next forward gathers what the shards hold now (after a load or an EMA swap)."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    # DTensor parameters: torch.distributed.checkpoint gathers and shards them
    def full_state_dict(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, optimizer, options=_full_options(cpu_offload=True))

    def full_model_state_dict(self, model: nn.Module) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
        return {k: v.clone() for k, v in sd.items()}

    def load_model_state_dict(self, model: nn.Module, model_sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_sd, options=_full_options(strict=True, broadcast_from_rank0=True))

    def load_state_dict(self, model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        # rank 0's full state is sharded on arrival
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=_full_options(strict=True, broadcast_from_rank0=True))


STRATEGIES = {s.name: s for s in (DDPStrategy, ZeroStrategy, FSDPStrategy)}


def check_world_size(name: str, world_size: int) -> None:
    """Before the process group starts: a strategy that cannot run on this many processes."""
    need = STRATEGIES[name].min_world_size
    if world_size < need:
        raise ConfigError(f"dist.strategy={name} needs at least {need} processes; launch with torchrun or use "
                          f"dist.strategy=ddp")


def make_strategy(cfg: DistConfig, env: DistEnv) -> Strategy:
    check_world_size(cfg.strategy, env.world_size)
    return STRATEGIES[cfg.strategy](env, cfg)


def broadcast_buffers(model: nn.Module) -> None:
    """Collective: give every rank rank 0's BatchNorm running statistics before evaluation. Each
    rank updates them from its own batches (FSDP2 never syncs them; DDP copies rank 0's only at the
    next forward), and rank 0's are the ones checkpoints hold: so evaluation, `emotion-dist
    evaluate` on the checkpoint and a resumed run all see the same statistics (timm's
    dist_bn=broadcast; averaging would be a state no checkpoint records)."""
    if _multi_process():
        for b in model.buffers():
            dist.broadcast(b, src=0)
