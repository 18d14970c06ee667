"""Synthetic generation with concurrent writers of the same set: the loser uses the winner's set,
and never moves aside a set that someone may already be reading."""

import os

from emotion_dist.data.readers import synthetic
from emotion_dist.utils.fsutil import temp_path


def _inodes(folder):
    return {p.relative_to(folder): p.stat().st_ino for p in folder.rglob("*")}


def test_the_second_writer_of_the_same_set_keeps_the_first_ones_files(tmp_path):
    out = tmp_path / "cache" / "synthetic-14-7-s0"
    synthetic.generate(out, 14, 7, seed=0)  # the winner
    before = _inodes(out)
    spec = {"version": synthetic.FORMAT_VERSION, "train": 14, "test": 7, "seed": 0}
    loser = temp_path(out).with_name(temp_path(out).name + "-other-job")  # a second job's private temp folder
    synthetic._draw_all(loser, spec)
    synthetic._move_into_place(loser, out, spec)
    assert _inodes(out) == before  # the same files, never moved aside or replaced under a reader
    assert not loser.exists()
    assert sorted(os.listdir(out.parent)) == [out.name]


def test_a_set_of_another_spec_is_replaced(tmp_path):
    out = tmp_path / "syn"
    synthetic.generate(out, 14, 7, seed=0)
    synthetic.generate(out, 14, 7, seed=1)
    assert synthetic._marker(out)["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["syn"]
