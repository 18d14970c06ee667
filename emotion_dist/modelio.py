"""The checkpoint format and checkpoint-to-model loading that training and inference share: read a
file with torch.load(weights_only=True), say what it holds (CheckpointMeta), and build the EmotionNet
it describes. Checkpoints store no module paths, so files from every earlier version load.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from emotion_dist.errors import CheckpointError
from emotion_dist.model import EmotionNet
from emotion_dist.utils import filekind

FORMAT_VERSION = 1


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    what = filekind.require(path, accept=(filekind.TORCH,))  # a JPEG, text or .onnx: said so, not "pickled objects"
    try:
        state = read_hf_folder(path) if what == filekind.HF_FOLDER else torch.load(path, map_location="cpu",
                                                                                   weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains pickled objects that are not plain tensors/containers and was "
                f"refused (weights_only=True); re-save it from emotion-dist or export its state_dict"
            ) from None
        raise CheckpointError(f"checkpoint {path} is unreadable ({str(e)[:80]}); it may be truncated") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); it may be truncated") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path} is not an emotion-dist checkpoint (no model_state_dict)")
    version = state.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {path} has an invalid format_version {version!r}; it was not "
                              f"written by emotion-dist")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this emotion-dist ({FORMAT_VERSION}); upgrade emotion-dist"
        )
    return state


def read_hf_folder(path: Path) -> dict:
    """A folder from `export --format hf` as the state a checkpoint file gives: model.safetensors as
    model_state_dict, and the checkpoint metadata that config.json keeps under emotion_dist.checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text())
        meta = config["emotion_dist"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}/config.json is not one emotion-dist wrote (no emotion_dist.checkpoint block); "
                              f"write the folder again with emotion-dist export --format hf") from None
    try:
        weights = load_file(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}/model.safetensors is unreadable ({str(e)[:80]}); it may be truncated") from None
    return {**meta, "model_state_dict": weights}


def inference_weights(state: dict) -> dict:
    """The weights to evaluate, predict with and export: the EMA when training kept one."""
    return state.get("ema_state_dict") or state["model_state_dict"]


@dataclass
class CheckpointMeta:
    """What a checkpoint says about the model and how it was trained: written once per file,
    read by evaluate, predict, export and `ckpt inspect` through read_meta()."""

    classes: list
    image_size: int
    in_channels: int
    normalization: dict
    data_size: int  # the stored (decoded) image size the model was trained from
    label_mode: str = "majority"
    config: dict = field(default_factory=dict)
    world_size: int = 1
    num_nodes: int = 1
    strategy: str = "ddp"
    run_id: Optional[str] = None
    format_version: int = FORMAT_VERSION

    def to_state(self) -> dict:
        return {"class_names": list(self.classes), "image_size": self.image_size, "data_size": self.data_size,
                "in_channels": self.in_channels, "normalization": self.normalization, "label_mode": self.label_mode,
                "config": self.config, "world_size": self.world_size, "num_nodes": self.num_nodes,
                "strategy": self.strategy, "run_id": self.run_id, "format_version": self.format_version}


def read_meta(state: dict, path: str | os.PathLike = "checkpoint") -> CheckpointMeta:
    """The metadata of a loaded checkpoint; one line naming what is missing otherwise."""
    missing = [k for k in ("class_names", "image_size", "in_channels", "normalization") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} holds weights but not the metadata emotion-dist needs ({', '.join(missing)} missing); use a "
            f"checkpoint written by emotion-dist train (last.pt / best.pt), or start a run from these weights "
            f"with model.init_from={path}"
        )
    return CheckpointMeta(
        classes=list(state["class_names"]), image_size=int(state["image_size"]), in_channels=int(state["in_channels"]),
        normalization=state["normalization"], data_size=int(state.get("data_size", 48)),
        label_mode=state.get("label_mode", "majority"), config=state.get("config", {}),
        world_size=int(state.get("world_size", 1)), num_nodes=int(state.get("num_nodes", 1)),
        strategy=state.get("strategy", "ddp"), run_id=state.get("run_id"),
        format_version=int(state.get("format_version", 0)),
    )



def model_meta(meta: CheckpointMeta) -> dict:
    """The sidecar: what a consumer of the exported weights needs, with no emotion-dist around."""
    return {
        "format": "emotion-dist",
        "classes": meta.classes,
        "image_size": meta.image_size,
        "data_size": meta.data_size,
        "in_channels": meta.in_channels,
        "normalization": meta.normalization,
        "label_mode": meta.label_mode,
        "input": "float32 N x C x H x W, (pixel/255 - mean) / std",
        "output": "logits N x num_classes",
    }


def model_from_state(state: dict, path: str | Path) -> EmotionNet:
    """EmotionNet (eval mode) with a loaded checkpoint's inference weights (the EMA if kept)."""
    meta = read_meta(state, path)
    model = EmotionNet(meta.in_channels, len(meta.classes))
    try:
        model.load_state_dict(inference_weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit EmotionNet ({str(e).splitlines()[0][:120]})") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[EmotionNet, dict]:
    state = load_checkpoint(path)
    return model_from_state(state, path), model_meta(read_meta(state, path))
