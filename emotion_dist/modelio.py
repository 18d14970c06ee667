"""The checkpoint format and checkpoint-to-model loading that training and inference share: read a
file with torch.load(weights_only=True), say what it holds (CheckpointMeta), and build the EmotionNet
it describes. Checkpoints store no module paths, so files from every earlier version load.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from emotion_dist.config import apply_overrides, config_from_dict, parse_face_crop, validate
from emotion_dist.errors import CheckpointError, ConfigError
from emotion_dist.model import EmotionNet
from emotion_dist.modelmeta import (
    CHANNELS,
    channel_problems,
    class_problems,
    meta_problems,
    short,
    size_problems,
    type_name,
)
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
            f"checkpoint {path} has format version {version}, "
            f"newer than this emotion-dist ({FORMAT_VERSION}); upgrade emotion-dist"
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
    # where the face sits in the training crops (config.FaceCrop as a dict); None: the run's data.face_crop
    face_crop: Optional[dict] = None

    def __post_init__(self):
        if self.face_crop is None:
            self.face_crop = face_crop_of(self.config)

    def to_state(self) -> dict:
        return {"class_names": list(self.classes), "image_size": self.image_size, "data_size": self.data_size,
                "in_channels": self.in_channels, "normalization": self.normalization, "label_mode": self.label_mode,
                "config": self.config, "world_size": self.world_size, "num_nodes": self.num_nodes,
                "strategy": self.strategy, "run_id": self.run_id, "format_version": self.format_version,
                "face_crop": self.face_crop}


METADATA_KEYS = ("class_names", "image_size", "in_channels", "normalization")
FIRST_CONV, HEAD = "backbone.0.conv.weight", "classify.linear.weight"  # they fix in_channels and the class count
WEIGHT_KEYS = ("model_state_dict", "ema_state_dict")


FIX = ("the file was edited or damaged: use the checkpoint as emotion-dist train wrote it "
       "(runs/NAME/checkpoints/best.pt)")


def require_metadata(state: dict, path) -> None:
    """One line when a file holds weights but none of the metadata a model is built from."""
    missing = [k for k in METADATA_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} holds weights but not the metadata emotion-dist needs ({', '.join(missing)} missing); use a "
            f"checkpoint written by emotion-dist train (last.pt / best.pt), or start a run from these weights "
            f"with model.init_from={path}"
        )


def _trained_size(state: dict) -> str:
    """The run's data.image_size, as a hint for an image_size that was changed afterwards."""
    config = state.get("config")
    size = config.get("data", {}).get("image_size") if isinstance(config, dict) and isinstance(
        config.get("data"), dict) else None
    return f"; its training config says data.image_size={size}" if not size_problems(size) else ""


def checkpoint_findings(state: dict, path: str | os.PathLike = "checkpoint") -> list[str]:
    """Everything wrong with a loaded checkpoint (empty: fit to build, run, export and resume from),
    each one line naming the key and the fix: its metadata as plain values (modelmeta), then each
    weight dict's types and shapes against the EmotionNet the metadata describes, then NaN/inf.
    A file with no metadata at all raises (require_metadata): nothing else can be checked."""
    require_metadata(state, path)
    where, fix = f"checkpoint {path}", FIX
    findings = [f"{where}: {p}{_trained_size(state) if p.startswith('image_size=') else ''}; {fix}"
                for p in meta_problems(state, classes_key="class_names", data_size_required=False)]
    findings += [f"{where}: {p}; {fix}" for p in config_problems(state.get("config", {}))]
    classes, channels = state.get("class_names"), state.get("in_channels")
    n_classes = len(classes) if not class_problems(classes, "class_names") else None
    channels = channels if not channel_problems(channels) else None
    # the weights inference runs (the EMA when kept) first: the metadata is compared with them, and
    # the model they show is the reference for the other dict (so a mismatch is reported once)
    keys = ["ema_state_dict", "model_state_dict"] if state.get("ema_state_dict") else ["model_state_dict"]
    reference = None
    for key in keys:
        problems, reference = weight_problems(state[key], key, n_classes=n_classes, channels=channels, path=path,
                                              reference=reference)
        findings += [f"{where}: {p}" for p in problems]
    return findings


