import subprocess
import sys

from conftest import ROOT, env_for_child, train_cmd


def test_cli_bad_value_is_one_line_exit_2_before_anything_heavy(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "emotion_dist.cli", "train", "train.batch_size=0",
                           f"run.dir={tmp_path}/run"], capture_output=True, text=True, env=env_for_child(), cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size=0"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_launch_script_reports_unknown_key_exit_2():
    proc = subprocess.run(train_cmd("data.sourc=folder"), capture_output=True, text=True, env=env_for_child(), cwd=ROOT)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: unknown config key 'data.sourc'; did you mean data.source")


def test_help_does_not_import_torch():
    """`emotion-dist --help` stays instant because heavy imports are lazy."""
    code = ("import sys, contextlib, io\nfrom emotion_dist import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):"
            "\n    cli.main(['--help'])\n"
            "print('torch' in sys.modules, 'ultralytics' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


