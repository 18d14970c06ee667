"""Checkpoints: what a file holds (CheckpointMeta + the registered components' state), how files are
written and kept (CheckpointFiles), and the one interface the trainer saves and resumes through
(Checkpointer).

- Files: rank 0 writes atomically (temp file, fsync, os.replace): `checkpoints/step-XXXXXXXX.pt`
  (the newest `ckpt.keep`), `last.pt`, `best.pt`. They load with torch.load(weights_only=True).
- Ownership: `run.json` in the run directory records the run's id and the checkpoint files this
  run wrote. Only those count toward `ckpt.keep`, only those are ever deleted, and auto-resume picks
  only among them: a stray `step-*.pt` copied in, or another run's files, are never touched.
- The file layout (top-level keys `model_state_dict`, `epoch`, `class_names`, ...) is the one
  emotion-dist has always written, so checkpoints from earlier versions load, evaluate and resume.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from emotion_dist.distributed import process_group
from emotion_dist.errors import CheckpointError, ConfigError, DataError
from emotion_dist.modelio import FORMAT_VERSION, CheckpointMeta, check_checkpoint, load_checkpoint, read_meta
from emotion_dist.training.state import CheckpointInterval
from emotion_dist.utils.fsutil import atomic_write_bytes, atomic_write_json, remove_stale_temps

log = logging.getLogger("emotion_dist")
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
RUN_MARKER = "run.json"
RUN_DIR_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", RUN_MARKER, "lease.json")  # what marks a run dir


def check_resumable(state: dict, path, *, classes: list, channels: int, image_size: int, train_images: int) -> None:
    """Refuse, before anything loads, a checkpoint trained on other data (one line, exit 2)."""
    if state["class_names"] != classes:
        raise CheckpointError(f"checkpoint classes {state['class_names']} differ from the data's {classes}; "
                              f"use model.init_from=PATH to fine-tune on new classes")
    if state.get("in_channels", channels) != channels:
        raise CheckpointError(f"checkpoint has in_channels={state['in_channels']}; set model.in_channels to match")
    changes = []
    if state.get("image_size", image_size) != image_size:
        changes.append(f"data.image_size {state['image_size']} -> {image_size}")
    saved_n = state.get("sampler", {}).get("n", train_images)
    if saved_n != train_images:
        changes.append(f"training images {saved_n} -> {train_images} (files added or removed, or data.limit changed)")
    if changes:
        raise DataError(f"the data differs from what checkpoint {path} was trained on: {'; '.join(changes)}; resume "
                        f"with the same data, or start a new run.dir (model.init_from={path} keeps the weights)")


# ------------------------------------------------------------------------------------ files
def serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _step_of(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


class CheckpointFiles:
    """The checkpoint files of one run directory (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep
        self.marker = self.run_dir / RUN_MARKER
        self.record = self._read_record()

    # -------- ownership
    def _read_record(self) -> Optional[dict]:
        import json

        if not self.marker.is_file():
            return None
        try:
            record = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("emotion_dist") == "run" else None

    @property
    def run_id(self) -> Optional[str]:
        return self.record["run_id"] if self.record else None

    def owned(self) -> set[str]:
        return set(self.record.get("checkpoints", [])) if self.record else set()

    def begin(self, run_id: Optional[str] = None) -> str:
        """Mark the folder as this run's (a fresh start keeps the files of none before it)."""
        run_id = run_id or self.run_id or secrets.token_hex(6)
        self.record = {"emotion_dist": "run", "run_id": run_id,
                       "created": (self.record or {}).get("created", time.time()),
                       "checkpoints": sorted(self.owned() & {p.name for p in self.dir.glob("*.pt")})}
        atomic_write_json(self.marker, self.record)
        return run_id

    def _own(self, names: list[str], dropped: list[str] = ()) -> None:
        if self.record is None:
            self.begin()
        owned = (self.owned() | set(names)) - set(dropped)
        self.record = {**self.record, "checkpoints": sorted(owned)}
        atomic_write_json(self.marker, self.record)

    def clean_temps(self) -> list[Path]:
        """Temp files a killed write left behind (only this run writes here: the run-dir lease)."""
        # the run directory itself: only dead writers' (a starting job's lease temp file lives there)
        return remove_stale_temps(self.dir, everything_ours=True) + remove_stale_temps(self.run_dir)

    # -------- paths
    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def step_files(self, owned_only: bool = True) -> list[Path]:
        """Step checkpoints, oldest first: this run's (or, in a run directory from before ownership
        was recorded, every one)."""
        if not self.dir.is_dir():
            return []
        files = [p for p in self.dir.iterdir() if _STEP_RE.match(p.name)]
        if owned_only and self.record is not None:
            owned = self.owned()
            files = [p for p in files if p.name in owned]
        return sorted(files, key=_step_of)

    def all_checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("*.pt")) if self.dir.is_dir() else []

    def foreign(self) -> list[Path]:
        """Checkpoint files here that this run did not write."""
        owned = self.owned()
        return [p for p in self.all_checkpoints() if p.name not in owned]

    # -------- writing
    def save(self, state: dict, step: int, is_best: bool = False) -> None:
        data = serialize({**state, "format_version": FORMAT_VERSION})
        step_file = self.dir / f"step-{step:08d}.pt"
        written = []
        if step_file.exists() and step_file.name not in self.owned() and self.record is not None:
            log.warning("not writing %s: a file of that name is there and this run did not write it", step_file)
        else:
            atomic_write_bytes(step_file, data)
            written.append(step_file.name)
        atomic_write_bytes(self.last, data)
        written.append(self.last.name)
        if is_best:
            atomic_write_bytes(self.best, data)
            written.append(self.best.name)
        self._own(written)
        steps = self.step_files()  # this run's only
        old = steps[: -self.keep] if len(steps) > self.keep else []
        if old:
            self._own([], [p.name for p in old])  # recorded first: a crash in between leaves no claim on a gone file
            for p in old:
                p.unlink(missing_ok=True)

    # -------- reading
    def newest_loadable(self) -> Optional[tuple[Path, dict]]:
        """The newest checkpoint of this run that loads, reading as few files as possible: last.pt
        unless a step file is newer (its name says so: a failed last.pt write leaves one behind) or
        it is unreadable or unsound (NaN weights, wrong shapes); then step files newest first. Those
        skipped are named in a warning."""
        last = self._try(self.last) if self.last.is_file() and self._mine(self.last) else None
        last_step = last[1].get("global_step", 0) if last else -1
        for path in reversed(self.step_files()):
            if _step_of(path) <= last_step:
                break
            found = self._try(path)
            if found:
                return found
        return last

    def _mine(self, path: Path) -> bool:
        return self.record is None or path.name in self.owned()

    @staticmethod
    def _try(path: Path) -> Optional[tuple[Path, dict]]:
        """The file and its state when it loads and passes every check a model is run with (shapes,
        metadata, finite weights: a NaN last.pt is skipped like a truncated one), else None."""
        try:
            state = load_checkpoint(path)
            check_checkpoint(state, path)
            return path, state
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            return None


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in RUN_DIR_FILES)


