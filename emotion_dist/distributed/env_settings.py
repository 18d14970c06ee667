"""Config values that come from the environment: what `accelerate launch` was told (mixed precision,
FSDP, dynamo backend, CPU) and the standard WANDB_* variables.

Precedence, highest first: `key=value` on the command line > the environment > the --config file >
the built-in defaults. The same order as LightningCLI/jsonargparse: a launcher flag or an exported
WANDB_* variable belongs to this launch, a YAML file is a recipe shared by many launches (and the
shipped recipes spell out every value, so they would otherwise silence the launcher for good).
Every time a source wins over another that asked for something else, a note says so on the start
line. What cannot be honoured is refused in one line (exit 2) before anything starts.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

from emotion_dist.config import Config, config_sources, load_config, parse_override, validate
from emotion_dist.errors import ConfigError, LaunchError

ACCELERATE_PRECISION = {"fp16": "fp16", "bf16": "bf16"}  # "no" is also what accelerate sends when not asked
WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "off"}


@dataclass
class EnvSetting:
    key: str
    value: Any  # None: nothing to set, only a note
    source: str  # where it came from, as the user typed it


def _true(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes")


def accelerate_settings(environ: Mapping[str, str]) -> list[EnvSetting]:
    """What `accelerate launch` (flags or its config file) asked for, read from the variables its
    launchers set (accelerate/utils/launch.py). Accelerate sends `no` for mixed precision and dynamo
    both when told `no` and when told nothing, so `no` asks for nothing."""
    out: list[EnvSetting] = []
    for name, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if _true(environ, name):
            raise LaunchError(f"accelerate asked for {what} ({name}=true), which emotion-dist does not run; use "
                              f"--use_fsdp (dist.strategy=fsdp) or --multi_gpu with dist.strategy=zero")
    amp = environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if amp in ACCELERATE_PRECISION:
        out.append(EnvSetting("train.precision", ACCELERATE_PRECISION[amp], f"accelerate --mixed_precision {amp}"))
    elif amp != "no":
        raise LaunchError(f"accelerate --mixed_precision {amp} (ACCELERATE_MIXED_PRECISION) is not supported; "
                          f"use bf16, fp16 or no")
    if _true(environ, "ACCELERATE_USE_FSDP"):
        if _true(environ, "FSDP_OFFLOAD_PARAMS"):
            raise LaunchError("accelerate --fsdp_offload_params true is not supported by emotion-dist's FSDP2 "
                              "strategy; drop it (EmotionNet's 1.8 M parameters fit any GPU)")
        out.append(EnvSetting("dist.strategy", "fsdp", "accelerate --use_fsdp (FSDP2 fully_shard; its fsdp_* "
                                                       "options are not used)"))
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if backend == "inductor":
        tuned = [f"{name}={environ[name]}" for name, default in (
            ("ACCELERATE_DYNAMO_MODE", "default"), ("ACCELERATE_DYNAMO_USE_FULLGRAPH", "false"),
            ("ACCELERATE_DYNAMO_USE_DYNAMIC", "false"), ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "false"))
            if environ.get(name, default).strip().lower() not in (default, "none")]
        if tuned:
            raise LaunchError(f"accelerate's dynamo options {', '.join(tuned)} are not supported; emotion-dist "
                              f"compiles with torch.compile's defaults (train.compile=true): drop them")
        out.append(EnvSetting("train.compile", True, "accelerate --dynamo_backend inductor"))
    elif backend != "no":
        raise LaunchError(f"accelerate --dynamo_backend {backend} (ACCELERATE_DYNAMO_BACKEND) is not supported; "
                          f"emotion-dist compiles with torch.compile's inductor: use --dynamo_backend inductor or no")
    if _true(environ, "ACCELERATE_USE_CPU"):
        out.append(EnvSetting("train.device", "cpu", "accelerate --cpu"))
    return out


def wandb_settings(environ: Mapping[str, str], cfg: Config) -> list[EnvSetting]:
    """The standard WANDB_* variables that map onto log.* keys. WANDB_MODE switches a run that uses
    W&B between online and offline, and `disabled` turns it off; it never turns W&B on (log.wandb
    decides that), or WANDB_MODE=offline in a shell profile would add a tracker to every run."""
    out: list[EnvSetting] = []
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        if mode not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE={mode} is not a W&B mode; use online, offline or disabled")
        if cfg.log.wandb != "off" or WANDB_MODES[mode] == "off":
            out.append(EnvSetting("log.wandb", WANDB_MODES[mode], f"WANDB_MODE={mode}"))
        else:  # said, not applied
            out.append(EnvSetting("log.wandb", None, f"WANDB_MODE={mode} does not turn W&B on: set log.wandb"))
    for name, key in (("WANDB_PROJECT", "log.wandb_project"), ("WANDB_ENTITY", "log.wandb_entity"),
                      ("WANDB_RUN_GROUP", "log.wandb_group"), ("WANDB_TAGS", "log.wandb_tags")):
        if environ.get(name):
            out.append(EnvSetting(key, environ[name], f"{name}={environ[name]}"))
    return out


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _put(cfg: Config, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def apply_environment(cfg: Config, given: set[str], overrides, environ: Mapping[str, str] | None = None) -> list[str]:
    """Fill in what the environment asks for, below the command line and above the config file.
    `given`: the keys the config file or the overrides set. Returns notes for the start line."""
    environ = os.environ if environ is None else environ
    cli_keys = {parse_override(o)[0] for o in overrides}
    notes = []
    for s in [*accelerate_settings(environ), *wandb_settings(environ, cfg)]:
        current = _get(cfg, s.key)
        if s.value is None:
            notes.append(f"{s.key}={current} ({s.source})")
            continue
        if current == s.value:
            continue
        if s.key in cli_keys:
            notes.append(f"{s.key}={current} from the command line ({s.source} asked for {s.value})")
            continue
        was = f", over the config file's {current}" if s.key in given else ""
        notes.append(f"{s.key}={s.value} from {s.source}{was}")
        _put(cfg, s.key, s.value)
    validate(cfg)
    return notes


def wandb_api_key_present(environ: Mapping[str, str] | None = None) -> bool:
    """What wandb itself would find: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a netrc entry for
    the W&B host (NETRC, else ~/.netrc), as `wandb login` writes it."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_config(config_path, overrides, environ=None):
    """The config a run uses (command line > environment > config files in order > defaults, see
    env_settings) and the notes saying which --config file set what and where the launcher's or
    W&B's environment decided or was overruled. run.dir stays None when not given: the train
    command picks runs/NAME."""
    cfg, given = load_config(config_path, overrides)
    cfg._resume_given = "run.resume" in given  # runs/NAME is kept when run.resume=auto is asked for
    return cfg, [*config_sources(config_path), *apply_environment(cfg, given, overrides, environ)]
