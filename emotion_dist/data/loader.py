"""Training batches for the steps a sampler plans: per step, this rank's (images, labels, mask) for
each micro-batch, on the training device. `mask` is False on a step's zero-weight fillers.

fast:    uint8 rows gathered from the decoded cache, augmented as whole batches on the device
         (augment.BatchTransform), keyed per sample so resume and world size do not change them.
         With data.on_device the rows are resident on the device (augment.DeviceSplit) and the
         epoch's positions, masks and keys are copied there once: no step copies host to device.
classic: per-sample PIL + torchvision.transforms.v2 in a DataLoader (the reference pipeline the
         fast one is checked and timed against).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from emotion_dist.config import DataConfig
from emotion_dist.data.augment import BatchTransform, ClassicDataset, DeviceSplit, gather_uint8
from emotion_dist.data.datasets import Split
from emotion_dist.data.labels import training_targets
from emotion_dist.data.sampler import Step
from emotion_dist.errors import DataError

log = logging.getLogger("emotion_dist")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, mask


def device_memory(device: torch.device) -> int:
    """Bytes of memory on the device (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def place_on_device(split: Split, data: DataConfig, device: torch.device) -> Optional[DeviceSplit]:
    """data.on_device: the training split resident on the device, or None (gathered on the host).
    auto keeps it there on CUDA when it fits in data.on_device_max_fraction of the device's memory;
    on the CPU the memory map is already where the step reads, so auto leaves it be."""
    need, total = DeviceSplit.nbytes(split), device_memory(device)
    fits = need <= data.on_device_max_fraction * total
    what = (f"{len(split)} training images, {need / 2**20:.1f} MB = {need / total:.2%} of {device}'s "
            f"{total / 2**30:.1f} GB")
    if data.on_device == "true" and not fits:
        raise DataError(f"data.on_device=true: {what}, more than data.on_device_max_fraction="
                        f"{data.on_device_max_fraction:g}; raise the fraction or use data.on_device=auto")
    if data.on_device == "false" or data.pipeline != "fast" or (data.on_device == "auto" and
                                                                (device.type != "cuda" or not fits)):
        return None
    log.info("data.on_device=%s: %s resident on the device", data.on_device, what)
    return DeviceSplit(split, device)


@dataclass(frozen=True)
class BatchSource:
    """How an epoch's training batches are made: built once (training/build.py) from the config and
    the data; the loop and `bench` ask it for the batches of the steps a sampler plans. bench derives
    its variants (the classic pipeline) with dataclasses.replace.

    Labels are class indices, or for FER+'s soft label modes a per-draw label (probability) or the
    vote distribution itself (crossentropy). Augmentation and label draws are keyed per draw.
    `resident` (from place_on_device): the fast pipeline gathers its batches on the device."""

    split: Split
    transform: BatchTransform
    pipeline: str = "fast"
    channels: int = 1
    image_size: int = 64
    seed: int = 0
    num_workers: int = 0
    label_mode: str = "majority"
    resident: Optional[DeviceSplit] = None

    def epoch(self, steps: Iterable[Step], epoch: int) -> Iterator[tuple[Step, list[Batch]]]:
        steps = list(steps)
        if self.pipeline == "fast" and self.resident is not None:
            return _resident_batches(self.resident, steps, epoch=epoch, transform=self.transform,
                                     targets=self._targets(epoch))
        if self.pipeline == "fast":
            return self._host_batches(steps, epoch)
        return self._classic_batches(steps, epoch)

    def _targets(self, epoch: int):
        split, device = self.split, self.transform.device

        def targets(y, idx, keys):
            if split.soft is None or self.label_mode == "majority":  # class indices, wherever they are
                return y.to(device, non_blocking=True)
            # FER+'s soft modes read the votes on the host (labels.training_targets)
            return training_targets(split, y.cpu(), idx.cpu(), keys.cpu(), label_mode=self.label_mode,
                                    seed=self.seed, epoch=epoch).to(device)

        return targets

    def _host_batches(self, steps: list[Step], epoch: int) -> Iterator[tuple[Step, list[Batch]]]:
        targets, device = self._targets(epoch), self.transform.device
        for step in steps:
            out = []
            for j, (pos, mask) in enumerate(zip(step.micro_batches, step.masks())):
                x_u8, y, idx = gather_uint8(self.split, pos)
                keys = step.keys[j] if step.keys is not None else idx
                out.append((self.transform.train(x_u8, keys, epoch), targets(y, idx, keys), mask.to(device)))
            yield step, out

    def _classic_batches(self, steps: list[Step], epoch: int) -> Iterator[tuple[Step, list[Batch]]]:
        targets, device = self._targets(epoch), self.transform.device
        dataset = ClassicDataset(self.split, channels=self.channels, size=self.image_size, train=True,
                                 seed=self.seed, strength=self.transform.strength(epoch))
        dataset.epoch = epoch
        micro = [m.tolist() for s in steps for m in s.micro_batches]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=micro, num_workers=self.num_workers,
                                             pin_memory=device.type == "cuda")
        it = iter(loader)
        for step in steps:
            out = []
            for mask in step.masks():
                x, y, idx = next(it)
                out.append((x.to(device, non_blocking=True), targets(y, idx, idx), mask.to(device)))
            yield step, out


def _resident_batches(resident: DeviceSplit, steps: list[Step], *, epoch: int, transform: BatchTransform,
                      targets) -> Iterator[tuple[Step, list[Batch]]]:
    if not steps:
        return
    dev = resident.device
    # one copy each for the whole epoch (a sampler keys all its steps alike: by draw, or by dataset index)
    positions = torch.cat([m for s in steps for m in s.micro_batches]).to(dev)
    masks = torch.cat([mask for s in steps for mask in s.masks()]).to(dev)
    keys = torch.cat([k for s in steps for k in s.keys]).to(dev) if steps[0].keys is not None else None
    start = 0
    for step in steps:
        out = []
        for m in step.micro_batches:
            span = slice(start, start + len(m))
            start += len(m)
            x_u8, y, idx = resident.gather(positions[span])
            key = idx if keys is None else keys[span]
            out.append((transform.train(x_u8, key, epoch), targets(y, idx, key), masks[span]))
        yield step, out
