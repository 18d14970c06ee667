"""A checkpoint whose answers depend on the picture, written in-process in a second.

write_checkpoint()'s model at its random initialisation gives nearly the same logits for every
input (BatchNorm's running statistics are still 0 and 1), which would let an agreement figure, a
class-activation map or "same answer as the .pt" pass for any model. Here the BatchNorm statistics
are measured on smooth random pictures (normalised as training does) and the head is rescaled so
the logits spread by about 2:
still untrained, but every input gets its own answer. For an ONNX export pass a small `spread`
(0.01): on the parity check's noise inputs such an untrained net amplifies float rounding, and its
1e-4 bound holds only when the logits are that small.
"""

from pathlib import Path

import torch
from conftest import write_checkpoint


def lively_checkpoint(path: Path, *, in_channels: int = 1, image_size: int = 64, seed: int = 0, spread: float = 2.0,
                      **fields) -> Path:
    from emotion_dist.model import EmotionNet

    torch.manual_seed(seed)
    model = EmotionNet(in_channels, 7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    g = torch.Generator().manual_seed(seed)
    shape = (16, in_channels, image_size, image_size)
    pictures = [(torch.nn.functional.avg_pool2d(torch.rand(shape, generator=g), 5, 1, 2) - 0.45) / 0.23
                for _ in range(4)]
    model.train()
    with torch.no_grad():
        for x in pictures:
            model(x)
        model.eval()
        logits = torch.cat([model(x) for x in pictures])
        linear = model.classify.linear
        scale = spread / logits.std(0).clamp_min(1e-6)
        linear.weight.mul_(scale[:, None])
        linear.bias.copy_(linear.bias * scale - logits.mean(0) * scale)
    return write_checkpoint(path, in_channels=in_channels, image_size=image_size, seed=seed,
                            model_state_dict=model.state_dict(), **fields)