def config_problems(config) -> list[str]:
    """The training run's settings, which evaluate and `ckpt inspect` rebuild a Config from."""
    if not isinstance(config, dict):
        return [f"config is {type_name(config)} ({short(config)}), not the training run's settings (a dict)"]
    try:
        config_from_dict(config)
    except ConfigError as e:
        return [f"config holds an invalid setting ({e})"]
    return []


def _shape(t) -> str:
    return f"({', '.join(str(d) for d in t.shape)})"


def _listed(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


@functools.lru_cache(maxsize=8)
def reference_shapes(in_channels: int, num_classes: int) -> dict[str, tuple]:
    """The tensor names and shapes of EmotionNet(in_channels, num_classes), built on the meta device
    (no memory, no init): what a checkpoint's weights are compared with before load_state_dict."""
    with torch.device("meta"):
        model = EmotionNet(in_channels, num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def weight_problems(weights, key: str, *, n_classes: Optional[int], channels: Optional[int], path,
                    reference: Optional[tuple[int, int]] = None) -> tuple[list[str], Optional[tuple[int, int]]]:
    """One weight dict (model_state_dict or ema_state_dict) against the EmotionNet the metadata
    describes: a dict of tensors, the head's class count and the first conv's channels as the
    metadata says, every tensor present with the model's shape (all of them named in one line),
    and every float tensor finite. Returns the problems and the (in_channels, classes) it was
    compared with; given a `reference`, the metadata is not compared again and that model is used."""
    fix = FIX
    if not isinstance(weights, dict):
        return [f"{key} is {type_name(weights)} ({short(weights)}), not a dict of tensors; {fix}"], reference
    wrong = [k for k, v in weights.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if wrong:
        k = wrong[0]
        return [f"{key}[{short(k)}] is {type_name(weights[k])}, not a tensor"
                f"{f' ({len(wrong)} entries are not tensors)' if len(wrong) > 1 else ''}; {fix}"], reference
    problems = []
    if reference is None:
        head, conv = weights.get(HEAD), weights.get(FIRST_CONV)
        heads = head.shape[0] if head is not None and head.ndim == 2 and head.shape[0] > 0 else None
        takes = conv.shape[1] if conv is not None and conv.ndim == 4 else None
        if heads is not None and n_classes is not None and heads != n_classes:
            problems.append(f"class_names lists {n_classes} classes but {key} has a {heads}-way head ({HEAD} "
                            f"{_shape(head)}); class_names must name the head's {heads} outputs in order (the "
                            f"classes it was trained on); to train on other classes, fine-tune with "
                            f"model.init_from={path}")
        if takes is not None and channels is not None and takes != channels:
            problems.append(f"in_channels={channels} but {key}'s first convolution takes {takes} channel(s) "
                            f"({FIRST_CONV} {_shape(conv)}); set in_channels={takes} ({CHANNELS.get(takes, '?')}), "
                            f"the channels it was trained with")
        # the metadata's model, with the class count and channels the weights themselves show when
        # those were reported above (so one wrong key is not reported again as wrong shapes)
        reference = (takes if takes in CHANNELS else channels or 1, heads or n_classes or 7)
    ref_channels, ref_classes = reference
    ref = reference_shapes(ref_channels, ref_classes)
    missing = [k for k in ref if k not in weights]
    unexpected = [k for k in weights if k not in ref]
    shapes = [f"{k} is {_shape(weights[k])} where the model has ({', '.join(map(str, ref[k]))})"
              for k in ref if k in weights and tuple(weights[k].shape) != ref[k]]
    if missing or unexpected or shapes:
        parts = shapes[:4] + ([f"+{len(shapes) - 4} more of another shape"] if len(shapes) > 4 else [])
        parts += [f"missing {_listed(missing)}"] if missing else []
        parts += [f"unexpected {_listed(unexpected)}"] if unexpected else []
        problems.append(f"{key} does not fit EmotionNet(in_channels={ref_channels}, {ref_classes} classes): "
                        f"{'; '.join(parts)}; {fix} (a model of another architecture cannot be loaded; "
                        f"model.init_from={path} loads the tensors that fit)")
    bad = [k for k, v in weights.items() if (v.is_floating_point() or v.is_complex()) and not bool(
        torch.isfinite(v).all())]
    if bad:
        what = "NaN" if bool(torch.isnan(weights[bad[0]]).any()) else "inf"
        problems.append(f"{key} holds non-finite weights: {what} in {bad[0]}"
                        f"{f' and {len(bad) - 1} more tensor(s)' if len(bad) > 1 else ''}; the run diverged or "
                        f"the file was damaged: use an earlier checkpoint of the run (checkpoints/step-*.pt, "
                        f"checked with emotion-dist ckpt inspect) or train again with a lower train.lr")
    return problems, reference


def check_checkpoint(state: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Raise the first finding of checkpoint_findings as one line (the others: `ckpt inspect`)."""
    findings = checkpoint_findings(state, path)
    if findings:
        more = f" ({len(findings) - 1} more: emotion-dist ckpt inspect {path})" if len(findings) > 1 else ""
        raise CheckpointError(findings[0] + more)


def read_meta(state: dict, path: str | os.PathLike = "checkpoint") -> CheckpointMeta:
    """The metadata of a loaded checkpoint, once the whole file has been checked (check_checkpoint):
    everything that builds, runs, exports or resumes a model reads it here; one line otherwise."""
    check_checkpoint(state, path)
    return CheckpointMeta(
        classes=list(state["class_names"]), image_size=state["image_size"], in_channels=state["in_channels"],
        normalization=state["normalization"], data_size=state.get("data_size", 48),
        label_mode=state.get("label_mode", "majority"), config=state.get("config", {}),
        world_size=int(state.get("world_size", 1)), num_nodes=int(state.get("num_nodes", 1)),
        strategy=state.get("strategy", "ddp"), run_id=state.get("run_id"),
        format_version=int(state.get("format_version", 0)),
        face_crop=state.get("face_crop") or face_crop_of(state.get("config", {}), path),
    )


def face_crop_of(config: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The crop geometry a run's config names; checkpoints from before the key hold the default."""
    data = config.get("data") if isinstance(config, dict) else None
    try:
        return parse_face_crop(data.get("face_crop") if isinstance(data, dict) else None).to_dict()
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config's {e}") from None


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
        "face_crop": meta.face_crop,
        "input": "float32 N x C x H x W, (pixel/255 - mean) / std",
        "output": "logits N x num_classes",
    }


def model_from_state(state: dict, path: str | Path) -> EmotionNet:
    """EmotionNet (eval mode) with a loaded checkpoint's inference weights (the EMA if kept), once
    read_meta has checked every key, shape and value."""
    meta = read_meta(state, path)
    model = EmotionNet(meta.in_channels, len(meta.classes))
    try:
        model.load_state_dict(inference_weights(state))
    except RuntimeError as e:  # not expected after the checks; still one line, never torch's page
        raise CheckpointError(f"{path}: weights do not fit EmotionNet ({str(e).splitlines()[0][:120]})") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[EmotionNet, dict]:
    """A checked checkpoint file as an EmotionNet (eval mode) and its sidecar metadata."""
    state = load_checkpoint(path)
    model = model_from_state(state, path)
    return model, model_meta(read_meta(state, path))


def recorded_data(checkpoint: str | os.PathLike) -> list[tuple[str, Path]]:
    """The data the checkpoint was trained on, as its config records it (data.root, data.ferplus):
    the one data root an export or the demo knows, which their outputs must stay out of. Only
    absolute paths: a relative one was relative to a working folder nobody recorded. A file that
    cannot be read gives no data here (loading it for the command says why, in one line)."""
    from emotion_dist.errors import UserError
    from emotion_dist.utils.paths import data_paths

    try:
        data = load_checkpoint(checkpoint).get("config", {}).get("data", {})
        found = data_paths(data.get("root"), data.get("ferplus")) if isinstance(data, dict) else []
    except (UserError, AttributeError, TypeError):
        return []
    return [(key, path) for key, path in found if path.is_absolute()]


def checkpoint_config(state: dict, overrides: list[str]):
    """The checkpoint's own config, with the user's overrides on top (validated as usual). A new
    data.root without a data.source is read as whatever it is (auto), never written to."""
    cfg = config_from_dict(state.get("config", {}))
    cfg.run.resume = "never"
    cfg.model.init_from = None
    keys = apply_overrides(cfg, overrides)
    if "data.root" in keys and "data.source" not in keys:
        cfg.data.source = "auto"
    validate(cfg)
    return cfg
