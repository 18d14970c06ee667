"""`emotion-dist sweep FILE --search optuna --trials N`: Optuna's TPE sampler over the sweep file's
`search:` space instead of its grid, each trial an ordinary training run (`emotion-dist train` in a
process of its own) in SWEEP_DIR/trial-NNNN.

- The study lives in Optuna's journal file (SWEEP_DIR/optuna.log, `JournalFileBackend`): no
  database or server. Several workers (`--parallel`, more terminals, a Slurm array running the same
  command) share it; `--trials` is the total over all of them.
- Objective: the trial's best validation macro-F1 (the test split is never used to choose). Each
  epoch's validation macro-F1 is read from the trial's metrics.jsonl as it is written and reported
  to Optuna; MedianPruner stops a trial behind the median of earlier ones at the same epoch (the
  trial gets SIGTERM: it checkpoints and exits 0, its folder stays).
- A stop signal is passed on once to the running trials; their parameters are enqueued again, so
  the same command later re-runs them (from scratch, in a new trial folder).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from emotion_dist.commands.sweep import Sweep, load_sweep, record
from emotion_dist.config import format_default
from emotion_dist.errors import ConfigError
from emotion_dist.utils.output import MARKER, emit, text_stream

JOURNAL = "optuna.log"


class TrialStopped(Exception):
    """A trial cut short by a stop signal: FAIL in the study (not counted toward --trials), its
    parameters enqueued again."""


class TrialFailed(Exception):
    """A trial whose training exited with an error (its sweep.log says which)."""
OBJECTIVE = "val_macro_f1"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs the optuna package: pip install 'emotion-dist[search]'") from None
    return optuna


def suggest(trial, search: dict) -> dict:
    """One value per key of the search space, as Optuna suggests it."""
    params = {}
    for key, space in search.items():
        if isinstance(space, list):
            params[key] = trial.suggest_categorical(key, space)
        elif all(isinstance(space[k], int) and not isinstance(space[k], bool) for k in ("low", "high")) \
                and isinstance(space.get("step", 1), int) and not space.get("log"):
            params[key] = trial.suggest_int(key, space["low"], space["high"], step=space.get("step", 1))
        else:
            params[key] = trial.suggest_float(key, float(space["low"]), float(space["high"]),
                                              log=bool(space.get("log")), step=space.get("step"))
    return params


def _epochs(metrics: Path, seen: int) -> list[dict]:
    """Epoch rows of a trial's metrics.jsonl after the first `seen` (a line cut short is skipped)."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("type") == "epoch" and isinstance(row.get(OBJECTIVE), (int, float)):
            rows.append(row)
    return rows[seen:]


