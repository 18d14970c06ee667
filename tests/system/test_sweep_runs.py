"""`emotion-dist sweep FILE --parallel 2` as a user runs it: two points at once, each a real
training process in its own run directory; the same command again skips both (finished, test pass
recorded); summarize ranks them."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli_cmd, run


@pytest.mark.slow
def test_a_local_sweep_runs_its_points_and_a_rerun_skips_them(tiny_data, tmp_path):
    spec = {"name": "tiny", "seeds": [0],
            "base": {"data.source": "folder", "data.root": str(tiny_data), "data.image_size": 32, "data.limit": 16,
                     "train.batch_size": 16, "train.epochs": 1, "train.channels_last": False,
                     "run.cache_dir": str(tmp_path / "cache")},
            "grid": {"train.lr": [0.001, 0.004]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    proc = run(cli_cmd("sweep", "sweep.yaml", "--parallel", "2"), cwd=tmp_path, timeout=240)
    assert "2 points in sweeps/tiny (0 finished, 2 to run, 2 at a time)" in proc.stdout
    assert "sweep tiny: 2 ran, 0 already finished" in proc.stdout
    for name in ("lr=0.001_seed0", "lr=0.004_seed0"):
        rows = [json.loads(r) for r in (tmp_path / "sweeps/tiny" / name / "metrics.jsonl").read_text().splitlines()]
        assert any(r["type"] == "test" for r in rows), name
        assert (tmp_path / "sweeps/tiny" / name / "sweep.log").is_file()  # each point's output, beside its run
    again = run(cli_cmd("sweep", "sweep.yaml"), cwd=tmp_path, timeout=60)
    assert "sweep tiny: 0 ran, 2 already finished" in again.stdout
    summary = json.loads(run(cli_cmd("summarize", "sweeps/tiny", "--json"), cwd=tmp_path).stdout)
    assert sorted(r["point"] for r in summary["points"]) == ["train.lr=0.001", "train.lr=0.004"]


def test_an_optuna_search_shares_its_journal_and_carries_on(tiny_data, tmp_path):
    """Two trials, two at a time, in one journal file (no database); the same command again finds
    the study done; summarize lists the trials."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    spec = {"name": "s", "seeds": [0],
            "base": {"data.source": "folder", "data.root": str(tiny_data), "data.image_size": 32, "data.limit": 16,
                     "train.batch_size": 16, "train.epochs": 1, "train.channels_last": False,
                     "run.cache_dir": str(tmp_path / "cache")},
            "search": {"train.lr": {"low": 0.0005, "high": 0.01, "log": True}}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(spec))
    cmd = cli_cmd("sweep", "search.yaml", "--search", "optuna", "--trials", "2", "--parallel", "2")
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert "0 of 2 trials done" in proc.stdout and "best trial" in proc.stdout
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "sweeps/s/optuna.log")))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all((tmp_path / t.user_attrs["run_dir"] / "checkpoints/best.pt").is_file() for t in trials)
    again = run(cmd, cwd=tmp_path, timeout=60)
    assert "2 of 2 trials done" in again.stdout and "0 to run" in again.stdout
    summary = json.loads(run(cli_cmd("summarize", "sweeps/s", "--json"), cwd=tmp_path).stdout)
    assert sorted(r["point"].split(":")[0] for r in summary["points"]) == ["trial-0000", "trial-0001"]
