"""parse config -> build -> train -> close. The same function serves `emotion-dist train` and
`launch/train.py` under every launcher."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from emotion_dist.config import to_yaml
from emotion_dist.distributed import interrupts
from emotion_dist.distributed.env_settings import resolve_config
from emotion_dist.errors import EXIT_OK, Interrupted, TrainingAborted, UserError, exit_code_for
from emotion_dist.utils.output import MARKER, check_json_out, emit, stdout_to_stderr
from emotion_dist.utils.paths import data_paths

log = logging.getLogger("emotion_dist")


def pick_run_dir(cfg) -> tuple[str, Optional[str]]:
    """Rank 0: run.dir, or runs/NAME / runs/NAMEn (checkpoint.choose_run_dir), and the start-line
    note saying why when it is not runs/NAME."""
    from emotion_dist.training.checkpoint import choose_run_dir

    return choose_run_dir(cfg.run, cfg.train, getattr(cfg, "_resume_given", False))


def hold_run_dir(cfg):
    """Rank 0, before any expensive work: one job per run directory (RunDirBusy names the holder)."""
    from pathlib import Path

    from emotion_dist.distributed.lease import RunDirLease
    from emotion_dist.training.checkpoint import check_run_dir

    check_run_dir(Path(cfg.run.dir))  # never a lease file in someone's folder
    return RunDirLease(cfg.run.dir, interval_s=cfg.run.lease_heartbeat_s, stale_after_s=cfg.run.lease_stale_s).acquire()


def finished_run(cfg) -> Optional[tuple[str, dict]]:
    """Rank 0: (the line, the result) when run.dir holds a run that is finished, test pass included;
    a finished run without its test pass goes on to the trainer, which runs only that pass."""
    from emotion_dist.training.checkpoint import finished_message, run_status

    if cfg.run.resume != "auto":
        return None
    done = finished_message(cfg.run.dir, cfg.train)
    if done is None and run_status(cfg.run.dir, cfg.train).kind == "finished":
        log.info("%s: finished at its last epoch, but its test pass is not recorded: running only that", cfg.run.dir)
    return done


def _error(rank: int, e: BaseException) -> None:
    # one write, newline included: print() writes the text and the newline separately, and with
    # every rank failing at once another rank's line landed between them
    sys.stderr.write(f"error: [rank {rank}] {e}\n")
    sys.stderr.flush()


def run_training(config_path, overrides, out: argparse.Namespace | None = None) -> int:
    """`out`: the output flags (json, json_out, print_config); with --json, stdout holds only the
    final JSON document and every log line goes to stderr."""
    out = out or argparse.Namespace(json=False, json_out=None, print_config=False)
    cfg = None
    try:
        cfg, notes = resolve_config(config_path, overrides)
        if getattr(out, "print_config", False):  # the resolved YAML; nothing started, nothing written
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            sys.stdout.write(to_yaml(cfg))
            return EXIT_OK
        interrupts.install()  # from here on: a signal during data preparation stops cleanly too
        check_json_out(out, data=data_paths(cfg.data.root, cfg.data.ferplus))
        from emotion_dist.training.loggers import check_trackers

        check_trackers(cfg)
        from emotion_dist.distributed import process_group
        from emotion_dist.training.strategy import check_world_size

        info = process_group.detect_launch()
        process_group.check_launch(cfg, info)
        check_world_size(cfg.dist.strategy, info.world_size)
        env = process_group.init_distributed(cfg, info)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return exit_code_for(e)
    except Interrupted as e:
        print(f"stopped by {e.signame} before training started; nothing to save", file=sys.stderr, flush=True)
        if cfg is not None:
            emit(out, {MARKER: "train", "run_dir": cfg.run.dir, "stopped": True, "global_step": None,
                       "signal": e.signame})
        return exit_code_for(e)
    with stdout_to_stderr(out.json):
        code, result = _train(cfg, notes, env)
    if result is not None and env.is_main:
        document = {MARKER: "train", "run_dir": cfg.run.dir, "launcher": env.launcher,
                    "world_size": env.world_size, **result}
        emit(out, document)
        out.document = document  # emotion_dist.api.train returns it
    return code


def _train(cfg, notes: list[str], env) -> tuple[int, dict | None]:
    """(exit code, the result for the JSON document, or None after an error)."""
    from emotion_dist.distributed import process_group
    from emotion_dist.training.build import build_trainer
    from emotion_dist.training.loggers import setup_logging

    setup_logging(env.rank, sys.stdout)  # sys.stdout is stderr here under --json
    trainer, lease, ok = None, None, False
    try:
        cfg.run.dir, note = process_group.rank0_decides(lambda: pick_run_dir(cfg))
        notes = [*notes, note] if note else notes
        lease = process_group.rank0_decides(lambda: hold_run_dir(cfg), share_result=False)
        done = process_group.rank0_decides(lambda: finished_run(cfg))
        if done is not None:  # nothing left to do: no data loaded, no test pass redone
            if env.is_main:
                log.info(done[0])
            ok = True
            return EXIT_OK, done[1]
        trainer = build_trainer(cfg, env, notes=notes, lease=lease)
        result = trainer.fit()
        # every rank exits alike: the signal one rank got (Ctrl-C reaches them all, `kill` only one)
        signame = next(filter(None, process_group.gather_objects(interrupts.requested())), None)
        if result.get("stopped") and signame:
            result["signal"] = signame
            if env.is_main:
                log.info("stopped by %s at step %s; the checkpoint is saved: the same command resumes it (exit %d)",
                         signame, result.get("global_step"), interrupts.exit_code(signame))
        elif env.is_main:
            log.info("done: %s",
                     " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        ok = True
        return (interrupts.exit_code(signame) if result.get("stopped") and signame else EXIT_OK), result
    except (UserError, TrainingAborted) as e:
        _error(env.rank, e)
        ok = getattr(e, "on_every_rank", False)  # an error every rank raised: they leave together
        return exit_code_for(e), None
    except Interrupted as e:  # during data preparation: temp files are gone; the next start carries on
        if env.is_main:
            log.info("stopped by %s while preparing data; temp files removed, the next start carries on", e.signame)
        ok = env.world_size == 1
        return exit_code_for(e), {"stopped": True, "global_step": None, "signal": e.signame}
    finally:
        if trainer is not None:
            trainer.close()
        if lease is not None:  # after the last checkpoint: it was written under the lease
            lease.release()
        process_group.close_distributed(clean=ok)  # after a failure, peers may never reach a barrier