class Search:
    def __init__(self, sweep: Sweep, args):
        from emotion_dist.distributed import interrupts

        self.optuna = _optuna()
        self.sweep, self.args, self.interrupts = sweep, args, interrupts
        sweep.folder.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(sweep.folder / JOURNAL)))
        self.study = self.optuna.create_study(
            study_name=sweep.name, storage=storage, direction="maximize", load_if_exists=True,
            sampler=self.optuna.samplers.TPESampler(seed=sweep.seeds[0]),
            pruner=self.optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
        self.lock = threading.Lock()
        self.children: list[subprocess.Popen] = []
        self.out = text_stream(args)

    def objective(self, trial) -> float:
        if self.interrupts.requested():  # a worker thread taking a trial after the stop: none started
            self.study.stop()
            raise TrialStopped(f"stopped by {self.interrupts.requested()} before it started")
        params = suggest(trial, self.sweep.search)
        run_dir = self.sweep.folder / f"trial-{trial.number:04d}"
        overrides = [*self.sweep.base, *(f"{k}={v if isinstance(v, str) else format_default(v)}"
                                         for k, v in params.items()),
                     f"train.seed={self.sweep.seeds[0]}", f"run.dir={run_dir}", "run.resume=auto"]
        configs = [a for c in self.sweep.config for a in ("--config", c)]
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        print(f"trial {trial.number}: {' '.join(f'{k}={v}' for k, v in params.items())} -> {run_dir}",
              file=self.out, flush=True)
        with open(run_dir / "sweep.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "emotion_dist.cli", "train", *configs, *overrides],
                                    stdout=log, stderr=log, start_new_session=True)
            with self.lock:
                self.children.append(proc)
            seen, best, pruned = 0, None, False
            try:
                while True:
                    code = proc.poll()
                    for row in _epochs(run_dir / "metrics.jsonl", seen):
                        seen += 1
                        value = float(row[OBJECTIVE])
                        best = value if best is None else max(best, value)
                        trial.report(value, step=int(row["epoch"]))
                        if not pruned and code is None and trial.should_prune():
                            pruned = True
                            proc.send_signal(signal.SIGTERM)  # it checkpoints and exits 0
                    if code is not None:
                        break
                    if self.interrupts.requested():
                        proc.wait()
                        self.study.enqueue_trial(params)  # the same command later runs these again
                        self.study.stop()  # Optuna allows it only from inside the optimize loop
                        raise TrialStopped(f"stopped by {self.interrupts.requested()}")
                    time.sleep(0.5)
            finally:
                with self.lock:
                    self.children.remove(proc)
        if pruned:
            print(f"trial {trial.number}: pruned after epoch {seen} (validation macro-F1 {best:.4f})",
                  file=self.out, flush=True)
            raise self.optuna.TrialPruned()
        if code != 0 or best is None:
            print(f"trial {trial.number}: failed (exit {code}); see {run_dir / 'sweep.log'}", file=self.out, flush=True)
            raise TrialFailed(f"exit {code}")
        print(f"trial {trial.number}: best validation macro-F1 {best:.4f}", file=self.out, flush=True)
        return best

    def forward_signal(self) -> None:
        """Once: the running trials get the signal this process got (then they save and leave)."""
        name = self.interrupts.requested()
        with self.lock:
            for proc in self.children:
                proc.send_signal(getattr(signal, name))

    def done_trials(self) -> int:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def run(self) -> dict:
        self.interrupts.install()
        left = self.args.trials - self.done_trials()
        print(f"search {self.sweep.name}: {self.done_trials()} of {self.args.trials} trials done in "
              f"{self.sweep.folder / JOURNAL}, {max(left, 0)} to run, {self.args.parallel} at a time", file=self.out,
              flush=True)
        if left > 0:
            stop = threading.Event()

            def watch() -> None:  # the main thread waits inside optimize(): pass the stop on from here
                while not stop.wait(0.2):
                    if self.interrupts.requested():
                        self.forward_signal()
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
            cap = self.optuna.study.MaxTrialsCallback(self.args.trials, states=states)
            try:
                self.study.optimize(self.objective, n_trials=left, n_jobs=self.args.parallel, callbacks=[cap],
                                    catch=(TrialStopped, TrialFailed))
            finally:
                stop.set()
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            trials.append({"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                           "run_dir": t.user_attrs.get("run_dir")})
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        best = max(complete, key=lambda t: t["value"]) if complete else None
        return {"trials": trials, "best": best, "stopped": self.interrupts.requested()}


def run_search(args) -> int:
    sweep = load_sweep(args.file, args.out)
    if not sweep.search:
        raise ConfigError(f"{args.file} has no `search:` space for --search optuna (key: [choices] or "
                          f"{{low: X, high: Y, log: true}})")
    if args.list or args.point is not None:
        raise ConfigError("--list and --point are the grid's; with --search optuna run the same command on each "
                          "worker (they share the study's journal)")
    import logging

    _optuna().logging.set_verbosity(logging.ERROR)  # one line per trial, ours, says what happened
    sweep.searching = True
    record(sweep)
    result = Search(sweep, args).run()
    best = result["best"]
    print(f"search {sweep.name}: " + (f"best trial {best['number']} (validation macro-F1 {best['value']:.4f}): "
                                       f"{' '.join(f'{k}={v}' for k, v in best['params'].items())} in {best['run_dir']}"
                                       if best else "no trial completed yet")
          + (f"; stopped by {result['stopped']}: the same command carries on" if result["stopped"] else ""),
          file=text_stream(args), flush=True)
    emit(args, {MARKER: "sweep", "name": sweep.name, "folder": str(sweep.folder), "search": "optuna", **result})
    from emotion_dist.distributed import interrupts

    return interrupts.exit_code(result["stopped"]) if result["stopped"] else 0