# Every name a run writes at the top of its run directory (files and folders); a file of one of these
# names that emotion-dist did not write is the only thing that makes a run refuse a folder.
RUN_WRITES = (RUN_MARKER, "lease.json", "config.yaml", "metrics.jsonl", "checkpoints", "data_report.json",
              "curves.png", "confusion_val.png", "confusion_test.png", "tensorboard", "wandb", "wandb_id.txt", "eval")
_SAMPLE_IDS_RE = re.compile(r"^sample_ids\.rank\d+\.jsonl$")


def _is_ours(run_dir: Path) -> bool:
    """A run directory emotion-dist wrote: its run.json says so, or (a run from before run.json
    was written) it holds a checkpoints/ folder with checkpoints, or a config.yaml with metrics.jsonl."""
    if CheckpointFiles(run_dir).record is not None:
        return True
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.pt")):
        return True
    return (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()


def names_in_the_way(run_dir: Path) -> list[str]:
    """In a folder emotion-dist did not write: the entries whose names a run would write. Other
    files (a user's train.log, a Slurm output file) are neither read nor touched."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or _is_ours(run_dir):
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if (p.name in RUN_WRITES or _SAMPLE_IDS_RE.match(p.name)) and not _marked_ours(p))


def _marked_ours(path: Path) -> bool:
    """A JSON file emotion-dist wrote (the lease of a run starting here): its marker key says so."""
    import json

    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return "emotion_dist" in json.loads(path.read_bytes())
    except (OSError, ValueError, TypeError):
        return False


def folders_in_the_way(run_dir: Path) -> list[str]:
    """In a folder emotion-dist did not write: its sub-folders of other names. A folder of folders
    is a data set or another program's output, and a run is never written inside one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or _is_ours(run_dir):
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name not in RUN_WRITES)


