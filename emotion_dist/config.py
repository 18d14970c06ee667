"""Typed configuration: a YAML file plus dotted `key=value` overrides, validated before anything
heavy starts. Every invalid value raises ConfigError with one line naming the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from emotion_dist.errors import ConfigError  # noqa: F401  (re-exported: `from .config import ConfigError` still works)
from emotion_dist.utils.fsutil import atomic_write_bytes
from emotion_dist.utils.paths import check_outside_data, data_paths


class InvalidImageSize(ValueError):
    pass


def check_image_size(size: int) -> None:
    """The area-attention stage at stride 16 splits the map into 4 areas: size must be a multiple
    of 32 and (size/16)^2 divisible by 4."""
    if size >= 32 and size % 32 == 0 and ((size // 16) ** 2) % 4 == 0:
        return
    lower = max(32, size // 32 * 32)
    upper = lower + 32 if lower <= size else lower
    near = sorted({lower, upper}) if lower != size else [upper]
    raise InvalidImageSize(
        f"image_size={size} does not fit EmotionNet (multiple of 32 needed for the area-attention "
        f"stage); use {' or '.join(str(n) for n in near)}"
    )


@dataclass(frozen=True)
class FaceCrop:
    """Where a face sits in a crop: with 5 landmarks, the eye line at `eye_y` of the crop's height
    and the eyes `eye_distance` of its width apart, centred; without landmarks, the detector's box
    grown by `margin` of its size on every side. The defaults frame an upright face as the box crop
    with margin 0.15 does (eyes at 0.40 of the height, 0.35 of the width apart, measured on
    skimage's astronaut), close to FER2013's framing."""

    margin: float = 0.15
    eye_y: float = 0.40
    eye_distance: float = 0.35

    def spec(self) -> str:
        return f"margin={self.margin:g},eye_y={self.eye_y:g},eye_distance={self.eye_distance:g}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FACE_CROP_FIX = "e.g. data.face_crop=margin=0.15,eye_y=0.40,eye_distance=0.35"


def parse_face_crop(value: Union[str, dict, None], key: str = "data.face_crop") -> FaceCrop:
    """`margin=M,eye_y=Y,eye_distance=D` (any subset; the rest default) or the same as a mapping
    (how checkpoints and ONNX sidecars store it) -> FaceCrop; one line naming the fix otherwise."""
    if value is None or value == "":
        return FaceCrop()
    if isinstance(value, str):
        pairs = {}
        for part in value.split(","):
            name, sep, number = part.partition("=")
            if not sep:
                raise ConfigError(f"{key}={value!r} is invalid: {part.strip()!r} is not name=number; {FACE_CROP_FIX}")
            pairs[name.strip()] = number.strip()
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} is invalid; {FACE_CROP_FIX}")
    names = {f.name for f in dataclasses.fields(FaceCrop)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{key}: unknown part {', '.join(map(str, unknown))}; the parts are "
                          f"{', '.join(sorted(names))}")
    numbers = {}
    for name, raw in value.items():
        try:
            numbers[name] = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {name}={raw!r} is not a number; {FACE_CROP_FIX}") from None
    crop = FaceCrop(**numbers)
    if not (0 <= crop.margin <= 1 and 0.1 <= crop.eye_y <= 0.7 and 0.1 <= crop.eye_distance <= 0.8):
        raise ConfigError(f"{key}={crop.spec()} is out of range: margin in [0, 1], eye_y in [0.1, 0.7], "
                          f"eye_distance in [0.1, 0.8]")
    return crop


MAX_IMAGE_SIZE = 1024  # larger inputs do not fit EmotionNet's purpose (and overflow memory long before)
MAX_TIMEOUT_S = 7 * 24 * 3600  # collectives take a bounded timeout; a week is beyond any step


def setting(default, help: str):
    """A config key: its default and one line of help (`emotion-dist config keys`, docs/configuration.md)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    source: Literal["auto", "synthetic", "folder", "kaggle", "fer2013_csv"] = setting(
        "auto", "`auto` (whatever data.root holds; no root: synthetic) | `synthetic` | `folder` (ImageFolder tree) | "
                "`kaggle` (kagglehub) | `fer2013_csv` (fer2013.csv / icml_face_data.csv)")
    root: Optional[str] = setting(
        None, "folder: the tree (`train/train/<class>` + `test/test/<class>`, or `train/` + `test/` or `val/`); "
              "fer2013_csv: the CSV; synthetic: where to write it")
    kaggle_handle: str = setting("aadityasinghal/facial-expression-dataset/versions/1",
                                 "kagglehub handle (honours `KAGGLEHUB_CACHE`)")
    image_size: int = setting(64, "model input in pixels; a multiple of 32 (64, 96, 128, 224)")
    val_fraction: float = setting(0.1, "stratified, seeded validation split held out from train")
    num_workers: int = setting(0, "DataLoader workers (classic pipeline)")
    pipeline: Literal["fast", "classic"] = setting(
        "fast", "`fast`: decoded-uint8 cache + batched augmentation on the device; `classic`: per-sample PIL + "
                "torchvision.transforms.v2")
    limit: int = setting(0, "train on at most N images (0 = all); a debug knob")
    synthetic_train: int = setting(4000, "synthetic data set: training images")
    synthetic_test: int = setting(700, "synthetic data set: test images")
    synthetic_seed: int = setting(0, "synthetic data set: seed")
    ferplus: Optional[str] = setting(
        None, "fer2013new.csv: FER+ vote labels (8 classes), joined row by row to data.root's CSV")
    label_mode: Literal["majority", "probability", "crossentropy"] = setting(
        "majority", "FER+ labels from the votes (Barsoum et al. 2016): majority vote, vote distribution, or "
                    "cross-entropy on it")
    dedupe: Literal["off", "warn", "drop"] = setting(
        "warn", "images duplicated across splits: `warn`, `drop` (removed from train) or `off`")
    cache_size: str = setting(
        "auto", "stored size of the decoded cache: `auto` (the native size when all images share one square size, "
                "else data.image_size) or pixels; disk = images x channels x size^2 bytes")
    fit: Literal["resize", "crop", "pad"] = setting("resize", "how non-square images become square in the cache")
    prepare_scope: Literal["auto", "node", "job"] = setting(
        "auto", "prepare data once per node (node-local run.cache_dir) or once per job (shared); `auto` detects")
    prepare_timeout_s: float = setting(
        21600.0, "how long ranks wait for data preparation (separate from dist.timeout_s)")
    on_device: Literal["auto", "true", "false"] = setting(
        "auto", "keep the decoded training images on the training device and gather batches there (no "
                "host-to-device copy per step); `auto`: on CUDA when they fit in data.on_device_max_fraction "
                "of its memory")
    on_device_max_fraction: float = setting(0.25, "the share of the device's memory data.on_device may take")
    face_crop: str = setting(
        FaceCrop().spec(), "where the face sits in the training crops, `margin=M,eye_y=Y,eye_distance=D`: predict, "
                           "video and `data faces` crop faces this way (recorded in checkpoints and ONNX sidecars); "
                           "eye_y and eye_distance are shares of the crop (aligned by 5 landmarks), margin the share "
                           "of the detector's box added around a face without landmarks")


@dataclass
class ModelConfig:
    in_channels: int = setting(1, "1 = grayscale, 3 = RGB")
    num_classes: int = setting(7, "must equal the number of classes in the data")
    init_from: Optional[str] = setting(
        None, "fine-tune: load weights only (`strict=False`, a new head allowed); lists missing/unexpected keys")


@dataclass
class TrainConfig:
    epochs: int = setting(12, "training epochs")
    batch_size: int = setting(64, "per process; global = batch_size x processes x grad_accum")
    lr: float = setting(0.002, "AdamW learning rate")
    lr_scale: Literal["none", "linear"] = setting("none", "`linear`: lr x global batch / 64")
    weight_decay: float = setting(0.05, "AdamW weight decay; not applied to norms and biases")
    warmup_epochs: float = setting(1.0, "linear warmup, then cosine decay")
    label_smoothing: float = setting(0.1, "cross-entropy label smoothing")
    augment_warmup_epochs: float = setting(
        1.0, "augmentation curriculum: none in epoch 1, "
             "rising linearly to full from epoch N+1 (0 = full from the start)")
    class_weights: Literal["none", "balanced", "sqrt"] = setting(
        "sqrt", "each sample's loss x its class's weight; `balanced`: n / (k * count_c), `sqrt`: its square root")
    logit_adjust: float = setting(
        0.0, "logit-adjusted loss (Menon et al. 2021): the loss sees logits + tau x log(training class share), "
        "so rare classes get larger margins; prediction uses the plain logits (0 = off, 1 = the paper's tau)")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "`fp32` | `bf16` | `fp16` (GradScaler); `accelerate launch --mixed_precision` fills it in")
    grad_accum: int = setting(1, "micro-batches per optimizer step (DDP `no_sync` on all but the last)")
    clip_grad_norm: float = setting(0.0, "gradient-norm clipping (0 = off)")
    patience: int = setting(
        0, "early stop after N epochs without a better validation macro-F1 (0 = off); all ranks stop together")
    ema_decay: float = setting(
        0.0, "0 = off; e.g. 0.999: an EMA of the weights is validated, picks best.pt, and is what "
             "evaluate/predict/export use")
    seed: int = setting(0, "model init, split, epoch order, augmentation")
    max_steps: int = setting(0, "stop after N optimizer steps, saving a checkpoint (0 = no limit); a debug knob")
    max_bad_steps: int = setting(20, "consecutive non-finite steps before training stops")
    channels_last: bool = setting(True, "channels-last memory format")
    compile: bool = setting(False, "torch.compile the model, once per run (static shapes: no recompiles); "
                                   "`accelerate launch --dynamo_backend inductor` sets it")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting(
        "default", "inductor's mode; `reduce-overhead` captures CUDA graphs")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = setting(
        "inductor", "`inductor` compiles; `aot_eager` and `eager` are dynamo's debugging backends")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "`auto` (CUDA when visible) | `cpu` | `cuda`")
    eval_test: bool = setting(True, "evaluate best.pt on the test split after training")
    test_tta: Literal["none", "flip", "tencrop"] = setting(
        "flip", "test-time augmentation of that test pass, as `evaluate --tta` (its record says which)")
    sampler: Literal["uniform", "balanced"] = setting(
        "uniform", "`balanced`: classes drawn equally often, with replacement")


