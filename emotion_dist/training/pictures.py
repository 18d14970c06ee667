"""The pictures a run writes into its run directory (rank 0), each also sent to TensorBoard and W&B:
`curves.png` and `confusion_val.png` every epoch, `train_batch.png` (the run's first augmented batch
as the model sees it) once, and `val_errors.png` (the most confident validation mistakes of the
best epoch) whenever the best epoch changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emotion_dist.data.augment import BatchTransform, gather_uint8
from emotion_dist.data.datasets import Split
from emotion_dist.training.metrics import plot_confusion, plot_curves, plot_image_grid

TRAIN_BATCH_IMAGES = 32
VAL_ERRORS = 24  # the mistakes val_errors.png shows


def save_epoch_plots(logger, run_dir: Path, *, history: list[dict], cm: torch.Tensor, classes: list[str],
                     best_epoch: int) -> None:
    """The learning curves (with the learning rate and the best epoch) and the validation confusion
    matrix, rewritten each epoch."""
    logger.best_effort(plot_curves, history, Path(run_dir) / "curves.png", best_epoch)
    logger.best_effort(plot_confusion, cm.cpu(), classes, Path(run_dir) / "confusion_val.png", "validation")
    logger.image("confusion_val", Path(run_dir) / "confusion_val.png")


def save_train_batch(logger, run_dir: Path, *, x: torch.Tensor, y: torch.Tensor, transform: BatchTransform,
                     classes: list[str]) -> None:
    """The first augmented batch, undone to pixels (the normalisation only), with its labels."""
    n = min(len(x), TRAIN_BATCH_IMAGES)
    pixels = (x[:n].float() * transform.std + transform.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    hard = y[:n].argmax(1) if y.is_floating_point() else y[:n]  # soft targets: their top class
    path = Path(run_dir) / "train_batch.png"
    logger.best_effort(plot_image_grid, pixels.cpu().numpy(), [classes[int(c)] for c in hard.cpu()], path,
                       "the first training batch, augmented, as the model sees it")
    logger.image("train_batch", path)


def save_val_errors(logger, run_dir: Path, *, split: Split, mistakes: list, classes: list[str], epoch: int) -> None:
    """The most confident validation mistakes: true -> predicted (probability)."""
    path = Path(run_dir) / "val_errors.png"
    if not mistakes:
        return
    images, _, _ = gather_uint8(split, torch.tensor([m[0] for m in mistakes], dtype=torch.int64))
    captions = [f"{classes[t]} -> {classes[p]}\n{conf:.2f}" for _, t, p, conf in mistakes]
    logger.best_effort(plot_image_grid, np.asarray(images), captions, path,
                       f"most confident validation mistakes, epoch {epoch} (true -> predicted, probability)")
    logger.image("val_errors", path)
