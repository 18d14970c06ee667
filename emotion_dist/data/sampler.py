"""A resumable distributed sampler that does not depend on the world size.

The epoch's global order depends only on (seed, epoch). Training walks it in micro-batches of
`world * batch_size` consecutive samples, each split into `world` contiguous shards; an optimizer
step takes `grad_accum` micro-batches. Given the samples already consumed, the rest of the epoch
is split over the *current* ranks: resuming on another world size repeats and skips nothing.

Static shapes: every micro-batch has exactly `batch_size` positions on every rank. The epoch's
ragged end is padded with filler positions (the first samples of the epoch's order) that carry
zero weight: the loss and the samples counted are exact, each sample is still trained on once per
epoch, a compiled step never sees a new shape, and no rank ever gets a batch of one (BatchNorm
cannot train on it). The fillers do take part in the BatchNorm statistics of that last batch.
Evaluation shards are contiguous and unpadded (DistributedSampler pads with duplicates).

BalancedSampler (train.sampler=balanced) walks a different order the same way: n draws with
replacement, each class drawn with equal probability, again a pure function of (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SEED_MOD = 2**63  # torch.Generator takes 64-bit seeds; any config seed maps into range


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % SEED_MOD)
    return torch.randperm(n, generator=g)


def balanced_order(labels: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """len(labels) positions drawn with replacement, P(position) = 1 / (classes * its class's count):
    every class present is drawn equally often in expectation."""
    counts = torch.bincount(labels)
    weight = 1.0 / counts[labels].double()
    cdf = weight.cumsum(0)
    cdf /= cdf[-1].clone()  # ends at exactly 1.0, so a uniform in [0, 1) never falls past the end
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % SEED_MOD)
    return torch.searchsorted(cdf, torch.rand(len(labels), generator=g, dtype=torch.float64), right=True)


@dataclass
class Step:
    micro_batches: list[torch.Tensor]  # this rank's sample positions, one tensor per micro-batch (batch_size each)
    global_samples: int  # real samples in the whole step over all ranks (for exact loss scaling)
    real: Optional[list[int]] = None  # per micro-batch, how many leading positions are real (the rest are fillers)
    # per micro-batch, each sample's draw key for augmentation and label draws: None = the sample's
    # dataset index (each sample is drawn once per epoch); BalancedSampler: the draw's position in the
    # epoch, so a sample drawn twice is augmented twice differently
    keys: Optional[list[torch.Tensor]] = None

    def __post_init__(self):
        if self.real is None:
            self.real = [len(m) for m in self.micro_batches]

    def masks(self) -> list[torch.Tensor]:
        """Per micro-batch, True where a position is a real sample (False: a zero-weight filler)."""
        return [torch.arange(len(m)) < r for m, r in zip(self.micro_batches, self.real)]

    def real_positions(self) -> torch.Tensor:
        """This rank's real sample positions in the step (fillers left out)."""
        return torch.cat([m[:r] for m, r in zip(self.micro_batches, self.real)])


class ResumableSampler:
    keyed_by_draw = False  # a permutation draws each sample once: its index is key enough

    def __init__(self, n: int, batch_size: int, world: int, rank: int, *, seed: int, grad_accum: int = 1):
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

    def steps_per_epoch(self) -> int:
        per_step = self.world * self.batch_size * self.grad_accum
        return -(-self.n // per_step)

    def order(self) -> torch.Tensor:
        """The epoch's global order of sample positions: a pure function of (seed, epoch)."""
        return epoch_order(self.n, self.seed, self.epoch)

    def plan(self) -> list[Step]:
        """The rest of the epoch for this rank, from `consumed` on; pure (advance() moves on)."""
        return plan_steps(self.order(), self.consumed, batch_size=self.batch_size, world=self.world, rank=self.rank,
                          grad_accum=self.grad_accum, keyed_by_draw=self.keyed_by_draw)

    def advance(self, step: Step) -> None:
        """Call once a step is applied: a checkpoint written now resumes after it."""
        self.consumed += step.global_samples


def plan_steps(order: torch.Tensor, consumed: int, *, batch_size: int, world: int, rank: int,
               grad_accum: int = 1, keyed_by_draw: bool = False) -> list[Step]:
    """Walk `order` from `consumed` on in micro-batches of world x batch_size samples, each split into
    `world` contiguous shards, `grad_accum` micro-batches a step; the last one padded with fillers
    (the first draws of the epoch). With keyed_by_draw, each sample's key is its draw's position."""
    n, per_micro = len(order), world * batch_size
    steps, pos = [], consumed
    while pos < n:
        micros, keys, real, total = [], [], [], 0
        while len(micros) < grad_accum and pos < n:
            span = torch.arange(pos, min(pos + per_micro, n))
            draws = torch.tensor_split(span, world)[rank]
            fill = batch_size - len(draws)
            if fill:
                draws = torch.cat([draws, torch.arange(fill) % n])
            micros.append(order[draws])
            keys.append(draws)
            real.append(batch_size - fill)
            total += len(span)
            pos += len(span)
        steps.append(Step(micros, total, real, keys if keyed_by_draw else None))
    return steps


class BalancedSampler(ResumableSampler):
    """Class-balanced epochs: `n` draws with replacement (see balanced_order), split over ranks and
    resumed exactly as ResumableSampler does. `labels`: the training split's label per position."""

    keyed_by_draw = True

    def __init__(self, labels, batch_size: int, world: int, rank: int, *, seed: int, grad_accum: int = 1):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        super().__init__(len(self.labels), batch_size, world, rank, seed=seed, grad_accum=grad_accum)

    def order(self) -> torch.Tensor:
        return balanced_order(self.labels, self.seed, self.epoch)


def eval_shard(n: int, world: int, rank: int) -> torch.Tensor:
    """Contiguous, unpadded shard: the union over ranks is every sample exactly once."""
    return torch.tensor_split(torch.arange(n), world)[rank]
