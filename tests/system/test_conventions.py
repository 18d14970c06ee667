"""The ecosystem's conventions: one JSON document with --json, the launcher's and W&B's
settings honoured or refused, overrides anywhere, config keys generated from the config classes,
TensorBoard event streams that survive a resume, and terminal output that reads well."""

import argparse
import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, built_once, env_for_child, run, train_cmd

from emotion_dist.cli import build_parser, parse_args
from emotion_dist.cli import main as cli_main
from emotion_dist.config import Config, describe_keys, keys_markdown, load_config
from emotion_dist.distributed.env_settings import apply_environment
from emotion_dist.training.loggers import ConsoleSink, TimeLeft
from emotion_dist.utils.fsutil import DIGEST_KEY

ANSI = "\x1b"


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def wandb_records(path: Path):
    """The records of an offline W&B run file (`run-<id>.wandb`): LevelDB-log framing (7-byte header,
    32 KiB blocks, records of crc32 + length + type + data, split across blocks) around
    wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = [chunk] if kind in (1, 2) else [*parts, chunk]  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            yield rec


@pytest.fixture
def restore_signals():
    """In-process commands install emotion-dist's stop-signal handlers; give pytest its own back."""
    import signal

    from emotion_dist.distributed.interrupts import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """One tiny run (4 steps of 8 images, a test pass) with --json/--json-out, TensorBoard and an
    offline W&B run configured from WANDB_* variables; then the same run resumed from its step-1
    checkpoint with a changed config (the steps after it are done again)."""
    def build(d: Path) -> None:
        base = ["data.source=folder", f"data.root={tiny_data}", "data.image_size=32", "data.val_fraction=0.2",
                "data.limit=16", "train.batch_size=8", "train.epochs=2", "train.channels_last=false",
                f"run.cache_dir={d / 'cache'}", f"run.dir={d / 'run'}", "ckpt.every_steps=1", "ckpt.keep=5",
                "log.tensorboard=true", "log.pictures=true"]
        env = env_for_child(WANDB_PROJECT="env-project", WANDB_NAME="env-name", WANDB_RUN_GROUP="env-group",
                            WANDB_TAGS="t1,t2")
        # overrides before and after the flags; log.wandb_project on the command line beats WANDB_PROJECT
        first = run(train_cmd("log.every_steps=1", "--json", *base, "--json-out", str(d / "result.json"),
                              "log.wandb=offline", "log.wandb_project=cli-project"), env=env)
        resumed = run(train_cmd(*base, f"run.resume={d / 'run/checkpoints/step-00000001.pt'}", "log.every_steps=2"))
        for name, proc in (("first", first), ("resumed", resumed)):  # for the workers that did not run them
            (d / f"{name}.json").write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))

    d = built_once(tmp_path_factory, "conventions", build)
    first, resumed = (SimpleNamespace(**json.loads((d / f"{n}.json").read_text())) for n in ("first", "resumed"))
    return d, first, resumed


# ---------------------------------------------------------------- 1. one output convention
@pytest.mark.slow
def test_train_json_is_the_only_thing_on_stdout(trained):
    d, first, _ = trained
    doc = json.loads(first.stdout)  # the whole of stdout is one document
    assert doc == json.loads((d / "result.json").read_text())
    assert doc["emotion_dist"] == "train" and doc["global_step"] == 4 and doc["stopped"] is False
    assert 0 <= doc["test_accuracy"] <= 1 and doc["launcher"] == "python" and doc["world_size"] == 1
    assert "launcher python | world size 1" in first.stderr and "done:" in first.stderr


