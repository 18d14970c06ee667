"""A resumable distributed sampler that does not depend on the world size.

The epoch's global order depends only on (seed, epoch). Training walks it in micro-batches of
`world * batch_size` consecutive samples, each split into `world` contiguous shards; an optimizer
step takes `grad_accum` micro-batches. Given the samples already consumed, the rest of the epoch
is split over the *current* ranks: resuming on another world size repeats and skips nothing.
Evaluation shards are contiguous and unpadded (DistributedSampler pads with duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Step:
    micro_batches: list[torch.Tensor]  # this rank's sample positions, one tensor per micro-batch
    global_samples: int  # samples in the whole step over all ranks (for exact loss scaling)


class ResumableSampler:
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

    def plan(self) -> list[Step]:
        """The rest of the epoch for this rank, from `consumed` on; pure (advance() moves on)."""
        order = epoch_order(self.n, self.seed, self.epoch)
        steps, pos = [], self.consumed
        while True:
            micros, total = [], 0
            for _ in range(self.grad_accum):
                span = self._micro(pos)
                if span is None:
                    break
                micros.append(order[torch.tensor_split(span, self.world)[self.rank]])
                total += len(span)
                pos += len(span)
            if not micros:
                return steps
            steps.append(Step(micros, total))

    def advance(self, step: Step) -> None:
        """Call once a step is applied: a checkpoint written now resumes after it."""
        self.consumed += step.global_samples


def eval_shard(n: int, world: int, rank: int) -> torch.Tensor:
    """Contiguous, unpadded shard: the union over ranks is every sample exactly once."""
    return torch.tensor_split(torch.arange(n), world)[rank]
