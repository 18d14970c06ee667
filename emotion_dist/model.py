"""EmotionNet: a YOLO12-style classifier built from ultralytics blocks (Conv, C3k2, A2C2f, Classify).

`in_channels` (1 gray, 3 RGB) and `num_classes` come from the config, and the head returns logits
in train *and* eval mode: ultralytics' Classify returns `(softmax, logits)` in eval, and a loss taken
on its softmax output would be cross-entropy on probabilities.
"""

from __future__ import annotations

import sys

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from emotion_dist.config import InvalidImageSize, check_image_size  # noqa: F401  (torch-free, used by config)


def undo_ultralytics_patches() -> None:
    """Put back what importing ultralytics replaced process-wide (ultralytics/utils/patches.py,
    8.4): PIL.Image.open, which on a file PIL cannot identify would try to install pi-heif, and
    torch.save, which retries a failed write for 3.5 s (a full disk must fail at once, in one
    line). Idempotent; call it after any import of ultralytics."""
    import PIL.Image

    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is None:
        return
    if PIL.Image.open is getattr(patches, "image_open", None) and hasattr(patches, "_image_open"):
        PIL.Image.open = patches._image_open
    if torch.save is getattr(patches, "torch_save", None) and hasattr(patches, "_torch_save"):
        torch.save = patches._torch_save


def _logits_head(c1: int, num_classes: int) -> nn.Module:
    from ultralytics.nn.modules import Classify

    undo_ultralytics_patches()

    class ClassifyLogits(Classify):
        """ultralytics Classify that always returns logits."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))

    return ClassifyLogits(c1, num_classes)


class EmotionNet(nn.Module, PyTorchModelHubMixin, library_name="emotion-dist", pipeline_tag="image-classification",
                 tags=["facial-expression-recognition", "emotion-dist"]):
    """The Hub mixin makes the constructor's arguments (in_channels, num_classes) config.json and gives
    save_pretrained / from_pretrained (model.safetensors); emotion-dist's own metadata rides in the
    same config.json (inference/hub.py writes it, modelio reads it)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 7):
        super().__init__()
        from ultralytics.nn.modules import A2C2f, C3k2, Conv

        undo_ultralytics_patches()

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.backbone = nn.ModuleList(
            [
                Conv(in_channels, 16, k=3, s=2),  # 0-P1/2
                Conv(16, 32, k=3, s=2),  # 1-P2/4
                C3k2(32, 64, n=1, e=0.25),  # 2
                Conv(64, 128, k=3, s=2),  # 3-P3/8
                C3k2(128, 128, n=1, e=0.25),  # 4
                Conv(128, 128, k=3, s=2),  # 5-P4/16
                A2C2f(128, 128, n=2, a2=True, area=4, e=0.5),  # 6
                Conv(128, 256, k=3, s=2),  # 7-P5/32
                A2C2f(256, 256, n=2, a2=True, area=1, e=0.5),  # 8
            ]
        )
        self.classify = _logits_head(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.backbone:
            x = layer(x)
        return self.classify(x)


def build_model(in_channels: int, num_classes: int, image_size: int) -> EmotionNet:
    check_image_size(image_size)
    if in_channels not in (1, 3):
        raise ValueError(f"model.in_channels={in_channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    return EmotionNet(in_channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
