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


from .errors import ConfigError  # noqa: F401  (re-exported: `from .config import ConfigError` still works)
from .fsutil import atomic_write_bytes

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


MAX_IMAGE_SIZE = 1024  # larger inputs do not fit EmotionNet's purpose (and overflow memory long before)
MAX_TIMEOUT_S = 7 * 24 * 3600  # collectives take a bounded timeout; a week is beyond any step


@dataclass
class DataConfig:
    source: Literal["auto", "synthetic", "folder", "kaggle", "fer2013_csv"] = "auto"
    root: Optional[str] = None  # auto: read what is there (none -> synthetic); synthetic: where to write it; fer2013_csv: the CSV
    kaggle_handle: str = "aadityasinghal/facial-expression-dataset/versions/1"
    image_size: int = 64
    val_fraction: float = 0.1
    num_workers: int = 0
    pipeline: Literal["fast", "classic"] = "fast"
    limit: int = 0  # use at most this many training images (0 = all); a debug knob
    synthetic_train: int = 4000
    synthetic_test: int = 700
    synthetic_seed: int = 0
    ferplus: Optional[str] = None  # fer2013new.csv: FER+ vote labels (8 classes), joined row by row to data.root's CSV
    label_mode: Literal["majority", "probability", "crossentropy"] = "majority"  # FER+ (Barsoum et al. 2016)
    dedupe: Literal["off", "warn", "drop"] = "warn"  # duplicates across splits: drop removes them from train
    # the training split's decoded uint8 images resident on the training device, batches gathered there
    # (no host-to-device copy per step); auto: on CUDA when they fit in on_device_max_fraction of its memory
    on_device: Literal["auto", "true", "false"] = "auto"
    on_device_max_fraction: float = 0.25


@dataclass
class ModelConfig:
    in_channels: int = 1
    num_classes: int = 7
    init_from: Optional[str] = None  # weights only, strict=False (fine-tuning)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 0.002
    lr_scale: Literal["none", "linear"] = "none"  # linear: lr *= global_batch / 64
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weights: Literal["none", "balanced"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    patience: int = 0  # early stop after this many epochs without a better val macro-F1 (0 = off)
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999: validate, keep best and export an EMA of the weights
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit); a debug knob
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops
    channels_last: bool = True
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # inductor's modes
    # inductor: the real compiler; aot_eager / eager: dynamo's debugging backends (accelerate's --dynamo_backend)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_test: bool = True  # evaluate best.pt on the test split after training
    sampler: Literal["uniform", "balanced"] = "uniform"  # balanced: classes drawn equally often, with replacement


@dataclass
class DistConfig:
    strategy: Literal["ddp", "zero", "fsdp"] = "ddp"
    sync_bn: bool = False
    timeout_s: float = 300.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # DistributedDataParallel's knobs (ddp and zero): smaller buckets start all-reduces during the backward pass
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True  # gradients are views into the all-reduce buckets: no copy
    static_graph: bool = False  # the same parameters are used every step (true for EmotionNet)
    grad_compression: Literal["none", "bf16"] = "none"  # bf16: all-reduce gradients in bfloat16


@dataclass
class RunConfig:
    dir: str = "runs/default"
    resume: str = "auto"  # auto | never | PATH
    lease_heartbeat_s: float = 10.0  # the run-directory lease's heartbeat (one job per run.dir)
    lease_stale_s: float = 60.0  # a lease not refreshed for this long belongs to a dead job: taken over
    cache_dir: str = ".cache/emotion-dist"


@dataclass
class CkptConfig:
    every_steps: int = 0  # 0 = epoch ends only
    keep: int = 2
    on_error: Literal["stop", "warn"] = "stop"


@dataclass
class LogConfig:
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "emotion-dist"
    wandb_artifact: bool = False  # at the end, log best.pt as a wandb "model" artifact (aliases best, epoch-N)
    every_steps: int = 10
    sample_ids: bool = False  # audit: each rank appends the sample ids of every step to sample_ids.rankN.jsonl


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
    hint = f"; did you mean {', '.join(close)}?" if close else "; the keys are listed under Configuration in README.md"
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


def load_config(path: Optional[str], overrides: list[str] = ()) -> tuple[Config, set[str]]:
    """Returns the validated config and the set of keys the user set explicitly."""
    cfg = Config()
    given: set[str] = set()
    if path:
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
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
            given.add(key)
    given |= apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg, given


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
    _check(d.limit >= 0, f"data.limit={d.limit} must be >= 0 (0 = all images)")
    _check(d.synthetic_train >= 14 and d.synthetic_test >= 7, "data.synthetic_train/test too small; use at least 14/7")
    _check(d.source != "folder" or bool(d.root), "data.source=folder needs data.root=PATH to an ImageFolder tree")
    _check(d.source != "fer2013_csv" or bool(d.root), "data.source=fer2013_csv needs data.root=PATH to fer2013.csv or icml_face_data.csv")
    csv_root = d.source == "fer2013_csv" or (d.source == "auto" and str(d.root or "").lower().endswith(".csv"))
    _check(d.ferplus is None or csv_root,
           "data.ferplus (FER+ votes) joins fer2013.csv row by row; set data.source=fer2013_csv data.root=PATH/fer2013.csv")
    _check(d.label_mode == "majority" or d.ferplus is not None,
           f"data.label_mode={d.label_mode} needs FER+ votes; set data.ferplus=PATH to fer2013new.csv")
    _check(cfg.model.in_channels in (1, 3), f"model.in_channels={cfg.model.in_channels} is invalid; allowed: 1, 3")
    _check(cfg.model.num_classes >= 2, f"model.num_classes={cfg.model.num_classes} must be >= 2")
    _check(t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _check(t.warmup_epochs >= 0, f"train.warmup_epochs={t.warmup_epochs} must be >= 0")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
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
    _check(bool(cfg.run.dir), "run.dir must not be empty")
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


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from a checkpoint's stored dict, ignoring keys this version does not know."""
    cfg = Config()
    known = set(_all_keys())
    for key, value in _flatten(tree).items():
        if key in known:
            _set(cfg, key, value)
    return cfg