def test_json_for_ckpt_inspect_summarize_and_data(trained, tmp_path, capsys, restore_signals):
    d, _, _ = trained
    ckpt = d / "run/checkpoints/step-00000001.pt"
    assert cli_main(["ckpt", "inspect", "train.epochs=5", str(ckpt),
                     "--json", "--json-out", str(tmp_path / "i.json")]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / "i.json").read_text())
    assert doc["emotion_dist"] == "ckpt inspect" and doc["global_step"] == 1 and len(doc["classes"]) == 7
    assert {"key": "train.epochs", "checkpoint": 2, "current": 5} in doc["config_diff"]
    assert "global step     1" in err  # the human form went to stderr

    assert cli_main(["summarize", str(d / "run"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["emotion_dist"] == "summarize" and s["n"] == 1 and s["runs"][0]["accuracy"] == pytest.approx(
        _records(d / "run", "test")[-1]["accuracy"])

    assert cli_main(["data", "synthetic", "--out", str(tmp_path / "syn"),
                     "--train", "14", "--test", "7", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc.pop(DIGEST_KEY).startswith("hmac-sha256:")  # the proof that it is emotion-dist's own
    assert doc == {"emotion_dist": "data synthetic", "root": str(tmp_path / "syn"), "train": 14, "test": 7, "seed": 0}
    assert "synthetic dataset ready" in err

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert cli_main(["ckpt", "inspect", str(ckpt), "--json-out", str(foreign)]) == 2
    assert "not written by emotion-dist" in capsys.readouterr().err and foreign.read_text() == '{"mine": 1}'


# ---------------------------------------------------------------- 2. launchers and trackers
def _accelerate_env(argv: list[str]) -> dict:
    """The environment accelerate's own launcher code builds for these `accelerate launch` arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*argv, "launch/train.py"])
    _validate_launch_command(args)
    if args.use_fsdp or args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


def test_accelerate_settings_map_onto_the_config(tmp_path):
    from emotion_dist.distributed.process_group import detect_launch
    from emotion_dist.errors import LaunchError

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\nmixed_precision: fp16\n"
                    "dynamo_config:\n  dynamo_backend: INDUCTOR\nfsdp_config:\n  fsdp_version: 2\n")
    env = _accelerate_env(["--config_file", str(fsdp)])
    cfg, given = load_config(str(ROOT / "configs/fer2013.yaml"), ["train.precision=bf16"])  # the file says ddp and bf16
    notes = apply_environment(cfg, given, ["train.precision=bf16"], env)
    assert (cfg.dist.strategy, cfg.train.compile, cfg.train.precision) == ("fsdp", True, "bf16")
    assert any(n.startswith("dist.strategy=fsdp from accelerate --use_fsdp") and "over the config file's ddp" in n
               for n in notes), notes
    assert "train.precision=bf16 from the command line (accelerate --mixed_precision fp16 asked for fp16)" in notes

    # one process from configs/accelerate/single_gpu.yaml: no RANK/WORLD_SIZE, still accelerate
    env = _accelerate_env(["--config_file", str(ROOT / "configs/accelerate/single_gpu.yaml")])
    assert detect_launch(env).launcher == "accelerate" and detect_launch({}).launcher == "python"
    cfg, given = load_config(str(ROOT / "configs/default.yaml"))  # says precision: fp32
    notes = apply_environment(cfg, given, [], env)
    assert cfg.train.precision == "bf16" and [n for n in notes if not n.startswith("log.")] == [
        "train.precision=bf16 from accelerate --mixed_precision bf16, over the config file's fp32"]

    # what cannot be honoured is refused in one line
    for argv, words in ((["--dynamo_backend", "aot_eager"], "--dynamo_backend aot_eager"),
                        (["--dynamo_backend", "inductor", "--dynamo_mode", "max-autotune"],
                         "ACCELERATE_DYNAMO_MODE=max-autotune")):
        env = _accelerate_env(["--config_file", str(ROOT / "configs/accelerate/single_gpu.yaml"), *argv])
        with pytest.raises(LaunchError, match=re.escape(words)):
            apply_environment(*load_config(None), [], env)
    # fp8 (what accelerate sends where Transformer Engine/MS-AMP/torchao is installed; it refuses it here)
    with pytest.raises(LaunchError, match="--mixed_precision fp8"):
        apply_environment(*load_config(None), [], {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_accelerate_one_process_start_line(tmp_path, tiny_data):
    proc = run([sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", "configs/accelerate/single_gpu.yaml",
                "launch/train.py", "--config", "configs/default.yaml", "data.source=folder", f"data.root={tiny_data}",
                "data.image_size=32", "data.limit=8", "data.val_fraction=0.05", "train.batch_size=8", "train.epochs=1",
                "train.eval_test=false", f"run.dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}"])
    line = next(l for l in proc.stdout.splitlines() if "launcher " in l)
    assert "launcher accelerate | world size 1 | backend gloo" in line and "precision bf16" in line
    assert "train.precision=bf16 from accelerate --mixed_precision bf16, over the config file's fp32" in line


def test_wandb_variables_keys_and_test_metrics_in_the_offline_run(trained):
    d, first, _ = trained
    run_dir = d / "run"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (path,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = list(wandb_records(path))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.project == "cli-project"  # log.wandb_project on the command line beats WANDB_PROJECT
    assert (meta.display_name, meta.run_group, list(meta.tags)) == ("env-name", "env-group", ["t1", "t2"])
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(items["_step"], {}).update(items)
    test = _records(run_dir, "test")[0]
    final = rows[test["step"]]
    assert test["step"] == 4 and final["test/accuracy"] == pytest.approx(test["accuracy"])
    # metrics.jsonl now holds the resumed run's step 4 (the first run's steps after its step-1 checkpoint
    # were dropped), with the same running loss: the epoch's sums resume with the weights
    (step4,) = [r for r in _records(run_dir, "step") if r["step"] == 4]
    assert final["loss"] == pytest.approx(step4["loss"])  # the training loss stays
    assert not {"accuracy", "macro_f1"} & {k for row in rows.values() for k in row}


def test_the_runs_test_pass_is_best_pt_with_flip_tta_as_evaluate_reports_it(trained, tmp_path):
    """train.test_tta (default flip): the run's own test pass averages each face and its mirror, says
    so in its record, and equals `evaluate --tta flip` on the same best.pt."""
    d, _, resumed = trained
    test = _records(d / "run", "test")[-1]  # the resumed run's, on the best.pt it left
    assert test["tta"] == "flip" and "TTA flip" in resumed.stdout
    run([sys.executable, "-m", "emotion_dist.cli", "evaluate", "--checkpoint", str(d / "run/checkpoints/best.pt"),
         "--tta", "flip", "--json-out", str(tmp_path / "r.json"),
         "--out", str(tmp_path), f"run.cache_dir={d / 'cache'}"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tta"] == "flip" and report["count"] == test["count"]
    assert (report["accuracy"] == pytest.approx(test["accuracy"])
            and report["macro_f1"] == pytest.approx(test["macro_f1"]))


def test_wandb_environment_precedence(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("log:\n  wandb: online\n  wandb_project: recipe\n")

    def resolve(overrides, **environ):
        cfg, given = load_config(str(recipe), overrides)
        apply_environment(cfg, given, overrides, environ)
        return cfg.log

    assert resolve([], WANDB_MODE="disabled").wandb == "off"  # the kill switch beats the recipe
    assert resolve([], WANDB_MODE="offline").wandb == "offline"  # a node without internet
    assert resolve(["log.wandb=online"], WANDB_MODE="offline").wandb == "online"  # the command line beats both
    log = resolve([], WANDB_PROJECT="team", WANDB_ENTITY="lab", WANDB_RUN_GROUP="sweep", WANDB_TAGS="a,b")
    assert (log.wandb_project, log.wandb_entity, log.wandb_group, log.wandb_tags) == ("team", "lab", "sweep", "a,b")
    assert resolve(["log.wandb_project=mine"], WANDB_PROJECT="team").wandb_project == "mine"
    cfg, given = load_config(None)
    notes = apply_environment(cfg, given, [], {"WANDB_MODE": "offline"})
    assert cfg.log.wandb == "off" and "does not turn W&B on" in notes[0]  # off by default stays off


def test_wandb_online_without_a_key_is_one_line_before_anything(tmp_path, fast_overrides):
    env = {k: v for k, v in env_for_child(NETRC=str(tmp_path / "empty-netrc")).items()
           if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE")}
    proc = run(train_cmd(*fast_overrides, "log.wandb=online"), env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no W&B API key" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    from emotion_dist.distributed.env_settings import wandb_api_key_present

    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    assert wandb_api_key_present({"NETRC": str(tmp_path / "netrc")})
    assert not wandb_api_key_present({"NETRC": str(tmp_path / "empty-netrc")})


# ---------------------------------------------------------------- 3. config ergonomics
def test_overrides_anywhere_and_print_config(tmp_path, capsys):
    argv = ["train", "train.max_steps=1", "--config", str(ROOT / "configs/default.yaml"),
            "data.limit=100", "--print-config",
            f"run.dir={tmp_path / 'run'}", "log.wandb_tags=a,b"]
    assert parse_args(argv).overrides == ["train.max_steps=1", "data.limit=100", f"run.dir={tmp_path / 'run'}",
                                          "log.wandb_tags=a,b"]
    assert cli_main(argv) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["train"]["max_steps"] == 1 and tree["data"]["limit"] == 100 and tree["log"]["wandb_tags"] == "a,b"
    assert tree["train"]["epochs"] == 12 and not (tmp_path / "run").exists()  # the file's values; nothing written
    assert cli_main(["train", "train.epoch=3", "--print-config"]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err


def test_version_and_python_m(capsys):
    from emotion_dist import __version__

    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"emotion-dist {__version__}"
    proc = run([sys.executable, "-m", "emotion_dist", "--version"])
    assert proc.stdout.strip() == f"emotion-dist {__version__}"
    assert run(train_cmd("--version")).stdout.strip() == f"emotion-dist {__version__}"


def test_config_keys_come_from_the_config_classes_and_the_configuration_page_lists_them(capsys):
    keys = describe_keys()
    assert [k.key for k in keys] == list(Config().flat())
    assert all(len(k.help) > 10 for k in keys), [k.key for k in keys if len(k.help) <= 10]
    assert cli_main(["config", "keys", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert {k["key"]: k["default"] for k in listed}["train.lr"] == 0.002 and len(listed) == len(keys)
    assert cli_main(["config", "keys", "log.wandb_"]) == 0
    assert "log.wandb_entity" in capsys.readouterr().out
    page = (ROOT / "docs/configuration.md").read_text()
    table = page.split("<!-- config-keys:begin -->\n", 1)[1].split("<!-- config-keys:end -->", 1)[0]
    assert table == keys_markdown(), "regenerate docs/configuration.md's table: emotion-dist config keys --markdown"


def test_resume_says_what_changed_in_the_config(trained):
    _, _, resumed = trained
    assert "resumed from" in resumed.stdout
    (line,) = [l for l in resumed.stdout.splitlines() if "config changed since that checkpoint:" in l]
    assert "log.every_steps 1 -> 2" in line and "log.wandb 'offline' -> 'off'" in line
    assert "log.wandb_project 'cli-project' -> 'emotion-dist'" in line and "data.limit" not in line


# ---------------------------------------------------------------- 5. TensorBoard
def test_tensorboard_stream_continues_after_resume_without_duplicates(trained):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    d, _, _ = trained
    ea = EventAccumulator(str(d / "run/tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    # the first attempt logged steps 1-4 every step; the resumed one (from step 1, every 2nd step)
    # logged 2 and 4: what the first logged after step 1 is purged, so each step appears once
    assert [e.step for e in ea.Scalars("step/loss")] == [1, 2, 4]
    assert [e.step for e in ea.Scalars("epoch/val_macro_f1")] == [2, 4]
    assert {"step/lr", "step/img_per_s", "epoch/val_accuracy", "test/accuracy"} <= set(ea.Tags()["scalars"])
    assert {"curves", "confusion_test"} <= set(ea.Tags()["images"])
    hp = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in ea.PluginTagToContent("hparams").items()}
    start = hp["_hparams_/session_start_info"].session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(0.002)
    metrics = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert {"hparam/test_accuracy", "hparam/best_val_macro_f1"} <= metrics


# ---------------------------------------------------------------- 7. terminal polish
def test_time_left_for_the_epoch_and_the_run():
    now = [100.0]
    t = TimeLeft(clock=lambda: now[0])
    t.epoch_start(epoch=0, epochs=3, total_steps=10, done_steps=0)
    assert t.text(0) == ""  # nothing timed yet
    now[0] += 20.0
    t.step(4)  # 5 s per step
    assert t.remaining(4) == (30.0, 30.0 + 2 * 50.0)
    now[0] += 30.0
    t.step(10)
    now[0] += 6.0
    t.epoch_end()  # validation took 6 s
    t.epoch_start(epoch=1, epochs=3, total_steps=10, done_steps=5)  # resumed half-way
    now[0] += 10.0
    t.step(7)
    assert t.remaining(7) == (3 * 5.0 + 6.0, 21.0 + 56.0)
    assert t.text(7) == "eta epoch 0:00:21, run 0:01:17"


def test_console_epoch_table_prints_its_header_once_and_files_get_no_control_codes(trained):
    stream = io.StringIO()
    sink = ConsoleSink(stream=stream, tty=True)
    for epoch in (1, 2, 3):
        sink.log({"type": "epoch", "epoch": epoch, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.1,
                  "val_accuracy": 0.4, "val_macro_f1": 0.3, "lr": 0.002, "time_s": 1.5}, epoch)
    text = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())
    assert text.count("val acc") == 1 and len([l for l in text.splitlines() if l.strip()]) == 4
    _, first, resumed = trained
    for out in (first.stdout, first.stderr, resumed.stdout, resumed.stderr):
        assert ANSI not in out
    assert re.search(r"step 3 \(1/2 in epoch\).*eta epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d", first.stderr)


def test_help_points_at_config_keys_and_every_option_has_help():
    def options(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action

    missing = [(path, a.dest) for path, a in options(build_parser(), "emotion-dist") if not a.help]
    assert not missing
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "emotion-dist config keys" in help_text and "exit codes" in help_text
