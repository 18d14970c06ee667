import subprocess
import sys

import torch
from conftest import ROOT

from emotion_dist.modelio import load_checkpoint
from emotion_dist.training.checkpoint import CheckpointFiles
from emotion_dist.utils.fsutil import TEMP_MARKER, remove_stale_temps


def _state(step: int) -> dict:
    return {"model_state_dict": {"w": torch.full((3,), float(step))}, "global_step": step, "epoch": 0,
            "class_names": ["a", "b"], "config": {"train": {"lr": 0.1}}, "history": [{"epoch": 1, "x": 0.5}]}


def test_crash_between_temp_write_and_rename_keeps_previous(tmp_path):
    """A real process killed (SIGKILL) after writing the temp file, before os.replace."""
    target = tmp_path / "checkpoints" / "last.pt"
    CheckpointFiles(tmp_path).save(_state(1), 1)
    code = (
        "import os, signal, sys\n"
        "sys.path.insert(0, %r)\n"
        "import emotion_dist.training.checkpoint as c\n"
        "def die(src, dst): os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.os.replace = die\n"
        "c.atomic_write_bytes(c.Path(%r), b'x' * 1000)\n" % (str(ROOT), str(target))
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert load_checkpoint(target)["global_step"] == 1
    leftovers = [p for p in target.parent.iterdir() if TEMP_MARKER in p.name]
    assert leftovers  # the torn temp file is there, but never under the real name
    # its writer was killed: provably gone, so the next start's cleanup removes it (and nothing else)
    (target.parent / "notes.tmp1").write_bytes(b"the user's")
    assert remove_stale_temps(target.parent) == leftovers
    assert (target.parent / "notes.tmp1").read_bytes() == b"the user's" and target.is_file()
