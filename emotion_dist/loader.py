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
from .sampler import Step

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, mask


def train_batches(split: Split, steps: Iterable[Step], epoch: int, transform: BatchTransform, pipeline: str = "fast",
                  channels: int = 1, image_size: int = 64, seed: int = 0, num_workers: int = 0) -> Iterator[tuple[Step, list[Batch]]]:
    steps = list(steps)
    device = transform.device
    if pipeline == "fast":
        for step in steps:
            out = []
            for pos, mask in zip(step.micro_batches, step.masks()):
                x_u8, y, idx = gather_uint8(split, pos)
                out.append((transform.train(x_u8, idx, epoch), y.to(device, non_blocking=True), mask.to(device)))
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
            x, y, _ = next(it)
            out.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True), mask.to(device)))
        yield step, out