@dataclass
class DistConfig:
    strategy: Literal["ddp", "zero", "fsdp"] = setting(
        "ddp", "`ddp` | `zero` (ZeroRedundancyOptimizer) | `fsdp` (FSDP2 `fully_shard`); "
               "`accelerate launch --use_fsdp` sets fsdp")
    sync_bn: bool = setting(False, "SyncBatchNorm (per-GPU batches can be small)")
    timeout_s: float = setting(300.0, "process-group timeout: a stuck rank ends the job instead of hanging it")
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "`auto`: nccl on CUDA, gloo on CPU")
    bucket_cap_mb: float = setting(
        25.0, "DDP's gradient bucket size (EmotionNet's 7 MB of gradients fit one 25 MB bucket; smaller buckets "
              "start all-reduces during the backward pass); ddp and zero")
    gradient_as_bucket_view: bool = setting(True, "DDP: gradients are views into the all-reduce buckets (no copy)")
    static_graph: bool = setting(
        False, "DDP static_graph: every parameter used every step (true for EmotionNet); not with "
               "train.grad_accum > 1")
    grad_compression: Literal["none", "bf16"] = setting("none", "DDP: `bf16` all-reduces the gradients in bfloat16")


@dataclass
class RunConfig:
    name: str = setting(
        "default", "without run.dir, the run goes to runs/NAME, or runs/NAME2, runs/NAME3, ... when that holds "
                   "a finished or another run (as ultralytics' `name`)")
    exist_ok: bool = setting(False, "write into runs/NAME even when it holds a run (resume or finish it) instead of "
                                    "taking the next free runs/NAMEn")
    dir: Optional[str] = setting(None, "run directory (checkpoints, metrics.jsonl, plots, config.yaml); null: "
                                       "runs/NAME, see run.name")
    resume: str = setting(
        "auto", "`auto` (newest loadable checkpoint in run.dir) | `never` | a checkpoint path")
    lease_heartbeat_s: float = setting(10.0, "the run-directory lease's heartbeat (one job per run.dir)")
    lease_stale_s: float = setting(60.0, "a lease not refreshed for this long belongs to a dead job: taken over")
    cache_dir: str = setting(".cache/emotion-dist", "synthetic data and the decoded-image cache")


