"""What the user sees and what is recorded (rank 0 only), as sinks behind one small interface.

A sink hears `start(step)` once (the optimizer step the run starts or resumes after), receives
records (`log(record, step)`: a dict with a "type" — step, epoch, test, bad_step — and numbers),
images (`image(key, path, step)`), artifacts, the final result (`finish(result)`) and `close()`.
Today's sinks: the console (rich progress bar and epoch table on a terminal, plain log lines
otherwise), `metrics.jsonl` in the run directory, Weights & Biases and TensorBoard. A new tracker is
one more sink. `RunLogger` fans out to them.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from emotion_dist.distributed.env_settings import wandb_api_key_present
from emotion_dist.errors import ConfigError
from emotion_dist.utils.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger("emotion_dist")
_human: Optional[TextIO] = None  # where log lines and the console go (setup_logging)


def setup_logging(rank: int, stream: Optional[TextIO] = None) -> None:
    """Log lines to `stream` (stdout by default; stderr when stdout is reserved for --json)."""
    global _human
    _human = stream or sys.stdout
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=_human, force=True)


def human_stream() -> TextIO:
    return _human or sys.stdout


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

    def start(self, step: int) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, step_in_epoch: int, steps_in_epoch: int, record: dict) -> None:
        """A training-step record; where in the epoch it falls matters to progress displays only."""
        self.log(record, record.get("step"))

    def stop_progress(self) -> None:
        """A live progress display ends (the epoch ended, or the run stops mid-epoch)."""

    def log(self, record: dict, step: Optional[int]) -> None:
        pass

    def image(self, key: str, path: Path, step: Optional[int]) -> None:
        pass

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        pass

    def finish(self, result: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class TimeLeft:
    """Time remaining in the epoch and in the run, from the steps this process has timed: rich's
    TimeRemainingColumn reads -:--:-- here (the progress task is new each epoch, and a log interval
    longer than its 30 s speed window leaves it no estimate). A whole epoch costs its steps plus the
    validation after them, measured once an epoch has ended. With train.max_steps the run ends at
    that optimizer step, and the estimate counts only the steps up to it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_steps: int = 0):
        self.clock, self.max_steps = clock, max_steps
        self.global_step = 0
        self.epochs = self.epoch = self.total = self.first_done = 0
        self.t0 = self.last_step_t = 0.0
        self.per_step: Optional[float] = None
        self.eval_s = 0.0

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self.epoch, self.epochs, self.total, self.first_done = epoch, epochs, total_steps, done_steps
        self.t0 = self.last_step_t = self.clock()

    def step(self, done_steps: int, global_step: Optional[int] = None) -> None:
        self.last_step_t = self.clock()
        if global_step is not None:
            self.global_step = global_step
        if done_steps > self.first_done:
            self.per_step = (self.last_step_t - self.t0) / (done_steps - self.first_done)

    def epoch_end(self) -> None:
        self.eval_s = max(self.clock() - self.last_step_t, 0.0)

    def remaining(self, done_steps: int) -> Optional[tuple[float, float]]:
        """(seconds left in this epoch, seconds left in the run), or None before the first timed step."""
        if self.per_step is None:
            return None
        in_epoch = self.total - done_steps
        later_epochs = max(self.epochs - self.epoch - 1, 0)
        if self.max_steps:  # the run stops at train.max_steps, maybe mid-epoch and without validating
            cap = max(self.max_steps - self.global_step, 0)
            if cap < in_epoch:
                return cap * self.per_step, cap * self.per_step
            whole = min(later_epochs, (cap - in_epoch) // max(self.total, 1))
            tail = cap - in_epoch - whole * self.total if whole < later_epochs else 0  # steps of a last, cut epoch
            later_epochs = whole
        else:
            tail = 0
        epoch_left = in_epoch * self.per_step + self.eval_s
        run_left = epoch_left + later_epochs * (self.total * self.per_step + self.eval_s) + tail * self.per_step
        return epoch_left, run_left

    def text(self, done_steps: int) -> str:
        left = self.remaining(done_steps)
        return "" if left is None else f"eta epoch {_hms(left[0])}, run {_hms(left[1])}"


class ConsoleSink(Sink):
    """A rich progress bar per epoch and an epoch table on a terminal; plain log lines in a pipe or a
    Slurm log (no control codes in files)."""

    COLUMNS = {"epoch": "epoch", "train_loss": "loss", "train_accuracy": "acc", "val_loss": "val loss",
               "val_accuracy": "val acc", "val_macro_f1": "val F1", "lr": "lr", "time_s": "s"}
    WIDTH = 9  # fixed column width: rows printed one at a time line up under the one header

    def __init__(self, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic, max_steps: int = 0):
        self.stream = stream or human_stream()
        self.tty = self.stream.isatty() if tty is None else tty
        self.progress = self.task = None
        self.time_left = TimeLeft(clock, max_steps)
        self.header_printed = False

    def _console(self):
        from rich.console import Console

        return Console(file=self.stream, force_terminal=self.tty)

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self.time_left.epoch_start(epoch, epochs, total_steps, done_steps)
        if not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), transient=True, console=self._console(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps, info="")

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, step_in_epoch: int, steps_in_epoch: int, record: dict) -> None:
        self.time_left.step(step_in_epoch, record.get("step"))
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['img_per_s']:,.0f} img/s"
        eta = self.time_left.text(step_in_epoch)
        info += f"  {eta}" if eta else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=step_in_epoch, info=info)
        else:
            log.info("step %d (%d/%d in epoch)  %s", record["step"], step_in_epoch, steps_in_epoch, info)

    def log(self, record: dict, step: Optional[int]) -> None:
        if record.get("type") == "epoch":
            self.time_left.epoch_end()
            self.stop_progress()
            self._epoch_row(record)

    def _epoch_row(self, row: dict) -> None:
        if not self.tty:
            log.info("epoch %d  %s", row["epoch"], "  ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                                                             if k not in ("epoch", "type")))
            return
        from rich.table import Table

        t = Table(box=None, show_header=not self.header_printed, pad_edge=False)
        for title in self.COLUMNS.values():
            t.add_column(title, justify="right", width=self.WIDTH, no_wrap=True)
        t.add_row(*(_fmt(row.get(k)) for k in self.COLUMNS))
        self._console().print(t)
        self.header_printed = True

    def close(self) -> None:
        self.stop_progress()


class JsonlSink(Sink):
    """`metrics.jsonl`: one JSON record per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Path, warnings: DiskWarnings):
        self.path, self.warnings = Path(path), warnings

    def start(self, step: int) -> None:
        """The run resumes after optimizer step `step`: what an earlier attempt logged past it (the
        steps after its last checkpoint, which this run trains again) is dropped, as TensorBoard
        drops it, so every step is in the file once."""
        try:
            lines = self.path.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return
        except OSError as e:
            self.warnings.warn(f"{self.path.name} not read ({e.strerror or e})")
            return
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) == len(lines):
            return
        try:
            atomic_write_bytes(self.path, "".join(kept).encode())
        except OSError as e:
            self.warnings.warn(f"{self.path.name} not trimmed to step {step} ({e.strerror or e})")
        else:
            log.info("%s: dropped %d record(s) logged after step %d by the attempt this run resumes",
                     self.path.name, len(lines) - len(kept), step)

    def log(self, record: dict, step: Optional[int]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        except OSError as e:  # a full disk must not end training: checkpoints decide that
            self.warnings.warn(f"{self.path.name} not written ({e.strerror or e})")


class WandbSink(Sink):
    """Weights & Biases; the run id lives in the run directory, so a resumed or requeued job
    continues the same W&B run. Project, entity, group and tags come from log.* (already merged with
    WANDB_PROJECT/ENTITY/RUN_GROUP/TAGS, see env_settings); the run's name and id from WANDB_NAME and
    WANDB_RUN_ID when set, else the run directory's name and wandb_id.txt; its files go to WANDB_DIR
    when set, else into the run directory."""

    def __init__(self, run_dir: Path, log_cfg, config: dict, environ=None):
        import os
        import secrets

        import wandb

        environ = os.environ if environ is None else environ
        id_file = Path(run_dir) / "wandb_id.txt"
        stored = id_file.read_text().strip() if id_file.is_file() else None
        run_id = environ.get("WANDB_RUN_ID") or stored or secrets.token_hex(4)
        if run_id != stored:
            atomic_write_text(id_file, run_id)
        tags = [t.strip() for t in log_cfg.wandb_tags.split(",") if t.strip()]
        self.run = wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity, group=log_cfg.wandb_group,
                              tags=tags or None, id=run_id, resume="allow", mode=log_cfg.wandb,
                              dir=environ.get("WANDB_DIR") or str(run_dir),
                              config=config, name=environ.get("WANDB_NAME") or Path(run_dir).name)
        self.newest_step = 0  # the newest optimizer step a record was logged at

    def start(self, step: int) -> None:
        self.newest_step = step

    def log(self, record: dict, step: Optional[int]) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}
        kind = record.get("type")
        if kind not in ("step", "epoch"):  # test, val_classes: keys of their own, never mixed into training's
            numbers = {f"{kind}/{k}": v for k, v in numbers.items() if k not in ("step", "epoch")}
        if step is not None:
            self.newest_step = max(self.newest_step, step)
        self.run.log(numbers, step=step)

    def image(self, key: str, path: Path, step: Optional[int]) -> None:
        import wandb

        # at the optimizer step of the records: W&B's own counter would move past it, and then drop
        # every later record logged at that step (the test pass) as out of order
        self.run.log({key: wandb.Image(str(path))}, step=self.newest_step if step is None else step)

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        """One "model" artifact per run (`emotionnet-<run id>`); a resumed run adds a version."""
        import wandb

        art = wandb.Artifact(name=f"emotionnet-{self.run.id}", type="model", metadata=metadata)
        art.add_file(str(path), name=Path(path).name)
        self.run.log_artifact(art, aliases=aliases)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink(Sink):
    """TensorBoard event files in run_dir/tensorboard: scalars per step (loss, lr, img/s), per epoch
    (train and validation metrics) and of the test pass, the curves and confusion matrix as images,
    and the hparams (the flat config) with the final metrics.

    A resumed or requeued run writes into the same folder with purge_step = the step it resumes
    after + 1: TensorBoard then drops what an earlier attempt logged past its last checkpoint, so
    each step appears once."""

    SKIP = ("type", "time", "step", "epoch")

    def __init__(self, run_dir: Path, config_flat: dict):
        self.dir = Path(run_dir) / "tensorboard"
        self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config_flat.items()}
        self.writer = None
        self.last_step = 0

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir), purge_step=step + 1)
        self.last_step = step

    def _step(self, step: Optional[int]) -> int:
        if step is not None:
            self.last_step = max(self.last_step, step)
        return self.last_step if step is None else step

    def log(self, record: dict, step: Optional[int]) -> None:
        if self.writer is None:
            return
        step = self._step(step)
        kind = record.get("type", "record")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in self.SKIP:
                self.writer.add_scalar(f"{kind}/{k}", v, step)

    def image(self, key: str, path: Path, step: Optional[int]) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(key, pixels, self._step(step), dataformats="HWC")

    def finish(self, result: dict) -> None:
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparam/{k}": float(v) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # on this run's own writer (SummaryWriter.add_hparams would open a second run in a subfolder)
        for summary in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, self.last_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogger:
    """Fans records out to the sinks (rank 0; elsewhere every call is a no-op)."""

    def __init__(self, enabled: bool, sinks: list[Sink], warnings: Optional[DiskWarnings] = None):
        self.enabled = enabled
        self.sinks = sinks if enabled else []
        self.warnings = warnings or DiskWarnings()

    def line(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def start(self, step: int) -> None:
        """The run starts, or resumes after optimizer step `step`."""
        for sink in self.sinks:
            sink.start(step)

    def epoch_start(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        for sink in self.sinks:
            sink.epoch_start(epoch, epochs, total_steps, done_steps)

    def stop_progress(self) -> None:
        for sink in self.sinks:
            sink.stop_progress()

    def step(self, step_in_epoch: int, steps_in_epoch: int, record: dict) -> None:
        """A training-step record: the console shows progress, the other sinks record it."""
        for sink in self.sinks:
            sink.step(step_in_epoch, steps_in_epoch, record)

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

    def finish(self, result: dict) -> None:
        for sink in self.sinks:
            sink.finish(result)

    def best_effort(self, fn, *args) -> None:
        """Plots and reports: a failed write (disk full) is a warning, never a crash."""
        try:
            fn(*args)
        except OSError as e:
            self.warnings.warn(f"{getattr(fn, '__name__', 'output')} could not write ({e.strerror or e})")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def check_trackers(cfg) -> None:
    """Before any expensive work: the trackers the config asks for can start (one line if not)."""
    import importlib.util

    if cfg.log.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package; pip install 'emotion-dist[all]' "
                          f"or use log.wandb=off")
    if cfg.log.wandb == "online" and not wandb_api_key_present():
        raise ConfigError("log.wandb=online but no W&B API key is set (WANDB_API_KEY, or `wandb login`); log in, "
                          "or use log.wandb=offline and `wandb sync` later")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package; pip install 'emotion-dist[tensorboard]' "
                          "or use log.tensorboard=false")


def build_logger(run_dir: Path, enabled: bool, cfg) -> RunLogger:
    """The sinks a config asks for: console and metrics.jsonl always, W&B when log.wandb is not off,
    TensorBoard with log.tensorboard=true."""
    if not enabled:
        return RunLogger(False, [])
    warnings = DiskWarnings()
    sinks: list[Sink] = [ConsoleSink(max_steps=cfg.train.max_steps),
                         JsonlSink(Path(run_dir) / "metrics.jsonl", warnings)]
    if cfg.log.wandb != "off":
        sinks.append(WandbSink(run_dir, cfg.log, cfg.to_dict()))
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir, cfg.flat()))
    return RunLogger(True, sinks, warnings)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _record_step(line: str) -> float:
    """The optimizer step a metrics.jsonl line was logged at; -inf for a line without one (kept)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("-inf")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("-inf")
