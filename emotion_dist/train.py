"""parse config -> build -> train -> close. The same function serves `emotion-dist train` and
`launch/train.py` under every launcher."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config, save_config

log = logging.getLogger("emotion_dist")
ACCELERATE_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


def resolve_config(config_path, overrides):
    cfg, given = load_config(config_path, overrides)
    amp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if "train.precision" not in given and amp:
        if amp not in ACCELERATE_PRECISION:
            raise ConfigError(f"ACCELERATE_MIXED_PRECISION={amp} is not supported; use no, fp16 or bf16")
        cfg.train.precision = ACCELERATE_PRECISION[amp]
    return cfg, given


def run_training(config_path, overrides) -> int:
    try:
        cfg, _ = resolve_config(config_path, overrides)
        from . import distributed as D

        info = D.detect_launch()
        D.check_launch(cfg, info)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    from .checkpoint import CheckpointError
    from .engine import TrainingAborted
    from .report import setup_logging

    env = D.init_distributed(cfg, info)
    setup_logging(env.rank)
    trainer, ok = None, False
    try:
        trainer = build_trainer(cfg, env)
        result = trainer.fit()
        if env.is_main:
            log.info("done: %s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        ok = True
        return 0
    except (ConfigError, CheckpointError) as e:
        print(f"error: [rank {env.rank}] {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as e:
        print(f"error: [rank {env.rank}] {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        D.close_distributed(clean=ok)  # after a failure, peers may never reach a barrier


def build_trainer(cfg, env):
    """Data (prepared once per node or job), run directory, resolved config, the launch line, Trainer."""
    import torch

    from .data import dataset_root, load_datasets
    from .engine import Trainer
    from .prepare import Preparation

    torch.backends.cudnn.benchmark = True  # fixed input sizes
    prep = Preparation.start(cfg, env)  # once per node or per job; waits never bounded by dist.timeout_s
    root = prep.once("the dataset", lambda: dataset_root(cfg))
    ds = prep.once("the decoded images", lambda: load_datasets(cfg, root), together=True)
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    per, world, acc = cfg.train.batch_size, env.world_size, cfg.train.grad_accum
    if env.is_main:
        log.info(
            "launcher %s | world size %d | backend %s | device %s | precision %s | strategy %s | batch %d per "
            "process x %d processes x %d accumulation = %d global | data %s (%d train / %d val / %d test, %d classes)",
            env.launcher, world, env.backend, env.device, cfg.train.precision, cfg.dist.strategy, per, world, acc,
            per * world * acc, ds.root, len(ds.train), len(ds.val), len(ds.test) if ds.test else 0, len(ds.classes),
        )
    return Trainer(cfg, env, ds)
