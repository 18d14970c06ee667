"""Labels beyond one integer per image: class mappings between data sets (FER's 7 names and FER+'s 8),
soft targets (FER+ vote distributions) and their loss, and the per-draw label of FER+'s
`probability` mode as a pure function of (seed, epoch, draw)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from emotion_dist.data.augment import sample_uniforms

# the same emotion under the names data sets give it (FER / Kaggle folders -> FER+)
SYNONYMS = {"angry": "anger", "happy": "happiness", "sad": "sadness", "surprised": "surprise",
            "fearful": "fear", "disgusted": "disgust"}
HEAD_KEYS = ("classify.linear.weight", "classify.linear.bias")  # EmotionNet's class rows
LABEL_DRAW_SALT = 0x5EED1AB1  # keeps the label draw's uniforms apart from the augmentation's


def canonical(name: str) -> str:
    n = name.strip().lower()
    return SYNONYMS.get(n, n)


def class_mapping(src: Sequence[str], dst: Sequence[str]) -> list[Optional[int]]:
    """For each class of `dst`, the index of the same emotion in `src` (None where `src` lacks it).
    FER -> FER+: [6, 3, 5, 4, 0, 1, 2, None] (contempt has no FER counterpart)."""
    index = {canonical(c): i for i, c in enumerate(src)}
    return [index.get(canonical(c)) for c in dst]


def remap_rows(src: torch.Tensor, own: torch.Tensor, mapping: Sequence[Optional[int]]) -> torch.Tensor:
    """Rows of `own` (dst classes) replaced by the mapped rows of `src` (src classes); rows of
    classes `src` lacks keep `own`'s values (the fresh initialisation)."""
    out = own.detach().clone()
    for i, j in enumerate(mapping):
        if j is not None:
            out[i] = src[j].to(out.dtype)
    return out


def remap_head(state: dict, own: dict, *, src_classes: Sequence[str], dst_classes: Sequence[str],
               keys: Sequence[str] = HEAD_KEYS) -> dict:
    """A checkpoint's weights with its classification head's rows permuted onto `dst_classes`
    (model.init_from from a FER model into FER+ and back); other tensors are returned as they are."""
    mapping = class_mapping(src_classes, dst_classes)
    out = dict(state)
    for k in keys:
        if k in state and k in own and state[k].shape[0] == len(src_classes):
            out[k] = remap_rows(state[k], own[k], mapping)
    return out


def remap_probabilities(probs: torch.Tensor, mapping: Sequence[Optional[int]]) -> torch.Tensor:
    """N x K_src probabilities -> N x K_dst (a class `src` lacks gets 0): evaluate a model on a data
    set with other class names or order, e.g. an FER model on FER+ (it never predicts contempt)."""
    out = probs.new_zeros(probs.shape[0], len(mapping))
    for i, j in enumerate(mapping):
        if j is not None:
            out[:, i] = probs[:, j]
    return out


def training_targets(split, labels: torch.Tensor, idx: torch.Tensor, keys: torch.Tensor, *,
                     label_mode: str, seed: int, epoch: int) -> torch.Tensor:
    """What a training batch is scored against: the class indices, or with FER+ votes (split.soft)
    a label drawn from each image's distribution (probability) or the distribution (crossentropy)."""
    if split.soft is None or label_mode == "majority":
        return labels
    soft = torch.from_numpy(split.soft[idx.numpy()])
    return draw_labels(soft, keys, seed, epoch) if label_mode == "probability" else soft


def draw_labels(targets: torch.Tensor, keys: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """One class per row of `targets` (N x K distributions), drawn with their probabilities: FER+
    probability mode. A pure function of (seed, epoch, key) (key: the sample's draw key, see
    sampler.Step.keys), so the labels are the same on any world size and after a resume."""
    u = sample_uniforms(keys.cpu(), seed ^ LABEL_DRAW_SALT, epoch, 1)[:, 0].double()
    cdf = targets.detach().cpu().double().cumsum(1)
    # u scaled into [0, total): never lands on a zero-probability class, whatever the rounding
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
