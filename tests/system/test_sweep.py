"""`emotion-dist sweep FILE`'s grid, in-process: the points and their run directories, the
arguments slurm/sweep.sbatch starts for a task, mistakes in the file, finished points skipped, and
`summarize SWEEP_DIR` ranking the points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch  # noqa: F401  (at collection: importing torch the first time runs ldconfig, a process)
import yaml
from test_experiments import _finished_run, _main, _recorded_run


def _sweep_file(tmp_path: Path, **spec) -> Path:
    spec = {"name": "lr", "base": {"train.epochs": 12}, "grid": {"train.lr": [0.001, 0.002],
                                                                 "train.weight_decay": [0.05]},
            "seeds": [0, 1], **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_grid_becomes_numbered_points_each_with_its_run_dir(tmp_path, monkeypatch, capsys):
    from emotion_dist.commands.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(str(_sweep_file(tmp_path)))
    assert [(p.index, p.overrides, p.seed) for p in sweep.points] == [
        (0, ["train.lr=0.001", "train.weight_decay=0.05"], 0), (1, ["train.lr=0.001", "train.weight_decay=0.05"], 1),
        (2, ["train.lr=0.002", "train.weight_decay=0.05"], 0), (3, ["train.lr=0.002", "train.weight_decay=0.05"], 1)]
    assert sweep.points[1].run_dir == "sweeps/lr/lr=0.001_weight_decay=0.05_seed1"
    code, out, _ = _main(["sweep", str(tmp_path / "sweep.yaml"), "--list", "--json"], capsys)
    assert code == 0 and [p["run_dir"] for p in json.loads(out)["points"]] == [p.run_dir for p in sweep.points]
    code, out, _ = _main(["sweep", str(tmp_path / "sweep.yaml"), "--point", "2", "--args"], capsys)
    assert code == 0
    assert out.splitlines() == ["train.epochs=12", "train.lr=0.002", "train.weight_decay=0.05", "train.seed=0",
                                "run.dir=sweeps/lr/lr=0.002_weight_decay=0.05_seed0", "run.resume=auto"]
    assert json.loads((tmp_path / "sweeps/lr/sweep.json").read_text())["emotion_dist"] == "sweep"


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"train.lr": 0.1}}, "`grid` must map config keys to non-empty lists"),
    ({"grid": {"train.lrr": [0.1]}},
     "sweep point 0 (train.lrr=0.1): unknown config key 'train.lrr'; did you mean train.lr"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
    ({"grdi": {}}, "unknown key 'grdi'"),
    ({"grid": {"train.seed": [1, 2]}}, "put the seeds under `seeds:`"),
])
def test_mistakes_in_the_sweep_file_are_one_line_before_anything_runs(spec, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["sweep", str(_sweep_file(tmp_path, **spec)), "--list"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "sweeps").exists()


def test_a_point_out_of_range_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["sweep", str(_sweep_file(tmp_path)), "--point", "4", "--args"], capsys)
    assert code == 2 and "the sweep has points 0 to 3" in err


def test_finished_points_are_skipped(tmp_path, monkeypatch):
    from emotion_dist.commands.sweep import load_sweep, point_done

    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(str(_sweep_file(tmp_path)))
    _finished_run(Path(sweep.points[0].run_dir))  # 12 epochs and its test pass
    _finished_run(Path(sweep.points[1].run_dir), epoch=4, test=False)  # interrupted: it resumes
    assert [point_done(sweep, p) for p in sweep.points] == [True, False, False, False]


def test_summarize_a_sweep_ranks_its_points(tmp_path, monkeypatch, capsys):
    from emotion_dist.commands.sweep import load_sweep, record

    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(str(_sweep_file(tmp_path)))
    record(sweep)
    for p, acc in zip(sweep.points, (0.5, 0.6, 0.8, 0.9)):
        _recorded_run(Path(p.run_dir), seed=p.seed, epochs=12, acc=acc)
    code, out, err = _main(["summarize", "sweeps/lr", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert [r["point"] for r in doc["points"]] == ["train.lr=0.002 train.weight_decay=0.05",
                                                   "train.lr=0.001 train.weight_decay=0.05"]
    best = doc["points"][0]
    assert best["n"] == 2 and best["macro_f1"]["mean"] == pytest.approx(0.85)
    assert best["macro_f1"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert "sweep lr" in err and doc["pending"] == []
    from PIL import Image

    with Image.open(doc["plot"]) as img:  # the ranking as a picture, in the sweep folder
        assert img.format == "PNG" and img.size[0] == 800


# ------------------------------------------------------------------------------------ --search optuna
def test_the_search_space_is_checked_and_suggested_as_written(tmp_path, monkeypatch):
    import optuna

    from emotion_dist.commands.search import suggest
    from emotion_dist.commands.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    space = {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "train.class_weights": ["none", "sqrt"],
             "train.grad_accum": {"low": 1, "high": 4}}
    sweep = load_sweep(str(_sweep_file(tmp_path, grid={}, search=space)))
    assert sweep.search == space
    fixed = optuna.trial.FixedTrial({"train.lr": 3e-3, "train.class_weights": "sqrt", "train.grad_accum": 2})
    assert suggest(fixed, sweep.search) == {"train.lr": 3e-3, "train.class_weights": "sqrt", "train.grad_accum": 2}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = suggest(study.ask(), sweep.search)
    assert 1e-4 <= params["train.lr"] <= 1e-2 and isinstance(params["train.grad_accum"], int)


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "low must be a number below high"),
    ({"train.lr": {"low": 0, "high": 0.01, "log": True}}, "log: true needs low > 0"),
    ({"train.lrr": [0.1]}, "search train.lrr: unknown config key 'train.lrr'"),
    ({"train.lr": 0.1}, "must be a list of choices or {low: X, high: Y}"),
])
def test_a_bad_search_space_is_one_line(space, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["sweep", str(_sweep_file(tmp_path, grid={}, search=space)), "--search", "optuna"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_search_without_a_space_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["sweep", str(_sweep_file(tmp_path)), "--search", "optuna"], capsys)
    assert code == 2 and "has no `search:` space" in err
