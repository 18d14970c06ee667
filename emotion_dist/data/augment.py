"""Augmentation keyed per sample by (seed, epoch, index), never by rank or worker, so the data
stream is the same on any world size and after any resume.

fast:    whole batches of uint8 images on the training device; one affine grid_sample does
         resize + random crop/scale + flip + rotation, then brightness/contrast and normalization.
classic: a per-sample PIL pipeline with torchvision.transforms.v2 (no vertical flip:
         upside-down faces are not a plausible input).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from emotion_dist.data.datasets import Split, normalization

MASK32 = 0xFFFFFFFF
ROTATION_DEG = 15.0
CROP_MIN = 0.80  # crop side as a fraction of the image (the classic pipeline: 224 of 256 = 0.875)
JITTER = 0.2  # brightness/contrast factor range 1 +- JITTER


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 holding 32-bit values; identical on every device."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def sample_uniforms(index: torch.Tensor, seed: int, epoch: int, k: int) -> torch.Tensor:
    """k uniforms in [0, 1) per sample, a pure function of (seed, epoch, index)."""
    base = _mix32(torch.full_like(index, (seed * 0x9E3779B1 + epoch * 0x85EBCA77) & MASK32))
    x = _mix32(index.to(torch.int64) * 0x27D4EB2F + base)
    cols = [_mix32(x + j * 0x165667B1) for j in range(k)]
    return torch.stack(cols, 1).to(torch.float64).div(2**32).to(torch.float32)


def augment_strength(epoch: int, warmup_epochs: float) -> float:
    """Augmentation warm-up (train.augment_warmup_epochs): the magnitude rises linearly from none
    in epoch 0 to full after `warmup_epochs` epochs. A curriculum, as EfficientNetV2's progressive
    learning (weak regularization first): on clean images the network finds the faces' features in
    its first epoch instead of its third (tools/recipe/README.md, AW1). A function of the epoch alone, so the
    stream stays the same on any world size and after any resume."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


def augment_params(index: torch.Tensor, seed: int, epoch: int, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-sample draws; `strength` scales every magnitude (and the flip probability), not the draws."""
    u = sample_uniforms(index, seed, epoch, 7)
    crop_min = 1 - (1 - CROP_MIN) * strength
    return {
        "flip": u[:, 0] < 0.5 * strength,
        "angle": (u[:, 1] * 2 - 1) * ROTATION_DEG * strength,
        "crop": crop_min + u[:, 2] * (1 - crop_min),
        "cx": u[:, 3] * 2 - 1,  # crop centre, in units of the free margin
        "cy": u[:, 4] * 2 - 1,
        "brightness": 1 + (u[:, 5] * 2 - 1) * JITTER * strength,
        "contrast": 1 + (u[:, 6] * 2 - 1) * JITTER * strength,
    }


class BatchTransform:
    """uint8 N x C x S x S (any device) -> normalized float N x C x size x size on `device`."""

    def __init__(self, channels: int, size: int, device: torch.device,
                 seed: int, *, augment_warmup_epochs: float = 0.0):
        mean, std = normalization(channels)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.size, self.device, self.seed = size, device, seed
        self.augment_warmup_epochs = augment_warmup_epochs

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.device:  # gathered on the device already (data.on_device)
            return x
        if self.device.type == "cuda":
            x = x.pin_memory()  # so the copy is asynchronous
        return x.to(self.device, non_blocking=True)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_device(x).float().div_(255)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def strength(self, epoch: int) -> float:
        return augment_strength(epoch, self.augment_warmup_epochs)

    def train(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """`index`: each sample's augmentation key; on the device, its parameters are drawn there."""
        strength = self.strength(epoch)
        if strength == 0:
            return self.eval(x)
        x = self._to_device(x).float().div_(255)
        p = {k: v.to(self.device) for k, v in augment_params(index, self.seed, epoch, strength).items()}
        n = x.shape[0]
        a = p["angle"] * (math.pi / 180)
        s = p["crop"]
        margin = 1 - s
        sx = torch.where(p["flip"], -s, s)
        cos, sin = torch.cos(a), torch.sin(a)
        # output -> input sampling grid: rotate, scale to the crop, flip, shift to the crop centre
        theta = torch.stack(
            [
                torch.stack([sx * cos, -s * sin, p["cx"] * margin], 1),
                torch.stack([sx * sin, s * cos, p["cy"] * margin], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = x * p["brightness"].view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * p["contrast"].view(-1, 1, 1, 1) + mean).clamp_(0, 1)
        return (x - self.mean) / self.std


def gather_uint8(split: Split, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions within the split -> (uint8 images, labels, dataset indices) as CPU tensors."""
    idx = split.index[positions.numpy()]
    order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the memory map
    images = np.empty((len(idx),) + split.images.shape[1:], dtype=np.uint8)
    images[order] = split.images[idx[order]]
    return torch.from_numpy(images), torch.from_numpy(split.labels[idx]), torch.from_numpy(idx)


class DeviceSplit:
    """A split's decoded uint8 images, labels and dataset indices resident on one device, in split
    order (data.on_device): a batch is gathered there from positions already there, with no
    host-to-device copy. The same bytes as gather_uint8, so training is the same either way."""

    def __init__(self, split: Split, device: torch.device):
        rows = np.ascontiguousarray(split.images[split.index])  # the split's rows, read from the memory map once
        self.images = torch.from_numpy(rows).to(device)
        self.labels = torch.from_numpy(np.asarray(split.labels[split.index], dtype=np.int64)).to(device)
        self.index = torch.from_numpy(np.asarray(split.index, dtype=np.int64)).to(device)
        self.device = device

    @staticmethod
    def nbytes(split: Split) -> int:
        return len(split) * int(np.prod(split.images.shape[1:]))

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions within the split (on the device) -> (uint8 images, labels, dataset indices) there."""
        return self.images.index_select(0, positions), self.labels[positions], self.index[positions]


class ClassicDataset(torch.utils.data.Dataset):
    """The classic per-sample pipeline: PIL decode from disk + torchvision.transforms.v2."""

    def __init__(self, split: Split, *, channels: int, size: int, train: bool, seed: int, strength: float = 1.0):
        """`strength`: augment_strength of the epoch this dataset serves (one is built per epoch)."""
        from torchvision.transforms import v2

        mean, std = normalization(channels)
        self.split, self.channels, self.seed = split, channels, seed
        self.augment = train and strength > 0  # a clean warm-up epoch is the evaluation transform
        self.epoch = 0
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if self.augment:
            resized = round(size / (1 - 0.125 * strength))  # full strength: crop 224 of 256, ImageNet's ratio
            self.transform = v2.Compose(
                [
                    v2.Resize((resized, resized), antialias=True),
                    v2.RandomCrop(size),
                    v2.RandomHorizontalFlip(0.5 * strength),
                    v2.RandomRotation(ROTATION_DEG * strength),
                    v2.ColorJitter(brightness=JITTER * strength, contrast=JITTER * strength),
                    *tail,
                ]
            )
        else:
            self.transform = v2.Compose([v2.Resize((size, size), antialias=True), *tail])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int):
        from PIL import Image

        i = int(self.split.index[position])
        with Image.open(self.split.files[i]) as f:  # decoded per sample: what the fast path's cache saves
            img = f.convert("L" if self.channels == 1 else "RGB")
        if self.augment:
            # v2 draws from torch's global RNG: key it per sample, restoring the caller's stream
            key = int(sample_uniforms(torch.tensor([i]), self.seed, self.epoch, 1)[0, 0] * 2**31)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                x = self.transform(img)
        else:
            x = self.transform(img)
        return x, int(self.split.labels[i]), i