@dataclass
class CkptConfig:
    every_steps: int = setting(0, "also checkpoint every N steps (0 = at epoch ends only)")
    keep: int = setting(2, "step checkpoints kept besides last.pt and best.pt")
    on_error: Literal["stop", "warn"] = setting("stop", "a failed checkpoint write: `stop`, or `warn` and continue")


@dataclass
class LogConfig:
    wandb: Literal["off", "offline", "online"] = setting(
        "off", "Weights & Biases: `off` | `offline` | `online` (WANDB_MODE switches a run between them, "
               "`disabled` turns it off)")
    wandb_project: str = setting("emotion-dist", "W&B project (default: WANDB_PROJECT, else emotion-dist)")
    wandb_entity: Optional[str] = setting(None, "W&B entity, a user or team (default: WANDB_ENTITY)")
    wandb_group: Optional[str] = setting(None, "W&B run group, e.g. one per sweep (default: WANDB_RUN_GROUP)")
    wandb_tags: str = setting("", "W&B tags, comma-separated (default: WANDB_TAGS)")
    wandb_artifact: bool = setting(
        False, "at the end, log best.pt as a W&B `model` artifact (aliases best, epoch-N)")
    tensorboard: bool = setting(False, "TensorBoard event files in run.dir/tensorboard (needs the tensorboard extra)")
    every_steps: int = setting(10, "progress/log interval in steps (the loss is read from the device only then)")
    pictures: bool = setting(
        True, "write the per-epoch pictures (curves.png, confusion_val.png, val_errors.png) and train_batch.png "
              "(and send them to W&B/TensorBoard); false saves seconds a run for many short runs (a sweep on a "
              "tiny budget). confusion_test.png, which the model card shows, is always written")
    sample_ids: bool = setting(
        False, "audit: each rank appends the sample ids of every step to sample_ids.rankN.jsonl")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _all_keys() -> list[str]:
    return list(Config().flat())


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        allowed = get_args(typ)
        if isinstance(value, bool) and "off" in allowed:  # YAML 1.1 reads a bare off/on as a bool
            value = "on" if value else "off"
        if isinstance(value, bool) and "true" in allowed:  # auto|true|false keys
            value = "true" if value else "false"
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid; use true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid; expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is invalid; expected a finite number")
        return float(value)
    if typ is str:
        if isinstance(value, (bool, int, float)):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={value!r} is invalid; expected a string")
        return str(value)
    raise AssertionError(typ)


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; emotion-dist config keys lists them all"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]):
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    hints = get_type_hints(type(section))
    if parts[1] not in hints:
        raise _unknown(key)
    setattr(section, parts[1], _coerce(key, value, hints[parts[1]]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in key:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), (raw if isinstance(value, (dict, list)) else value)


def read_config_file(path: str) -> dict[str, Any]:
    """One YAML config file as flat dotted keys (not yet checked against the schema)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found; pass --config configs/default.yaml or another YAML file")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise ConfigError(f"config file {path} is not valid YAML (line {line}); fix its syntax") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (data:, train:, ...)")
    return _flatten(tree)


def config_paths(path) -> list[str]:
    """--config given once (a str), several times (a list, merged in order) or not at all."""
    if not path:
        return []
    return [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path if p]


def load_config(path, overrides: list[str] = ()) -> tuple[Config, set[str]]:
    """Returns the validated config and the set of keys the user set explicitly. `path`: one YAML
    file, or a list of them merged in order (a later file's keys replace an earlier one's, as
    Lightning CLI merges repeated --config); the overrides come last."""
    cfg = Config()
    given: set[str] = set()
    for p in config_paths(path):
        for key, value in read_config_file(p).items():
            _set(cfg, key, value)
            given.add(key)
    given |= apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg, given


def config_sources(path) -> list[str]:
    """With more than one --config: one note per file saying which keys it set (and which an
    earlier file's value it replaced), for the start line. Empty for one file or none."""
    paths = config_paths(path)
    if len(paths) < 2:
        return []
    seen: dict[str, str] = {}
    notes = []
    for p in paths:
        keys = read_config_file(p)
        replaced = [k for k in keys if k in seen and seen[k] != p]
        note = f"--config {p} set {', '.join(keys) or 'nothing'}"
        if replaced:
            note += f" (over {', '.join(f'{seen[k]} for {k}' for k in replaced)})"
        notes.append(note)
        seen.update({k: p for k in keys})
    return notes


RUNS_ROOT = "runs"


def run_dir_candidates(name: str, root: str = RUNS_ROOT):
    """runs/NAME, runs/NAME2, runs/NAME3, ... (ultralytics' increment_path)."""
    yield Path(root) / name
    n = 2
    while True:
        yield Path(root) / f"{name}{n}"
        n += 1


def apply_overrides(cfg: Config, overrides) -> set[str]:
    """Set dotted key=value overrides on cfg (not validated); returns the keys set."""
    keys = set()
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
        keys.add(key)
    return keys


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    try:
        check_image_size(d.image_size)
    except InvalidImageSize as e:
        raise ConfigError(f"data.{e}") from None
    _check(d.image_size <= MAX_IMAGE_SIZE, f"data.image_size={d.image_size} is too large; use at most {MAX_IMAGE_SIZE}")
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be between 0 and 1 (e.g. 0.1)")
    _check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    _check(0 < d.on_device_max_fraction <= 1,
           f"data.on_device_max_fraction={d.on_device_max_fraction} must be in (0, 1] (a share of device memory)")
    _check(d.on_device != "true" or d.pipeline == "fast",
           "data.on_device=true needs data.pipeline=fast (classic decodes files per sample)")
    _check(t.compile_mode == "default" or t.compile_backend == "inductor",
           f"train.compile_mode={t.compile_mode} is an inductor mode; use train.compile_backend=inductor")
    parse_face_crop(d.face_crop)
    _check(d.limit >= 0, f"data.limit={d.limit} must be >= 0 (0 = all images)")
    _check(d.synthetic_train >= 14 and d.synthetic_test >= 7, "data.synthetic_train/test too small; use at least 14/7")
    _check(d.cache_size == "auto" or (d.cache_size.isdigit() and 8 <= int(d.cache_size) <= 4096),
           f"data.cache_size={d.cache_size} is invalid; use auto or a size in pixels from 8 to 4096 (e.g. 96)")
    _check(math.isfinite(d.prepare_timeout_s) and d.prepare_timeout_s > 0,
           f"data.prepare_timeout_s={d.prepare_timeout_s} must be a positive number of seconds (e.g. 21600)")
    _check(d.source != "folder" or bool(d.root), "data.source=folder needs data.root=PATH to an ImageFolder tree")
    _check(d.source != "fer2013_csv" or bool(d.root),
           "data.source=fer2013_csv needs data.root=PATH to fer2013.csv or icml_face_data.csv")
    csv_root = d.source == "fer2013_csv" or (d.source == "auto" and str(d.root or "").lower().endswith(".csv"))
    _check(d.ferplus is None or csv_root,
           "data.ferplus (FER+ votes) joins fer2013.csv row by row; "
           "set data.source=fer2013_csv data.root=PATH/fer2013.csv")
    _check(d.label_mode == "majority" or d.ferplus is not None,
           f"data.label_mode={d.label_mode} needs FER+ votes; set data.ferplus=PATH to fer2013new.csv")
    _check(cfg.model.in_channels in (1, 3), f"model.in_channels={cfg.model.in_channels} is invalid; allowed: 1, 3")
    _check(cfg.model.num_classes >= 2, f"model.num_classes={cfg.model.num_classes} must be >= 2")
    _check(t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _check(t.warmup_epochs >= 0, f"train.warmup_epochs={t.warmup_epochs} must be >= 0")
    _check(t.augment_warmup_epochs >= 0,
           f"train.augment_warmup_epochs={t.augment_warmup_epochs} must be >= 0 (0 = off)")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    _check(math.isfinite(t.logit_adjust) and 0 <= t.logit_adjust <= 4,
           f"train.logit_adjust={t.logit_adjust} must be in [0, 4] (0 = off, 1 = Menon et al.'s tau)")
    _check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _check(t.clip_grad_norm >= 0, f"train.clip_grad_norm={t.clip_grad_norm} must be >= 0 (0 = off)")
    _check(t.patience >= 0, f"train.patience={t.patience} must be >= 0 (0 = no early stop)")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = off, e.g. 0.999)")
    _check(t.max_steps >= 0, f"train.max_steps={t.max_steps} must be >= 0 (0 = no limit)")
    _check(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    _check(0 <= t.seed < 2**63, f"train.seed={t.seed} must be between 0 and 2**63-1")
    _check(0 <= d.synthetic_seed < 2**63, f"data.synthetic_seed={d.synthetic_seed} must be between 0 and 2**63-1")
    _check(0 < cfg.dist.timeout_s <= MAX_TIMEOUT_S,
           f"dist.timeout_s={cfg.dist.timeout_s:g} must be > 0 and at most {MAX_TIMEOUT_S} (a week)")
    _check(cfg.dist.bucket_cap_mb > 0, f"dist.bucket_cap_mb={cfg.dist.bucket_cap_mb} must be > 0 (torch's default: 25)")
    ddp_knobs = [f"dist.{k}={getattr(cfg.dist, k)}" for k in ("bucket_cap_mb", "static_graph", "grad_compression")
                 if getattr(cfg.dist, k) != getattr(DistConfig, k)]
    _check(cfg.dist.strategy != "fsdp" or not ddp_knobs,
           f"{', '.join(ddp_knobs)} tune DistributedDataParallel; use dist.strategy=ddp or zero, or leave them at "
           f"their defaults")
    _check(not (cfg.dist.static_graph and t.grad_accum > 1),
           "dist.static_graph=true cannot skip the gradient sync of accumulated micro-batches; use train.grad_accum=1 "
           "or dist.static_graph=false")
    _check(cfg.ckpt.every_steps >= 0, f"ckpt.every_steps={cfg.ckpt.every_steps} must be >= 0 (0 = epoch ends only)")
    _check(cfg.ckpt.keep >= 1, f"ckpt.keep={cfg.ckpt.keep} must be >= 1")
    _check(cfg.log.every_steps >= 1, f"log.every_steps={cfg.log.every_steps} must be >= 1")
    _check(cfg.run.dir is None or bool(cfg.run.dir), "run.dir must not be empty; leave it out to use runs/NAME")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name and "\\" not in cfg.run.name
           and cfg.run.name not in (".", ".."),
           f"run.name={cfg.run.name!r} must be a plain folder name (no slashes); use run.dir=PATH for a path")
    # the run's files and the cache never go into the data (data.root, data.ferplus; see utils/paths.py):
    # refused here, before any process group starts or anything is written
    for key in ("run.dir", "run.cache_dir"):
        if getattr(cfg.run, key.split(".")[1]):
            check_outside_data(getattr(cfg.run, key.split(".")[1]), data_paths(d.root, d.ferplus), option=key)
    _check(cfg.run.lease_heartbeat_s > 0, f"run.lease_heartbeat_s={cfg.run.lease_heartbeat_s} must be > 0")
    _check(cfg.run.lease_stale_s >= 3 * cfg.run.lease_heartbeat_s,
           f"run.lease_stale_s={cfg.run.lease_stale_s} must be at least 3 x run.lease_heartbeat_s")
    r = cfg.run.resume
    _check(
        r in ("auto", "never") or os.path.isfile(r),
        f"run.resume={r} is neither auto, never nor an existing checkpoint file; fix the path or use run.resume=auto",
    )
    _check(
        cfg.model.init_from is None or os.path.isfile(cfg.model.init_from),
        f"model.init_from={cfg.model.init_from} does not exist; pass the path of a .pt checkpoint",
    )


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_bytes(path, to_yaml(cfg).encode())


@dataclass
class KeyInfo:
    key: str
    type: str
    default: Any
    help: str


def _type_name(typ: Any) -> str:
    if get_origin(typ) is Literal:
        return " | ".join(map(str, get_args(typ)))
    if get_origin(typ) is Union:
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return f"{_type_name(inner)} or null"
    return typ.__name__


def format_default(value: Any) -> str:
    """A default as YAML spells it: null, true, "" ..."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_keys() -> list[KeyInfo]:
    """Every config key with its type, default and help, read from the dataclasses themselves."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # the section's dataclass
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append(KeyInfo(f"{section.name}.{f.name}", _type_name(hints[f.name]), f.default,
                                f.metadata.get("help", "")))
    return rows


def keys_markdown() -> str:
    """docs/configuration.md's key table, generated (`emotion-dist config keys --markdown`)."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in describe_keys():
        lines.append(f"| `{k.key}` | {cell(k.type)} | {cell(format_default(k.default))} | {cell(k.help)} |")
    return "\n".join(lines) + "\n"


def config_diff(old: Config, new: Config, ignore=("run.resume", "model.init_from")) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs."""
    a, b = old.flat(), new.flat()
    return [(k, a[k], b[k]) for k in a if a[k] != b[k] and k not in ignore]


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from a checkpoint's stored dict, ignoring keys this version does not know."""
    cfg = Config()
    known = set(_all_keys())
    for key, value in _flatten(tree).items():
        if key in known:
            _set(cfg, key, value)
    return cfg
