"""Stop signals in the training run's evaluation phases (real processes, real signals): SIGTERM
during validation and SIGUSR1 during the final test pass end the run within STOP_CHECK_BATCHES
evaluation batches with exit 0; the resumed run redoes that phase and completes the record, and a finished
run resumed again has nothing to do."""

import json
import signal
import subprocess
import time

import pytest
from conftest import ROOT, env_for_child, run, train_cmd, without

from emotion_dist.modelio import load_checkpoint

pytestmark = pytest.mark.slow
from emotion_dist.training.validation import STOP_CHECK_BATCHES  # noqa: E402

DELAY_S = 0.5  # each evaluation batch is slowed to this, so the signal lands mid-phase
LIMIT_S = 60  # a sanity bound on the time to exit; the bound itself is counted in batches


def _signal_in_phase(cmd, phase_file, phase: str, sig) -> tuple[subprocess.CompletedProcess, int]:
    """Run until `phase` starts, send `sig`, and return the finished process and the number of
    evaluation batches that began after the signal was sent."""
    env = env_for_child(EMOTION_DIST_PHASE_FILE=phase_file, EMOTION_DIST_EVAL_DELAY_S=DELAY_S)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (phase_file.is_file() and phase in phase_file.read_text().splitlines()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the run never reached {phase}"
        time.sleep(0.05)
    before = phase_file.read_text().splitlines().count("eval batch")
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < LIMIT_S
    after = phase_file.read_text().splitlines().count("eval batch") - before
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), after


def _records(run_dir, kind: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["type"] == kind]


def test_sigterm_during_validation_saves_and_the_resumed_run_redoes_it(tmp_path, fast_overrides):
    args = [*without(fast_overrides, "train.epochs"), "train.epochs=1"]
    stopped, batches = _signal_in_phase(train_cmd(*args), tmp_path / "phases", "validation", signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert batches <= STOP_CHECK_BATCHES, f"{batches} evaluation batches ran after the signal"
    assert "stop requested (SIGTERM) during validation" in stopped.stdout + stopped.stderr
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["epoch"] == 0 and state["sampler"]["consumed"] == state["sampler"]["n"]  # trained, not validated
    assert _records(tmp_path / "run", "epoch") == []
    run(train_cmd(*args))
    epochs = _records(tmp_path / "run", "epoch")
    assert [r["epoch"] for r in epochs] == [1]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1


def test_sigusr1_during_the_test_pass_leaves_training_intact_and_resume_runs_only_the_test(tmp_path, fast_overrides):
    args = [*without(fast_overrides, "train.epochs", "train.eval_test"), "train.epochs=1", "train.eval_test=true"]
    stopped, batches = _signal_in_phase(train_cmd(*args), tmp_path / "phases", "test pass", signal.SIGUSR1)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert batches <= STOP_CHECK_BATCHES, f"{batches} evaluation batches ran after the signal"
    assert "stop requested (SIGUSR1) during test pass" in stopped.stdout + stopped.stderr
    before = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert before["epoch"] == 1 and not before["test_recorded"] and _records(tmp_path / "run", "test") == []
    resumed = run(train_cmd(*args))
    assert "test (best.pt" in resumed.stdout + resumed.stderr
    assert len(_records(tmp_path / "run", "epoch")) == 1 and len(_records(tmp_path / "run", "test")) == 1
    after = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert after["test_recorded"] and after["global_step"] == before["global_step"]
    again = run(train_cmd(*args))
    assert "already finished at epoch 1 (test pass recorded); nothing to do" in again.stdout + again.stderr
    assert len(_records(tmp_path / "run", "test")) == 1
