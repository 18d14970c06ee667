"""Classification metrics from a confusion matrix, and the plots made from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emotion_dist.utils.fsutil import atomic_write_bytes


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows = true class, columns = predicted class (int64, on the inputs' device)."""
    flat = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(cm: np.ndarray | torch.Tensor, classes: list[str]) -> dict:
    cm = np.asarray(cm.cpu() if torch.is_tensor(cm) else cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "count": int(total),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray | torch.Tensor, classes: list[str], path: Path, title: str = "") -> None:
    """Each cell: the fraction of the true class (the colour) over the image count."""
    plt = _pyplot()
    cm = np.asarray(cm.cpu() if torch.is_tensor(cm) else cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.2, 6.2), dpi=100)
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or "confusion matrix")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, label="fraction of the true class (count below)")
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)  # else pyplot keeps every figure: one more per epoch


def plot_curves(history: list[dict], path: Path, best_epoch: int = -1) -> None:
    """Loss, accuracy, macro-F1 (train and validation) and the learning rate per epoch, with a mark
    at the best epoch (the one best.pt holds)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=100)
    try:
        for ax, key in zip(axes, ("loss", "accuracy", "macro_f1", "lr")):
            names = [key] if key == "lr" else [f"{split}_{key}" for split in ("train", "val")]
            for name in names:
                ys = [h.get(name) for h in history]
                if any(y is not None for y in ys):
                    ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o",
                            label=name.split("_")[0] if key != "lr" else "lr")
            if best_epoch > 0:
                ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1,
                           label=f"best (epoch {best_epoch})")
            ax.set_title("learning rate" if key == "lr" else key)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_image_grid(images: np.ndarray, captions: list[str], path: Path, title: str, columns: int = 8) -> None:
    """uint8 images (N x C x H x W, C 1 or 3) in a grid, each with its caption."""
    plt = _pyplot()
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), dpi=100, squeeze=False)
    try:
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k >= n:
                continue
            img = images[k]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)))
            ax.set_title(captions[k], fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
