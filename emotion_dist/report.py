"""What the user sees (rank 0 only): a rich progress bar and epoch table on a terminal, plain log
lines otherwise, `metrics.jsonl` in the run directory, and wandb when `log.wandb` is not off."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("emotion_dist")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


class Reporter:
    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str = "off", wandb_project: str = "emotion-dist",
                 config: Optional[dict] = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tty = enabled and sys.stdout.isatty()
        self.progress = self.task = None
        self.wandb = None
        self._warned_disk = False
        if enabled and wandb_mode != "off":
            self.wandb = start_wandb(self.run_dir, wandb_mode, wandb_project, config or {})

    def line(self, text: str) -> None:
        if self.enabled:
            log.info(text)

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

    def step(self, step_in_epoch: int, total: int, global_step: int, loss: float, lr: float, img_s: float) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {img_s:,.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step_in_epoch, info=info)
        elif self.enabled:
            log.info("step %d (%d/%d in epoch)  %s", global_step, step_in_epoch, total, info)
        self.metrics({"type": "step", "step": global_step, "loss": loss, "lr": lr, "img_per_s": img_s})

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch_end(self, row: dict) -> None:
        self.stop_progress()
        if not self.enabled:
            return
        if self.tty:
            from rich.console import Console
            from rich.table import Table

            cols = {"epoch": "epoch", "train_loss": "loss", "train_accuracy": "acc", "val_loss": "val loss",
                    "val_accuracy": "val acc", "val_macro_f1": "val F1", "lr": "lr", "time_s": "s"}
            t = Table(box=None)
            for title in cols.values():
                t.add_column(title, justify="right")
            t.add_row(*(_fmt(row.get(k)) for k in cols))
            Console().print(t)
        else:
            log.info("epoch %d  %s", row["epoch"], "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "epoch"))
        self.metrics({"type": "epoch", **row})

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not end training: checkpoints decide that
            self.disk_warning(f"metrics.jsonl not written ({e.strerror or e})")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"},
                           step=record.get("step"))

    def disk_warning(self, text: str) -> None:
        if not self._warned_disk:
            log.warning("%s; further write failures of logs and plots are not repeated", text)
            self._warned_disk = True

    def best_effort(self, fn, *args) -> None:
        """Plots and reports are nice to have: a failed write (disk full) is a warning, never a crash."""
        try:
            fn(*args)
        except OSError as e:
            self.disk_warning(f"{getattr(fn, '__name__', 'output')} could not write ({e.strerror or e})")

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None and Path(path).is_file():
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        """One "model" artifact per run (`emotionnet-<run id>`); a resumed run adds a version."""
        if self.wandb is None or not Path(path).is_file():
            return
        import wandb

        art = wandb.Artifact(name=f"emotionnet-{self.wandb.id}", type="model", metadata=metadata)
        art.add_file(str(path), name=Path(path).name)
        self.wandb.log_artifact(art, aliases=aliases)

    def close(self) -> None:
        self.stop_progress()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def start_wandb(run_dir: Path, mode: str, project: str, config: dict):
    """The run id lives in the run directory, so a resumed or requeued job continues the same run."""
    import secrets

    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", mode=mode, dir=str(run_dir),
                      config=config, name=run_dir.name)
