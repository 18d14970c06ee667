"""The training loss: cross-entropy on logits (the seed took it on softmax outputs), with label
smoothing and optional class weights, summed over a micro-batch's real samples (zero-weight
fillers masked out); the step divides by the global sample count."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Criterion:
    """Targets are class indices (N), or distributions (N x K: FER+ crossentropy mode), for which
    torch's cross_entropy computes sum_c w_c t'_c (-log softmax)_c with the same smoothing."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: Optional[torch.Tensor] = None):
        self.label_smoothing, self.class_weights = label_smoothing, class_weights

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, targets, weight=self.class_weights,
                                     label_smoothing=self.label_smoothing, reduction="none")
        return torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
