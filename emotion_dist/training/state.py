"""Every piece of training state that a checkpoint carries, each with state_dict()/load_state_dict().

A component's state_dict() returns the top-level entries of the checkpoint file it owns (the file
layout is the one checkpoints have always had, so older files load). Components whose state lives on
several ranks (weights, optimizer, EMA, RNG) gather in state_dict(): every rank calls it, rank 0 gets
the full state. The loop's own bookkeeping (epoch, step, best score, history, bad-step counters) is
TrainProgress, with the decisions made from it (patience, too many bad steps) as plain methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from emotion_dist.distributed import process_group
from emotion_dist.errors import CheckpointError


class StoredUnderKey:
    """An object with its own state_dict (scheduler, scaler, sampler), stored under one key."""

    def __init__(self, key: str, obj: Any):
        self.key, self.obj = key, obj

    def state_dict(self) -> dict:
        return {self.key: self.obj.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state[self.key])


class WeightsAndOptimizer:
    """The model's weights and the optimizer state, full and keyed by parameter name."""

    def __init__(self, strategy, model, optimizer):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = self.strategy.full_state_dict(self.model, self.optimizer)
        return {"model_state_dict": model_sd, "optimizer_state_dict": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.strategy.load_state_dict(self.model, self.optimizer, state["model_state_dict"],
                                          state["optimizer_state_dict"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not fit this model ({str(e).splitlines()[0][:150]})") from None


class EMAState:
    """The EMA of the weights (ema.ModelEMA), gathered like the weights by swapping it in."""

    def __init__(self, ema, strategy, model):
        self.ema, self.strategy, self.model = ema, strategy, model

    def state_dict(self) -> dict:
        with self.ema.swapped():
            weights = self.strategy.full_model_state_dict(self.model)
        return {"ema_state_dict": weights, "ema_updates": self.ema.updates}

    def load_state_dict(self, state: dict) -> None:
        if "ema_state_dict" not in state:  # EMA switched on for a run saved without one: it starts here
            self.ema.reset()
            return
        with self.ema.swapped():  # loading into the swapped-in model sets the average
            self.strategy.load_model_state_dict(self.model, state["ema_state_dict"])
        self.ema.updates = state["ema_updates"]


class RngStates:
    """Every rank's torch RNG state; restored when the world size is the same."""

    def __init__(self, env: process_group.DistEnv):
        self.env = env

    def state_dict(self) -> dict:
        return {"rng_states": process_group.gather_objects(torch.get_rng_state())}

    def load_state_dict(self, state: dict) -> None:
        if len(state["rng_states"]) == self.env.world_size:
            torch.set_rng_state(state["rng_states"][self.env.rank])


class EpochSums:
    """The running sums of the epoch on each rank (loss, correct, samples; float64 on the device),
    checkpointed so that a resumed epoch reports the same training loss and accuracy, step by step,
    as an uninterrupted one. Restored per rank on the same world size; on another, rank 0 carries
    the epoch's totals so far (its running figures are then global, the epoch's totals exact)."""

    KEY = "epoch_sums"

    def __init__(self, env: process_group.DistEnv):
        self.env = env
        self.sums = torch.zeros(3, dtype=torch.float64, device=env.device)

    def reset(self) -> None:
        self.sums.zero_()

    def state_dict(self) -> dict:
        rows = process_group.gather_objects(self.sums.tolist())
        return {self.KEY: rows}

    def load_state_dict(self, state: dict) -> None:
        rows = state.get(self.KEY)
        self.reset()
        if not rows:  # a checkpoint from before the sums were kept: the epoch's figures restart here
            return
        if len(rows) == self.env.world_size:
            mine = rows[self.env.rank]
        else:
            mine = [sum(col) for col in zip(*rows)] if self.env.rank == 0 else [0.0, 0.0, 0.0]
        self.sums.copy_(torch.tensor(mine, dtype=torch.float64))

    def running_loss(self) -> float:
        return float(self.sums[0] / self.sums[2].clamp(min=1))


@dataclass
class TrainProgress:
    """Where training stands, and the loop-ending decisions taken from it. Every rank holds the same
    values (they come from all-reduced figures), so every rank decides alike."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float = -1.0  # validation macro-F1 of best.pt
    best_epoch: int = -1
    history: list = field(default_factory=list)  # one row per epoch
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0
    last_loss: float = math.nan
    test_recorded: bool = False  # the final test pass ran and was logged: the run is complete

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "loss": self.last_loss,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch, "history": list(self.history),
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps,
                "test_recorded": self.test_recorded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.global_step, self.last_loss = state["epoch"], state["global_step"], state["loss"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.history = list(state["history"])
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.test_recorded = bool(state.get("test_recorded", False))

    def end_epoch(self, row: dict, metric: float) -> bool:
        """Record a finished epoch; True when its metric is the best so far (ties keep the older)."""
        self.epoch += 1
        self.history.append(row)
        if metric > self.best_metric:
            self.best_metric, self.best_epoch = metric, self.epoch
            return True
        return False

    def out_of_patience(self, patience: int) -> bool:
        """Early stop: `patience` epochs (> 0) without a better validation metric."""
        return patience > 0 and self.best_epoch > 0 and self.epoch - self.best_epoch >= patience

    def end_step(self, applied: bool) -> None:
        """Count a finished step; a non-finite one (skipped on every rank) extends the bad streak."""
        self.global_step += 1
        self.test_recorded = False  # trained further: the recorded test pass is of an earlier best.pt
        if applied:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1

    def too_many_bad_steps(self, limit: int) -> bool:
        return self.bad_steps >= limit

    def max_steps_reached(self, max_steps: int) -> bool:
        return bool(max_steps) and self.global_step >= max_steps


@dataclass
class CheckpointInterval:
    """Step checkpoints every `every_steps` optimizer steps (0 = at epoch ends only)."""

    every_steps: int = 0

    def due(self, global_step: int) -> bool:
        return bool(self.every_steps) and global_step % self.every_steps == 0
