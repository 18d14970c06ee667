"""Evaluation: exact distributed evaluation of a split (an Evaluator, built once per run) and the
final test pass on best.pt. The test split is read only here,
once, at the end of training.

A stop signal is agreed by all ranks every STOP_CHECK_BATCHES batches, so a long validation or test
pass ends within that many batches (and inside Slurm's grace window) with `Interrupted`: the caller
saves what it must, and the resumed run redoes the pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from emotion_dist.data.augment import BatchTransform, gather_uint8
from emotion_dist.data.datasets import Split
from emotion_dist.data.labels import remap_probabilities
from emotion_dist.data.sampler import eval_shard
from emotion_dist.distributed import interrupts, process_group
from emotion_dist.errors import Interrupted
from emotion_dist.inference import tta
from emotion_dist.training.amp import autocast
from emotion_dist.training.diagnostics import evaluation_batch
from emotion_dist.training.metrics import confusion_matrix, summarize
from emotion_dist.training.strategy import broadcast_buffers

STOP_CHECK_BATCHES = 4  # evaluation batches between two agreements on a stop signal


@dataclass(frozen=True)
class Evaluator:
    """Exact distributed evaluation, built once per run with what does not change between calls;
    the model and the split are the arguments of each call."""

    transform: BatchTransform
    env: process_group.DistEnv
    classes: list[str]
    batch_size: int
    precision: str = "fp32"
    strategy: Optional[object] = None  # training/strategy.Strategy: after_eval() and loading weights

    def evaluate(self, model, split: Split, *, tta: str = "none", extra_models: Sequence = (),
                 class_maps: Optional[Sequence] = None, mistakes: int = 0) -> tuple[dict, torch.Tensor]:
        """Loss, count, accuracy, macro-F1 and per-class figures, and the confusion matrix.

        Unpadded contiguous shards, summed confusion matrix, with rank 0's BatchNorm statistics
        (those a checkpoint holds). Every rank runs the same number of forwards of the same shape
        (FSDP all-gathers inside forward; a compiled model sees one shape): batches are padded with
        masked-out copies of a real image. tta ("none" | "flip" | "tencrop", see inference/tta.py)
        and extra_models (an ensemble) average class probabilities; class_maps[i] maps model i's
        classes onto the split's (labels.class_mapping). `mistakes=k`: res["mistakes"] holds the k
        most confident wrong predictions over all ranks, (position in the split, true, predicted,
        probability), most confident first."""
        res, cm = self._confusion(model, split, tta=tta, extra_models=extra_models, class_maps=class_maps,
                                  mistakes=mistakes)
        res.update(summarize(cm.cpu(), self.classes))
        return res, cm

    def test_pass(self, model, weights: dict, split: Split, *, tta: str = "none") -> tuple[dict, torch.Tensor]:
        """Load best.pt's inference weights into the (wrapped) model and evaluate the test split once."""
        self.strategy.load_model_state_dict(model, weights)
        return self.evaluate(model, split, tta=tta)

    @torch.no_grad()
    def _confusion(self, model, split: Split, *, tta: str, extra_models: Sequence,
                   class_maps: Optional[Sequence], mistakes: int = 0) -> tuple[dict, torch.Tensor]:
        env, batch_size, num_classes = self.env, self.batch_size, len(self.classes)
        models = [model, *extra_models]
        for m in models:
            m.eval()
            broadcast_buffers(m)
        shard = eval_shard(len(split), env.world_size, env.rank)
        n_batches = max(1, math.ceil(math.ceil(len(split) / env.world_size) / batch_size))
        cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=env.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        wrong: list[tuple[int, int, int, float]] = []
        for b in range(n_batches):
            if b and b % STOP_CHECK_BATCHES == 0:
                stop_if_requested(env)
            evaluation_batch()
            chunk = shard[b * batch_size:(b + 1) * batch_size]
            real = len(chunk)
            padded = torch.cat([chunk, torch.zeros(batch_size - real, dtype=torch.int64)])
            x_u8, y, _ = gather_uint8(split, padded)
            with autocast(env.device, self.precision):
                scores = _scores(models, x_u8, transform=self.transform, mode=tta, class_maps=class_maps)
            if real:
                scores, y = scores[:real], y[:real].to(env.device)
                loss_sum += F.cross_entropy(scores, y, reduction="sum").double()
                cm += confusion_matrix(scores.argmax(1), y, num_classes)
                if mistakes:
                    wrong = _most_confident_wrong(wrong, scores, y, chunk, mistakes)
        if self.strategy is not None:
            self.strategy.after_eval(model)
        process_group.all_reduce_sum(cm)
        process_group.all_reduce_sum(loss_sum)
        n = int(cm.sum())
        res = {"loss": float(loss_sum) / max(n, 1), "count": n}
        if mistakes:
            everyone = [w for part in process_group.gather_objects(wrong) for w in part]
            res["mistakes"] = sorted(everyone, key=lambda w: -w[3])[:mistakes]
        return res, cm


def _most_confident_wrong(kept: list, scores: torch.Tensor, y: torch.Tensor, positions: torch.Tensor,
                          k: int) -> list[tuple[int, int, int, float]]:
    """The k most confident wrong predictions among `kept` and this batch (scores: logits or log-probabilities)."""
    probs = scores.float().softmax(1)
    conf, pred = probs.max(1)
    bad = (pred != y).nonzero().flatten().tolist()
    rows = [(int(positions[i]), int(y[i]), int(pred[i]), float(conf[i])) for i in bad]
    return sorted(kept + rows, key=lambda w: -w[3])[:k]


def stop_if_requested(env: process_group.DistEnv) -> None:
    """Collective: raise Interrupted on every rank when a stop signal reached any of them."""
    (stop,) = process_group.agree_any([interrupts.requested() is not None], env.device)
    if stop:
        raise Interrupted(interrupts.requested() or "a stop signal on another rank")


def _scores(models, x_u8: torch.Tensor, *, transform: BatchTransform, mode: str, class_maps) -> torch.Tensor:
    """Logits (one model, one view), or the log of class probabilities averaged over views and models."""
    if mode == "none" and len(models) == 1 and not class_maps:
        return models[0](transform.eval(x_u8)).float()
    probs = [tta.probabilities(m, x_u8, transform.eval, mode) for m in models]
    if class_maps:
        probs = [remap_probabilities(p, cmap) if cmap is not None else p for p, cmap in zip(probs, class_maps)]
    return tta.log_probabilities(tta.average(probs))
