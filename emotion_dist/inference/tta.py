"""Test-time augmentation and ensembles, as FER papers evaluate: class probabilities (softmax)
averaged over views of each image and over models.

- none:    the image as it is;
- flip:    the image and its mirror (2 views);
- tencrop: the four corner crops and the centre crop, CROP_OF_48 of 48 px (the same fraction of the
           decoded image at other sizes), and the mirrors of the five (10 views; torchvision's
           ten_crop). Each view is cropped from the decoded uint8 image and then prepared like any
           evaluation batch, i.e. scaled to data.image_size by bilinear interpolation and normalized
           (BatchTransform.eval): at image_size 96 a 40 px crop is enlarged 2.4x, the full image 2x.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

TTA_MODES = ("none", "flip", "tencrop")
CROP_OF_48 = 40


def crop_size(side: int) -> int:
    """The ten-crop side for a decoded image of `side` px: 40 at 48, the same fraction elsewhere."""
    return max(1, round(side * CROP_OF_48 / 48))


def views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """N x C x H x W images (uint8 or float) -> the TTA views, each N x C x h x w."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, torch.flip(x, dims=[-1])]
    if tta == "tencrop":
        from torchvision.transforms.v2 import functional as TF

        c = crop_size(x.shape[-1])
        # 5 crops, then the 5 crops of the mirrored image; contiguous, as pin_memory and the copy to the device want
        return [v.contiguous() for v in TF.ten_crop(x, [c, c])]
    raise ValueError(f"tta={tta!r} is invalid; allowed: {', '.join(TTA_MODES)}")


def describe(tta: str, data_size: int, image_size: int) -> str:
    """What a report says about its TTA."""
    if tta == "none":
        return f"none (one view: {data_size} px scaled to {image_size})"
    if tta == "flip":
        return (f"flip (2 views: the image and its mirror, {data_size} px scaled to {image_size}; "
                "probabilities averaged)")
    c = crop_size(data_size)
    return (f"tencrop (10 views: 4 corner + centre crops of {c}x{c} of {data_size}x{data_size} px and their mirrors, "
            f"each scaled to {image_size}x{image_size} bilinear; probabilities averaged)")


def probabilities(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  prepare: Callable[[torch.Tensor], torch.Tensor], tta: str = "none") -> torch.Tensor:
    """Softmax probabilities (N x K, float32) averaged over the TTA views of x. `prepare` turns a
    uint8 view into the model's input (BatchTransform.eval). One forward per view: every rank runs
    the same number of forwards, as FSDP needs."""
    out = None
    vs = views(x, tta)
    for v in vs:
        p = model(prepare(v)).float().softmax(1)
        out = p if out is None else out + p
    return out / len(vs)


def ensemble(models: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
             prepare: Callable[[torch.Tensor], torch.Tensor], tta: str = "none") -> torch.Tensor:
    """Probabilities averaged over models (each with the same TTA): an ensemble's prediction."""
    return average([probabilities(m, x, prepare, tta) for m in models])


def average(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of several N x K probability tensors."""
    return torch.stack(list(probs)).mean(0)


def log_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """log of averaged probabilities, for F.cross_entropy / F.nll_loss (softmax of it gives probs back)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
