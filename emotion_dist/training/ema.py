"""Exponential moving average of the weights (`train.ema_decay` > 0), for every strategy.

The average lives beside the model as one tensor per parameter and buffer: under FSDP2 each rank
keeps only its own shard (the parameters are DTensors), so the EMA costs what the sharded weights
cost. Everything that needs the averaged weights as a *model* (validation, the full name-keyed
state dict in checkpoints, loading one back) runs inside `swapped()`, which exchanges them with the
live weights and back: the strategy's full, strategy-independent state-dict code serves both.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t  # FSDP2: this rank's shard


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.live = [_local(t) for t in (*model.parameters(), *model.buffers())]
        self.shadow = [t.detach().clone() for t in self.live]
        self._floats = ([s for s in self.shadow if s.is_floating_point()],
                        [t.detach() for t in self.live if t.is_floating_point()])
        self._counters = [(s, t) for s, t in zip(self.shadow, self.live) if not s.is_floating_point()]

    def reset(self) -> None:
        """Start the average again from the live weights (EMA switched on for a run saved without one)."""
        self.updates = 0
        for s, t in zip(self.shadow, self.live):
            s.copy_(t.detach())

    def current_decay(self) -> float:
        """The decay of the next update: 0.1 at first, rising until the horizon reaches 1/(1-decay),
        so short runs average over the steps taken rather than over their random start."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        if self._floats[0]:
            torch._foreach_lerp_(*self._floats, 1.0 - d)
        for s, t in self._counters:  # BatchNorm's num_batches_tracked
            s.copy_(t)

    @torch.no_grad()
    def _exchange(self) -> None:
        for s, t in zip(self.shadow, self.live):
            tmp = t.clone()
            t.copy_(s)
            s.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self):
        """Inside, the model holds the averaged weights (and loading into it sets the average)."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()
