"""What the user sees and what is recorded (rank 0 only), as sinks behind one small interface.

A sink receives records (`log(record, step)`: a dict with a "type" — step, epoch, test, bad_step —
and numbers), images (`image(key, path, step)`), artifacts and `close()`. Today's sinks: the console
(rich progress bar and epoch table on a terminal, plain log lines otherwise), `metrics.jsonl` in the
run directory, and Weights & Biases. A new tracker is one more sink. `RunLogger` fans out to them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("emotion_dist")


def setup_logging(rank: int, stream=None) -> None:
    """Rank 0 logs at INFO, the others only warnings; to stdout unless stdout carries a command's
    result (evaluate's table or JSON: logs go to stderr)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=stream or sys.stdout, force=True)


class DiskWarnings:
    """Logs and plots are nice to have: a failed write (disk full) is one warning, never a crash."""

    def __init__(self):
        self.warned = False

    def warn(self, text: str) -> None:
        if not self.warned:
            log.warning("%s; further write failures of logs and plots are not repeated", text)
            self.warned = True


class Sink:
    """The interface every sink implements; the defaults do nothing."""

    def log(self, record: dict, step: Optional[int]) -> None:
        pass

    def image(self, key: str, path: Path, step: Optional[int]) -> None:
        pass

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleSink(Sink):
    """A rich progress bar per epoch and an epoch table on a terminal; plain log lines in a pipe or a
    Slurm log (no control codes in files)."""

    COLUMNS = {"epoch": "epoch", "train_loss": "loss", "train_accuracy": "acc", "val_loss": "val loss",
               "val_accuracy": "val acc", "val_macro_f1": "val F1", "lr": "lr", "time_s": "s"}

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.progress = self.task = None

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        if not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps, info="")

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, step_in_epoch: int, steps_in_epoch: int, record: dict) -> None:
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['img_per_s']:,.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step_in_epoch, info=info)
        else:
            log.info("step %d (%d/%d in epoch)  %s", record["step"], step_in_epoch, steps_in_epoch, info)

    def log(self, record: dict, step: Optional[int]) -> None:
        if record.get("type") == "epoch":
            self.stop_progress()
            self._epoch_row(record)

    def _epoch_row(self, row: dict) -> None:
        if not self.tty:
            log.info("epoch %d  %s", row["epoch"], "  ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                                                             if k not in ("epoch", "type")))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(box=None)
        for title in self.COLUMNS.values():
            t.add_column(title, justify="right")
        t.add_row(*(_fmt(row.get(k)) for k in self.COLUMNS))
        Console().print(t)

    def close(self) -> None:
        self.stop_progress()


class JsonlSink(Sink):
    """`metrics.jsonl`: one JSON record per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Path, warnings: DiskWarnings):
        self.path, self.warnings = Path(path), warnings

    def log(self, record: dict, step: Optional[int]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        except OSError as e:  # a full disk must not end training: checkpoints decide that
            self.warnings.warn(f"{self.path.name} not written ({e.strerror or e})")


class WandbSink(Sink):
    """Weights & Biases; the run id lives in the run directory, so a resumed or requeued job
    continues the same W&B run."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: dict):
        import secrets

        import wandb

        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, id=run_id, resume="allow", mode=mode, dir=str(run_dir),
                              config=config, name=Path(run_dir).name)

    def log(self, record: dict, step: Optional[int]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}, step=step)

    def image(self, key: str, path: Path, step: Optional[int]) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        """One "model" artifact per run (`emotionnet-<run id>`); a resumed run adds a version."""
        import wandb

        art = wandb.Artifact(name=f"emotionnet-{self.run.id}", type="model", metadata=metadata)
        art.add_file(str(path), name=Path(path).name)
        self.run.log_artifact(art, aliases=aliases)

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """Fans records out to the sinks (rank 0; elsewhere every call is a no-op)."""

    def __init__(self, enabled: bool, sinks: list[Sink], console: Optional[ConsoleSink] = None,
                 warnings: Optional[DiskWarnings] = None):
        self.enabled = enabled
        self.sinks = sinks if enabled else []
        self.console = console if enabled else None
        self.warnings = warnings or DiskWarnings()

    def line(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        if self.console is not None:
            self.console.epoch_start(epoch, epochs, total_steps, done_steps)

    def stop_progress(self) -> None:
        if self.console is not None:
            self.console.stop_progress()

    def step(self, step_in_epoch: int, steps_in_epoch: int, record: dict) -> None:
        """A training-step record: the console shows progress, the other sinks record it."""
        if self.console is not None:
            self.console.step(step_in_epoch, steps_in_epoch, record)
        self.log(record)

    def log(self, record: dict, step: Optional[int] = None) -> None:
        for sink in self.sinks:
            sink.log(record, step if step is not None else record.get("step"))

    def image(self, key: str, path: Path, step: Optional[int] = None) -> None:
        if Path(path).is_file():
            for sink in self.sinks:
                sink.image(key, Path(path), step)

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        if Path(path).is_file():
            for sink in self.sinks:
                sink.artifact(Path(path), aliases, metadata)

    def best_effort(self, fn, *args) -> None:
        """Plots and reports: a failed write (disk full) is a warning, never a crash."""
        try:
            fn(*args)
        except OSError as e:
            self.warnings.warn(f"{getattr(fn, '__name__', 'output')} could not write ({e.strerror or e})")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(run_dir: Path, enabled: bool, cfg) -> RunLogger:
    """The sinks a config asks for: console and metrics.jsonl always, W&B when log.wandb is not off."""
    if not enabled:
        return RunLogger(False, [])
    warnings = DiskWarnings()
    console = ConsoleSink()
    sinks: list[Sink] = [console, JsonlSink(Path(run_dir) / "metrics.jsonl", warnings)]
    if cfg.log.wandb != "off":
        sinks.append(WandbSink(run_dir, cfg.log.wandb, cfg.log.wandb_project, cfg.to_dict()))
    return RunLogger(True, sinks, console, warnings)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
