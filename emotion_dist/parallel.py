"""Data-parallel strategies (ddp | zero | fsdp) and their full, strategy-independent state dicts.

Checkpoints always hold the *full* model and optimizer state keyed by parameter name (the format
of torch.distributed.checkpoint.state_dict with full_state_dict=True), so any strategy on any
world size loads what any other saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .distributed import DistEnv


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


def wrap_model(model: nn.Module, strategy: str, env: DistEnv, sync_bn: bool) -> nn.Module:
    if sync_bn and env.world_size > 1:
        model = convert_sync_bn(model, env.device)
    model.to(env.device)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone:
            fully_shard(block)
        fully_shard(model)
        return model
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def broadcast_buffers(model: nn.Module) -> None:
    """Collective: give every rank rank 0's BatchNorm running statistics before evaluation. Each
    rank updates them from its own batches (FSDP2 never syncs them; DDP copies rank 0's only at the
    next forward), and rank 0's are the ones checkpoints hold: so evaluation, `emotion-dist
    evaluate` on the checkpoint and a resumed run all see the same statistics (timm's
    dist_bn=broadcast; averaging would be a state no checkpoint records)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for b in unwrap(model).buffers():
        dist.broadcast(b, src=0)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (evaluation):
    free them, so the next forward gathers what the shards hold now (after a load or EMA swap)."""
    for m in _fsdp_modules(model):
        m.reshard()


def build_optimizer(model: nn.Module, strategy: str, lr: float, weight_decay: float, device: torch.device):
    # no weight decay on norms and biases
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if strategy == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=weight_decay, **fused)
        zero.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return zero
    return torch.optim.AdamW(groups, lr=lr, **fused)


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's global order (param_groups, then position)."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _is_zero(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def full_state_dict(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Collective: every rank calls it; rank 0 gets the full name-keyed model/optimizer state."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not _is_zero(optimizer):
        return get_state_dict(model, optimizer, options=opts)
    model_sd = full_model_state_dict(model)
    optimizer.consolidate_state_dict(to=0)
    if dist.get_rank() != 0:
        return {}, {}
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    state = {names[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return model_sd, {"state": state, "param_groups": groups}


def full_model_state_dict(model: nn.Module) -> dict:
    """Collective: a copy of the full name-keyed model state (weights and buffers) on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}  # a copy: on CPU the values may alias the live tensors


def load_full_state_dict(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Collective: load a full name-keyed state (from any strategy and world size) on every rank."""
    if optimizer is None or optim_sd is None or not _is_zero(optimizer):
        # FSDP2: rank 0's full state is broadcast and sharded on arrival
        opts = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=bool(_fsdp_modules(model)))
        if optimizer is None or optim_sd is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, model_sd, options=opts)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in optim_sd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
