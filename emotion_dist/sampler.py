"""A resumable distributed sampler that does not depend on the world size.

The epoch's global order depends only on (seed, epoch). Training walks it in micro-batches of
`world * batch_size` consecutive samples, each split into `world` contiguous shards; an optimizer
step takes `grad_accum` micro-batches. Given the samples already consumed, the rest of the epoch
is split over the *current* ranks: resuming on another world size repeats and skips nothing.
Evaluation shards are contiguous and unpadded (DistributedSampler pads with duplicates).

BalancedSampler (train.sampler=balanced) walks a different order the same way: n draws with
replacement, each class drawn with equal probability, again a pure function of (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def balanced_order(labels: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """len(labels) positions drawn with replacement, P(position) = 1 / (classes * its class's count):
    every class present is drawn equally often in expectation."""
    counts = torch.bincount(labels)
    weight = 1.0 / counts[labels].double()
    cdf = weight.cumsum(0)
    cdf /= cdf[-1].clone()  # ends at exactly 1.0, so a uniform in [0, 1) never falls past the end
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.searchsorted(cdf, torch.rand(len(labels), generator=g, dtype=torch.float64), right=True)


@dataclass
class Step:
    micro_batches: list[torch.Tensor]  # this rank's sample positions, one tensor per micro-batch
    global_samples: int  # samples in the whole step over all ranks (for exact loss scaling)
    # per micro-batch, each sample's draw key for augmentation and label draws: None = the sample's
    # dataset index (each sample is drawn once per epoch); BalancedSampler: the draw's position in the
    # epoch, so a sample drawn twice is augmented twice differently
    keys: Optional[list[torch.Tensor]] = None


class ResumableSampler:
    keyed_by_draw = False  # a permutation draws each sample once: its index is key enough

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, grad_accum: int = 1):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.grad_accum = seed, grad_accum
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already trained on, over all ranks

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the training set has {self.n} images but the checkpoint's had {state['n']}")
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def _micro(self, start: int) -> torch.Tensor | None:
        """Global positions [start, start + world*batch) of the epoch order, or None at the end."""
        chunk = min(self.world * self.batch_size, self.n - start)
        return None if chunk < self.world else torch.arange(start, start + chunk)

    def steps_per_epoch(self) -> int:
        per_step = self.world * self.batch_size * self.grad_accum
        full, rest = divmod(self.n, per_step)
        return full + (1 if rest >= self.world else 0)

    def order(self) -> torch.Tensor:
        """The epoch's global order of sample positions."""
        return epoch_order(self.n, self.seed, self.epoch)

    def plan(self) -> list[Step]:
        """The rest of the epoch for this rank, from `consumed` on; pure (advance() moves on)."""
        order = self.order()
        steps, pos = [], self.consumed
        while True:
            micros, keys, total = [], [], 0
            for _ in range(self.grad_accum):
                span = self._micro(pos)
                if span is None:
                    break
                shard = torch.tensor_split(span, self.world)[self.rank]
                micros.append(order[shard])
                keys.append(shard)
                total += len(span)
                pos += len(span)
            if not micros:
                return steps
            steps.append(Step(micros, total, keys if self.keyed_by_draw else None))

    def advance(self, step: Step) -> None:
        """Call once a step is applied: a checkpoint written now resumes after it."""
        self.consumed += step.global_samples


class BalancedSampler(ResumableSampler):
    """Class-balanced epochs: `n` draws with replacement (see balanced_order), split over ranks and
    resumed exactly as ResumableSampler does. `labels`: the training split's label per position."""

    keyed_by_draw = True

    def __init__(self, labels, batch_size: int, world: int, rank: int, seed: int, grad_accum: int = 1):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        super().__init__(len(self.labels), batch_size, world, rank, seed, grad_accum)

    def order(self) -> torch.Tensor:
        return balanced_order(self.labels, self.seed, self.epoch)


def eval_shard(n: int, world: int, rank: int) -> torch.Tensor:
    """Contiguous, unpadded shard: the union over ranks is every sample exactly once."""
    return torch.tensor_split(torch.arange(n), world)[rank]
