"""Training batches for the steps a sampler plans: per step, this rank's (images, labels, mask) for
each micro-batch, on the training device. `mask` is False on a step's zero-weight fillers.

fast:    uint8 rows gathered from the decoded cache, augmented as whole batches on the device
         (augment.BatchTransform), keyed per sample so resume and world size do not change them.
classic: the seed's per-sample PIL + torchvision.transforms.v2 pipeline in a DataLoader.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .augment import BatchTransform, ClassicDataset, gather_uint8
from .data import Split
from .labels import training_targets
from .sampler import Step

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, mask


def train_batches(split: Split, steps: Iterable[Step], epoch: int, transform: BatchTransform, pipeline: str = "fast",
                  channels: int = 1, image_size: int = 64, seed: int = 0, num_workers: int = 0,
                  label_mode: str = "majority") -> Iterator[tuple[Step, list[Batch]]]:
    """Labels are class indices, or for FER+'s soft label modes a per-draw label (probability) or the
    vote distribution itself (crossentropy). Augmentation and label draws are keyed per draw."""
    steps = list(steps)
    device = transform.device

    def targets(y, idx, keys):
        return training_targets(split, y, idx, keys, label_mode, seed, epoch).to(device, non_blocking=True)

    if pipeline == "fast":
        for step in steps:
            out = []
            for j, (pos, mask) in enumerate(zip(step.micro_batches, step.masks())):
                x_u8, y, idx = gather_uint8(split, pos)
                keys = step.keys[j] if step.keys is not None else idx
                out.append((transform.train(x_u8, keys, epoch), targets(y, idx, keys), mask.to(device)))
            yield step, out
        return
    dataset = ClassicDataset(split, channels, image_size, True, seed)
    dataset.epoch = epoch
    micro = [m.tolist() for s in steps for m in s.micro_batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=micro, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    it = iter(loader)
    for step in steps:
        out = []
        for mask in step.masks():
            x, y, idx = next(it)
            out.append((x.to(device, non_blocking=True), targets(y, idx, idx), mask.to(device)))
        yield step, out
