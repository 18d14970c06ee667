"""The learning-rate schedule: linear warmup, then cosine decay, as a pure function of training
progress in epochs (fractional). Progress, not steps: the schedule does not change with the world
size, the batch size or a resume onto another number of processes."""

from __future__ import annotations

import math

import torch

MIN_WARMUP_FACTOR = 1e-3  # the first step does not train at lr 0


def lr_factor(progress: float, warmup_epochs: float, epochs: int) -> float:
    """Multiplier of the base learning rate after `progress` epochs."""
    if warmup_epochs > 0 and progress < warmup_epochs:
        return max(progress / warmup_epochs, MIN_WARMUP_FACTOR)
    span = max(epochs - warmup_epochs, 1e-8)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))


class ProgressLR:
    """Sets every param group's lr to base_lr x lr_factor(progress). Its state is the base
    learning rates and the last progress (checkpoints from before, saved by a LambdaLR with the
    same base_lrs, load too)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: float, epochs: int):
        self.optimizer, self.warmup_epochs, self.epochs = optimizer, warmup_epochs, epochs
        for group in optimizer.param_groups:  # as torch's schedulers do: the optimizer's state keeps its format
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.progress = 0.0
        self.update(0.0)

    def update(self, progress: float) -> None:
        self.progress = progress
        factor = lr_factor(progress, self.warmup_epochs, self.epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "progress": self.progress,
                "_last_lr": [g["lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        if "_last_lr" in state:
            for group, lr in zip(self.optimizer.param_groups, state["_last_lr"]):
                group["lr"] = lr
        self.progress = state.get("progress", self.progress)
