"""The training loss: cross-entropy on logits (never on softmax outputs), with label
smoothing and optional class weights, summed over a micro-batch's real samples (zero-weight
fillers masked out); the step divides by the global sample count.

Class weights scale each sample's loss by its own class's weight (w_y). torch's
`cross_entropy(weight=...)` is not used for them: with label smoothing it also weights the smoothing
term's classes, sum_c w_c (eps/K)(-log p_c), so every image, whatever its class, is pulled towards
the rare classes. With FER's 1.5 % disgust (w = 9.5) that made the model answer "disgust" to
everything for the first epochs (tools/recipe/README.md, run R1).

Logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment") adds
tau x log(class prior) to the logits the loss sees. A rare class's logit is lowered in training
only, so the model learns a larger margin for it, and the plain logits used for prediction favour it
by the same amount: the loss is consistent for the balanced error, without reweighting samples."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Criterion:
    """Targets are class indices (N), or distributions (N x K: FER+ crossentropy mode), for which
    torch's cross_entropy computes sum_c w_c t'_c (-log softmax)_c with the same smoothing."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: Optional[torch.Tensor] = None,
                 logit_offsets: Optional[torch.Tensor] = None):
        self.label_smoothing, self.class_weights, self.logit_offsets = label_smoothing, class_weights, logit_offsets

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.logit_offsets is not None:  # the loss alone sees them: prediction keeps the plain logits
            logits = logits + self.logit_offsets.to(logits.dtype)
        per_sample = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction="none")
        if self.class_weights is not None:
            w = self.class_weights.to(per_sample.dtype)
            # a distribution's weight is its expected class weight
            per_sample = per_sample * (w[targets] if targets.dim() == 1 else targets.to(w.dtype) @ w)
        return torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
