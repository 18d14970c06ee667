"""parse config -> build -> train -> close. The same function serves `emotion-dist train` and
`launch/train.py` under every launcher."""

from __future__ import annotations

import logging
import os
import sys

from . import interrupts
from .config import load_config
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError, Interrupted, TrainingAborted, UserError

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


def hold_run_dir(cfg):
    """Rank 0, before any expensive work: one job per run directory (RunDirBusy names the holder)."""
    from pathlib import Path

    from .checkpoint import check_run_dir
    from .lease import RunDirLease

    check_run_dir(Path(cfg.run.dir))  # never a lease file in someone's folder
    return RunDirLease(cfg.run.dir, interval_s=cfg.run.lease_heartbeat_s, stale_after_s=cfg.run.lease_stale_s).acquire()


def _error(rank: int, e: BaseException) -> None:
    print(f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)


def run_training(config_path, overrides) -> int:
    interrupts.install()  # from the first moment: a signal during data preparation stops cleanly too
    try:
        cfg, _ = resolve_config(config_path, overrides)
        from . import distributed as D

        info = D.detect_launch()
        D.check_launch(cfg, info)
        env = D.init_distributed(cfg, info)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"stopped by {e.signame} before training started; nothing to save", file=sys.stderr, flush=True)
        return EXIT_OK

    from .build import build_trainer
    from .loggers import setup_logging

    setup_logging(env.rank)
    trainer, lease, ok = None, None, False
    try:
        lease = D.rank0_decides(lambda: hold_run_dir(cfg), share_result=False)
        trainer = build_trainer(cfg, env)
        trainer.lease = lease
        result = trainer.fit()
        if env.is_main:
            log.info("done: %s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        ok = True
        return EXIT_OK
    except UserError as e:
        _error(env.rank, e)
        return EXIT_USAGE
    except TrainingAborted as e:
        _error(env.rank, e)
        return EXIT_FAILURE
    except Interrupted as e:  # during data preparation: temp files are gone; the next start carries on
        if env.is_main:
            log.info("stopped by %s while preparing data; temp files removed, the next start carries on", e.signame)
        ok = env.world_size == 1
        return EXIT_OK
    finally:
        if trainer is not None:
            trainer.close()
        if lease is not None:  # after the last checkpoint: it was written under the lease
            lease.release()
        D.close_distributed(clean=ok)  # after a failure, peers may never reach a barrier
