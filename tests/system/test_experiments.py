"""A new user's first hour, in-process: `emotion-dist checks`, mistakes on the command line (a
mistyped command, `--epochs 3`), repeated --config files, run names (runs/NAME, runs/NAME2),
run directories shared with a user's own files, evaluate's default TTA, the exit code of Ctrl-C,
summarize's warnings, and the Python API's load/predict."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch  # at collection: importing torch the first time runs ldconfig, a process
import yaml
from conftest import write_checkpoint

from emotion_dist import cli


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own mistakes
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------ checks
def test_checks_reports_the_environment_as_json(capsys, tmp_path):

    code, out, err = _main(["checks", "--json", f"run.dir={tmp_path / 'run'}"], capsys)
    doc = json.loads(out)
    assert code == 0, err
    assert doc["emotion_dist"] == "checks" and doc["problems"] == []
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0] or doc["versions"]["torch"] in torch.__version__
    assert doc["cuda"]["available"] == torch.cuda.is_available()
    assert len(doc["cuda"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert doc["launch"]["launcher"] == "python" and doc["launch"]["world_size"] == 1
    assert doc["space"]["run.dir"]["free_gib"] > 0
    assert "sinfo" in doc["slurm"]["commands"]
    assert "packages:" in err  # the human report went to stderr


def test_checks_exits_2_when_the_config_needs_a_gpu_that_is_missing(capsys):

    code, out, err = _main(["checks", "train.device=cuda"], capsys)
    if torch.cuda.is_available():
        assert code == 0, out
    else:
        assert code == 2
        assert "problem:" in out and "train.device=cuda but no CUDA device is visible" in out


def test_checks_names_a_broken_launch_environment_and_a_missing_data_root(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = _main(["checks", "data.source=folder", f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert code == 2
    assert "rank 3 is outside world size 2" in out
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in out


def test_checks_takes_a_config_file_like_train(capsys, tmp_path):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("train:\n  device: cuda\n")

    code, _, _ = _main(["checks", "--config", str(cfg)], capsys)
    assert code == (0 if torch.cuda.is_available() else 2)


# ------------------------------------------------------------------------------------ the command line
def test_a_config_key_given_as_a_flag_gets_its_key_value_form(capsys):
    code, _, err = _main(["train", "--epochs", "3"], capsys)
    assert code == 2
    assert "unrecognized argument --epochs" in err and "use train.epochs=3" in err
    code, _, err = _main(["train", "--lr=0.01"], capsys)
    assert code == 2 and "use train.lr=0.01" in err
    code, _, err = _main(["train", "--confg", "x.yaml"], capsys)
    assert code == 2 and "did you mean --config?" in err
    code, _, err = _main(["predict", "--chekpoint", "m.pt", "x.jpg"], capsys)  # not "--checkpoint is required"
    assert code == 2 and "unrecognized argument --chekpoint; did you mean --checkpoint?" in err
    code, _, err = _main(["config", "keys", "--markdwn"], capsys)
    assert code == 2 and "did you mean --markdown?" in err


def test_a_mistyped_command_gets_a_did_you_mean(capsys):
    code, _, err = _main(["evalute", "--checkpoint", "x.pt"], capsys)
    assert code == 2 and "did you mean evaluate?" in err
    code, _, err = _main(["frobnicate"], capsys)
    assert code == 2 and "the commands are train" in err


@pytest.mark.parametrize("command", ["evaluate", "export", "summarize", "checks", "sweep"])
def test_every_command_help_has_a_description(command, capsys):
    code, out, _ = _main([command, "--help"], capsys)
    assert code == 0
    usage, rest = out.split("\n\n", 1)
    first = rest.strip().splitlines()[0]
    assert not first.startswith(("positional arguments", "options")), f"{command} --help has no description"
    assert len(first) > 20


def test_config_keys_json_writes_only_the_json(capsys):
    code, out, err = _main(["config", "keys", "--json"], capsys)
    assert code == 0
    assert err == ""
    keys = [k["key"] for k in json.loads(out)["keys"]]
    assert "run.name" in keys and "run.exist_ok" in keys


# ------------------------------------------------------------------------------------ repeated --config
def test_repeated_config_files_merge_in_order_and_say_who_set_what(tmp_path):
    from emotion_dist.config import config_sources, load_config

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  epochs: 5\n  lr: 0.01\ndata:\n  image_size: 32\n")
    b.write_text("train:\n  lr: 0.001\n")
    cfg, given = load_config([str(a), str(b)], ["data.image_size=64"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.image_size) == (5, 0.001, 64)  # b over a, the line over both
    assert {"train.epochs", "train.lr", "data.image_size"} <= given
    notes = config_sources([str(a), str(b)])
    assert notes[0] == f"--config {a} set train.epochs, train.lr, data.image_size"
    assert notes[1] == f"--config {b} set train.lr (over {a} for train.lr)"
    assert config_sources([str(a)]) == []


def test_the_command_line_collects_every_config(tmp_path):
    args = cli.parse_args(["train", "--config", "a.yaml", "train.epochs=2", "--config", "b.yaml"])
    assert args.config == ["a.yaml", "b.yaml"] and args.overrides == ["train.epochs=2"]


# ------------------------------------------------------------------------------------ run names, run dirs
def _finished_run(run_dir: Path, *, epoch: int = 12, test: bool = True) -> Path:
    """A run directory as a finished run leaves it: run.json owning last.pt at `epoch`, and its test record."""
    from emotion_dist.training.checkpoint import CheckpointFiles

    files = CheckpointFiles(run_dir)
    files.begin()
    write_checkpoint(run_dir / "checkpoints" / "last.pt", epoch=epoch, global_step=10 * epoch, best_epoch=epoch)
    files._own(["last.pt"])
    rows = [{"type": "epoch", "epoch": epoch, "step": 10 * epoch}]
    if test:
        rows.append({"type": "test", "step": 10 * epoch, "accuracy": 0.5, "macro_f1": 0.25})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _cfg(*overrides):
    from emotion_dist.config import load_config

    return load_config(None, list(overrides))[0]


def test_runs_go_to_runs_name_then_name2(tmp_path, monkeypatch):
    from emotion_dist.training.checkpoint import choose_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = _cfg("run.name=exp")
    assert choose_run_dir(cfg.run, cfg.train, False) == ("runs/exp", None)
    _finished_run(tmp_path / "runs/exp")
    path, note = choose_run_dir(cfg.run, cfg.train, False)
    assert path == "runs/exp2" and "runs/exp holds a finished run" in note
    _finished_run(tmp_path / "runs/exp2")
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == "runs/exp3"
    cfg = _cfg("run.name=exp", "run.exist_ok=true")
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == "runs/exp"
    cfg = _cfg("run.name=exp", "run.resume=auto")
    assert choose_run_dir(cfg.run, cfg.train, True)[0] == "runs/exp"  # asked to resume: that run, finished or not
    cfg = _cfg("run.name=exp", f"run.dir={tmp_path / 'mine'}")
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == str(tmp_path / "mine")


def test_a_run_in_progress_is_not_joined(tmp_path, monkeypatch):
    from emotion_dist.training.checkpoint import choose_run_dir

    monkeypatch.chdir(tmp_path)
    busy = _finished_run(tmp_path / "runs/exp", epoch=3, test=False)
    (busy / "lease.json").write_text(json.dumps({"emotion_dist": "lease"}))  # just refreshed: a job holds it
    cfg = _cfg("run.name=exp")
    path, note = choose_run_dir(cfg.run, cfg.train, False)
    assert path == "runs/exp2" and "runs/exp holds a run in progress" in note


def test_an_unfinished_run_is_resumed_not_skipped(tmp_path, monkeypatch):
    from emotion_dist.training.checkpoint import choose_run_dir

    monkeypatch.chdir(tmp_path)
    _finished_run(tmp_path / "runs/exp", epoch=3, test=False)  # 3 of 12 epochs: interrupted
    cfg = _cfg("run.name=exp")
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == "runs/exp"
    cfg = _cfg("run.name=exp", "run.resume=never")
    assert choose_run_dir(cfg.run, cfg.train, False)[0] == "runs/exp2"  # never resumes: a fresh folder


def test_a_finished_run_has_nothing_to_do_unless_its_test_pass_is_missing(tmp_path):
    from emotion_dist.training.checkpoint import finished_message, run_status

    train = _cfg().train
    done = finished_message(_finished_run(tmp_path / "a"), train)
    assert done is not None
    line, result = done
    assert "already finished at epoch 12 (test pass recorded); nothing to do" in line
    assert result["test_macro_f1"] == 0.25 and result["already_finished"]
    no_test = _finished_run(tmp_path / "b", test=False)
    assert finished_message(no_test, train) is None and run_status(no_test, train).kind == "finished"
    assert finished_message(no_test, _cfg("train.eval_test=false").train) is not None
    assert finished_message(_finished_run(tmp_path / "c"), _cfg("train.epochs=20").train) is None  # more epochs


def test_a_run_writes_beside_a_users_own_files(tmp_path):
    from emotion_dist.training.checkpoint import check_run_dir

    d = tmp_path / "x"
    d.mkdir()
    (d / "train.log").write_text("my own log\n")
    (d / "slurm-123.out").write_text("")
    check_run_dir(d)  # no refusal: those names are not emotion-dist's


def test_a_data_tree_is_never_a_run_dir(tmp_path):
    from emotion_dist.errors import ConfigError
    from emotion_dist.training.checkpoint import check_run_dir

    d = tmp_path / "my-fer"
    (d / "train" / "happy").mkdir(parents=True)
    (d / "notes.txt").write_text("")
    with pytest.raises(ConfigError,
                       match=r"not an emotion-dist run directory and holds folders of its own \(.*my-fer/train/\)"):
        check_run_dir(d)


def test_the_refusal_names_the_file_in_the_way(tmp_path):
    from emotion_dist.errors import ConfigError
    from emotion_dist.training.checkpoint import check_run_dir

    d = tmp_path / "x"
    d.mkdir()
    (d / "train.log").write_text("")
    (d / "config.yaml").write_text("my: own\n")
    with pytest.raises(ConfigError, match=r"holds .*x/config\.yaml, which emotion-dist did not write"):
        check_run_dir(d)
    (d / "config.yaml").unlink()
    (d / "lease.json").write_text(json.dumps({"emotion_dist": "lease"}))  # a run starting there: ours
    check_run_dir(d)


def test_run_name_must_be_a_folder_name():
    from emotion_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="run.name='a/b' must be a plain folder name"):
        _cfg("run.name=a/b")


# ------------------------------------------------------------------------------------ evaluate's TTA
def test_evaluate_defaults_to_the_tta_of_the_checkpoints_recipe():
    from emotion_dist.commands.evaluate import default_tta

    assert cli.parse_args(["evaluate", "--checkpoint", "x.pt"]).tta is None  # no --tta: decided per checkpoint
    assert cli.parse_args(["evaluate", "--checkpoint", "x.pt", "--tta"]).tta == "flip"
    state = {"config": {"train": {"test_tta": "flip"}}}
    assert default_tta(state, [])[0] == "flip" and "checkpoint" in default_tta(state, [])[1]
    assert default_tta({"config": {"train": {"test_tta": "tencrop"}}}, [])[0] == "tencrop"
    assert default_tta({}, []) == ("none", "the checkpoint records no train.test_tta")
    assert default_tta(state, ["train.test_tta=none"])[0] == "none"
    assert default_tta(state, [], "val") == ("none", "as training validated")  # validation never used TTA


# ------------------------------------------------------------------------------------ signals
def test_ctrl_c_exits_130_and_a_schedulers_signal_0():
    from emotion_dist.distributed import interrupts

    assert interrupts.exit_code("SIGINT") == 130
    assert interrupts.exit_code("SIGTERM") == 0 and interrupts.exit_code("SIGUSR1") == 0
    previous = signal.getsignal(signal.SIGINT)
    try:
        interrupts.install()
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, to this process
        assert interrupts.requested() == "SIGINT" and interrupts.exit_code() == 130
    finally:
        interrupts.uninstall()
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------ summarize
def _recorded_run(run_dir: Path, *, seed: int, epochs: int, acc: float) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed, "epochs": epochs},
                                                         "run": {"dir": str(run_dir)}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"type": "test", "step": 5, "accuracy": acc, "macro_f1": acc,
                                                       "count": 63, "tta": "flip"}) + "\n")
    return run_dir


def test_summarize_warns_when_it_averages_different_recipes(tmp_path, capsys):
    a = _recorded_run(tmp_path / "a", seed=0, epochs=12, acc=0.9)
    b = _recorded_run(tmp_path / "b", seed=0, epochs=2, acc=0.5)
    code, out, err = _main(["summarize", str(a), str(b), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert "train.epochs (12, 2)" in doc["warnings"][0] and "seed 0 appears more than once" in doc["warnings"][1]
    assert "warning: the runs differ in more than the seed: train.epochs (12, 2)" in err
    c = _recorded_run(tmp_path / "c", seed=1, epochs=12, acc=0.8)
    code, out, _ = _main(["summarize", str(a), str(c), "--json"], capsys)
    assert json.loads(out)["warnings"] == []  # one recipe, two seeds: nothing to say


def test_summarize_hint_names_the_flag_that_exists(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 1}) + "\n")
    code, _, err = _main(["summarize", str(d)], capsys)
    assert code == 2 and "--json-out FILE" in err and "--json FILE" not in err


# ------------------------------------------------------------------------------------ the Python API
def _astronaut() -> str:
    import skimage.data

    return str(Path(skimage.data.__file__).parent / "astronaut.png")


def test_import_emotion_dist_loads_nothing_heavy():
    import sys

    import emotion_dist

    assert "load" in dir(emotion_dist) and callable(emotion_dist.load)
    heavy = [m for m in ("emotion_dist.api",) if m in sys.modules]
    # the API module itself is light: only asking for the model class loads torch's side
    assert "emotion_dist.model" not in sys.modules or heavy is not None


def test_load_and_predict_answer_as_the_cli_does(unit_checkpoint, capsys):
    import numpy as np

    import emotion_dist as ed
    from emotion_dist.inference.predict import TorchClassifier, predict

    model = ed.load(unit_checkpoint)
    assert model.classes == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"] or model.classes
    faces = model.predict(_astronaut())
    assert len(faces) == 1 and faces.messages == []
    cli_faces, _ = predict(TorchClassifier(str(unit_checkpoint)), [_astronaut()])
    assert [(f.box, f.label, f.probabilities) for f in faces] == [(f.box, f.label, f.probabilities) for f in cli_faces]
    code, out, _ = _main(["predict", "--checkpoint", str(unit_checkpoint), _astronaut(), "--json"], capsys)
    assert code == 0 and json.loads(out)["faces"][0]["label"] == faces[0].label
    # the same picture in memory (as a notebook holds it) gives the same answer
    from skimage import data

    in_memory = model.predict(data.astronaut())
    assert in_memory[0].box == faces[0].box
    assert np.allclose(list(in_memory[0].probabilities.values()), list(faces[0].probabilities.values()), atol=1e-6)


def test_predict_says_which_inputs_had_no_face(unit_checkpoint):
    import skimage.data

    import emotion_dist as ed

    folder = Path(skimage.data.__file__).parent
    faces = ed.load(unit_checkpoint).predict([str(folder / "astronaut.png"), str(folder / "chelsea.png")])
    assert [Path(f.file).name for f in faces] == ["astronaut.png"]
    assert len(faces.messages) == 1 and "chelsea.png: no face found" in faces.messages[0]
    crops = ed.load(unit_checkpoint).predict(str(folder / "chelsea.png"), detect=False)  # a crop: one "face"
    assert len(crops) == 1


def test_load_takes_an_export_folder_and_onnx(unit_checkpoint, tmp_path):
    import numpy as np

    import emotion_dist as ed
    from emotion_dist.commands.export import export

    out = tmp_path / "exported"
    out.mkdir()
    onnx = export(str(unit_checkpoint), "onnx", str(out) + "/")
    by_folder, by_file, by_pt = ed.load(out), ed.load(onnx), ed.load(unit_checkpoint)
    assert by_folder.kind == by_file.kind == "onnx" and by_pt.kind == "torch"
    assert by_folder.classes == by_pt.classes
    a, b = by_folder.predict(_astronaut()), by_pt.predict(_astronaut())
    assert a[0].box == b[0].box and a[0].label == b[0].label
    assert np.allclose(list(a[0].probabilities.values()), list(b[0].probabilities.values()), atol=1e-4)


def test_load_refuses_what_it_cannot_use(tmp_path):
    import emotion_dist as ed
    from emotion_dist.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        ed.load(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model"):
        ed.load(tmp_path / "empty")


def test_emotionnet_is_the_model_class():
    import emotion_dist as ed
    from emotion_dist.model import EmotionNet

    assert ed.EmotionNet is EmotionNet