def check_run_dir(run_dir: Path) -> None:
    """A run writes into a new folder, a run directory of emotion-dist's, or a folder of the user's
    own files (a log the shell redirects there, a Slurm output file), beside them: those are neither
    read nor touched. Refused: a folder holding sub-folders of another program (a data set, say),
    or a file under a name the run writes (config.yaml, metrics.jsonl, ...) that it did not write."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={run_dir} is a file, not a folder; point run.dir at a folder")
    taken = names_in_the_way(run_dir)
    if taken:
        raise ConfigError(f"run.dir={run_dir} holds {run_dir / taken[0]}, which emotion-dist did not write but a run "
                          f"writes under that name{f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''}; "
                          f"move it away or choose another run.dir")
    folders = folders_in_the_way(run_dir)
    if folders:
        raise ConfigError(f"run.dir={run_dir} is not an emotion-dist run directory and holds folders of its own "
                          f"({', '.join(f'{run_dir / f}/' for f in folders[:3])}): a data set or another program's "
                          f"output, never written into; choose a new run.dir")


@dataclass
class RunStatus:
    """Where the run in a run directory stands, read from its own newest checkpoint and metrics.jsonl."""

    kind: str  # "none" (no run of emotion-dist's), "unfinished" or "finished"
    epoch: int = 0
    global_step: int = 0
    test: Optional[dict] = None  # the recorded test pass at the final step, if any


def _test_record(run_dir: Path, global_step: int) -> Optional[dict]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("type") == "test" and row.get("step") == global_step:
            found = row
    return found


def run_status(run_dir: Path, train_cfg) -> RunStatus:
    """Finished: its epochs done (train.epochs) or early-stopped on train.patience, or its
    train.max_steps reached with train.eval_test=false, by the config given now (a larger
    train.epochs continues a finished run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not _is_ours(run_dir):
        return RunStatus("none")
    found = CheckpointFiles(run_dir).newest_loadable()
    if found is None:
        return RunStatus("none" if not is_run_dir(run_dir) else "unfinished")
    state = found[1]
    epoch, step = int(state.get("epoch", 0)), int(state.get("global_step", 0))
    best = int(state.get("best_epoch", -1))
    patience = train_cfg.patience
    epochs_done = epoch >= train_cfg.epochs or (patience > 0 and best > 0 and epoch - best >= patience)
    # train.max_steps reached mid-epoch ends a run without its test pass; only one that asked for none is done
    steps_done = bool(train_cfg.max_steps) and step >= train_cfg.max_steps and not train_cfg.eval_test
    if not (epochs_done or steps_done):
        return RunStatus("unfinished", epoch, step)
    return RunStatus("finished", epoch, step, _test_record(run_dir, step))


def finished_message(run_dir: Path, train_cfg) -> Optional[tuple[str, dict]]:
    """For a finished run with nothing left to do (its test pass recorded, or none asked for): the
    line saying so and the result; None when there is work left (training, or only the test pass)."""
    status = run_status(run_dir, train_cfg)
    if status.kind != "finished" or (train_cfg.eval_test and status.test is None):
        return None
    result = {"stopped": False, "already_finished": True, "global_step": status.global_step,
              "epoch": status.epoch}
    if status.test is not None:
        result.update(test_accuracy=status.test.get("accuracy"), test_macro_f1=status.test.get("macro_f1"))
        why = "test pass recorded"
    else:
        why = "train.eval_test=false"
    return (f"{run_dir}: already finished at epoch {status.epoch} ({why}); nothing to do (a larger train.epochs "
            f"continues it; run.name or run.dir starts another)", result)


def choose_run_dir(run_cfg, train_cfg, resume_given: bool) -> tuple[str, Optional[str]]:
    """run.dir when given; else runs/NAME, or the next runs/NAMEn when that holds a finished run (or
    any run, with run.resume=never), as ultralytics increments `name`. runs/NAME is kept with
    run.exist_ok, or when run.resume=auto is asked for on the command line (it resumes or finishes
    the run there). Returns the folder and a start-line note when it is not runs/NAME."""
    from emotion_dist.config import run_dir_candidates

    if run_cfg.dir:
        return run_cfg.dir, None
    candidates = run_dir_candidates(run_cfg.name)
    first = next(candidates)
    if run_cfg.exist_ok or (resume_given and run_cfg.resume == "auto"):
        return str(first), None
    resume_from = None
    if run_cfg.resume not in ("auto", "never"):
        resume_from = Path(run_cfg.resume).resolve().parent.parent  # RUN_DIR/checkpoints/x.pt
    d, skipped = first, None
    while True:
        status = "running" if _lease_fresh(d, run_cfg.lease_stale_s) else run_status(d, train_cfg).kind
        if resume_from is not None and d.resolve() == resume_from:
            break
        if status == "none" and not names_in_the_way(d) and not folders_in_the_way(d):
            break
        if status == "unfinished" and run_cfg.resume == "auto":
            break
        skipped = skipped or (d, status)
        d = next(candidates)
    if d == first:
        return str(d), None
    what = {"finished": "a finished run", "running": "a run in progress"}.get(skipped[1], "another run")
    return str(d), (f"run.dir={d} ({skipped[0]} holds {what}; run.exist_ok=true writes there, run.name=X picks "
                    f"another name)")


def _lease_fresh(run_dir: Path, stale_after_s: float) -> bool:
    """A job holds the folder now: its lease (distributed/lease.py) was refreshed within
    run.lease_stale_s. Another `train` picks the next name instead of waiting on it."""
    try:
        return time.time() - (Path(run_dir) / "lease.json").stat().st_mtime < stale_after_s
    except OSError:
        return False


@dataclass
class StartPlan:
    """How a run starts in its run directory: fresh, or from a checkpoint (path and loaded state)."""

    run_id: str
    path: Optional[Path] = None
    state: Optional[dict] = None


def plan_start(files: CheckpointFiles, resume: str) -> StartPlan:
    """Rank 0: decide fresh start or resume, refusing (one line) to mix two runs in one directory."""
    run_dir = files.run_dir
    key = "run.dir"
    check_run_dir(run_dir)
    if resume == "never":
        existing = files.all_checkpoints()
        if existing:
            raise ConfigError(
                f"{key}={run_dir} holds checkpoints of an earlier run "
                f"({len(existing)} files, e.g. {existing[-1].name}); "
                f"choose a new {key}, or continue that run with run.resume=auto")
        return StartPlan(files.begin(secrets.token_hex(6)))
    if resume == "auto":
        found = files.newest_loadable()
        if found:
            path, state = found
            return StartPlan(files.begin(state.get("run_id")), path, state)
        strays = files.foreign() if files.record is not None else files.all_checkpoints()
        if strays:
            raise ConfigError(
                f"{key}={run_dir} holds checkpoint files this run did not write and none of its own "
                f"({', '.join(p.name for p in strays[:3])}); choose a new {key}")
        return StartPlan(files.begin())
    path = Path(resume)
    state = load_checkpoint(path)
    read_meta(state, path)  # a weights-only file cannot be resumed: one line saying so
    missing = [k for k in ("optimizer_state_dict", "sampler", "epoch", "global_step") if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no training state to resume ({', '.join(missing)} missing); start a "
                              f"new run from its weights with model.init_from={path}")
    theirs = state.get("run_id")
    if files.record is not None and files.owned() and theirs != files.run_id:
        raise ConfigError(
            f"{key}={run_dir} belongs to run {files.run_id}, but run.resume={path} is from "
            f"{'run ' + theirs if theirs else 'another run'}; resume into a new {key}")
    return StartPlan(files.begin(theirs), path, state)


# ------------------------------------------------------------------------------------ the interface
class Checkpointer:
    """Components register under a name; save() gathers every component's state (collective: every
    rank calls it, rank 0 writes) and load_state_dict() hands each its part back. The trainer uses
    register, plan (at start, before anything is written), load_planned, save and due."""

    def __init__(self, files: Optional[CheckpointFiles], env, every_steps: int = 0):
        self.files, self.env = files, env  # files: rank 0 only
        self.interval = CheckpointInterval(every_steps)
        self.components: dict = {}
        self.last_good: Optional[str] = None
        self.planned: Optional[str] = None  # the checkpoint plan() chose to resume from
        self.run_id: Optional[str] = None  # rank 0: this run's id (run.json)
        self._planned_state: Optional[dict] = None

    def register(self, name: str, component) -> None:
        if name in self.components:
            raise ValueError(f"checkpoint component {name!r} registered twice")
        self.components[name] = component

    def due(self, global_step: int) -> bool:
        return self.interval.due(global_step)

    def state_dict(self) -> dict:
        """Collective: every component's state (on rank 0; other ranks may get partial dicts)."""
        state: dict = {}
        for name, component in self.components.items():
            part = component.state_dict()
            clash = state.keys() & part.keys()
            if clash:
                raise ValueError(f"checkpoint component {name!r} writes keys another one owns: {sorted(clash)}")
            state.update(part)
        return state

    def load_state_dict(self, state: dict) -> None:
        for component in self.components.values():
            component.load_state_dict(state)

    def save(self, meta: CheckpointMeta, step: int, is_best: bool = False) -> Optional[str]:
        """Collective. Returns an error line when rank 0 could not write (all ranks get it), else None."""
        state = self.state_dict()
        error = None
        if self.files is not None:
            try:
                self.files.save({**state, **meta.to_state()}, step, is_best)
                self.last_good = str(self.files.last)
            except OSError as e:
                error = (f"checkpoint write at step {step} failed ({e.strerror or e}); the previous "
                         f"checkpoint {self.last_good or '(none)'} is intact")
        return process_group.broadcast_object(error)

    def plan(self, resume: str, check=None) -> Optional[str]:
        """Collective, before anything is written to the run directory: rank 0 decides fresh start or
        which checkpoint to resume (refusing, on every rank, to mix two runs in one directory or to
        resume onto changed data: `check(state, path)` may raise). Returns the checkpoint path or None."""
        self.planned = process_group.rank0_decides(lambda: self._plan(resume, check))
        return self.planned

    def _plan(self, resume: str, check) -> Optional[str]:
        removed = self.files.clean_temps()
        if removed:
            log.warning("removed %d temp file(s) left by a killed write: %s", len(removed),
                        ", ".join(p.name for p in removed[:3]))
        plan = plan_start(self.files, resume)
        self.run_id, self._planned_state = plan.run_id, plan.state
        if plan.state is not None and check is not None:
            check(plan.state, plan.path)
        return str(plan.path) if plan.path else None

    def load_planned(self) -> Optional[tuple[str, dict]]:
        """Collective: every rank loads the planned checkpoint into the registered components."""
        if self.planned is None:
            return None
        state = self._planned_state if self.files is not None else load_checkpoint(self.planned)
        self._planned_state = None
        self.load_state_dict(state)
        self.last_good = self.planned
        return self.planned, state
