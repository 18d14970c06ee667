"""A stop signal at the end of a cache build (the last chunk decoded, before the gaps are closed and
the file renamed) leaves no cache and no temp file, and the next build starts clean."""

import os
import sys

import numpy as np
import pytest

from emotion_dist.data.cache import Decoder, build
from emotion_dist.distributed import interrupts
from emotion_dist.errors import Interrupted


class Squares(Decoder):
    """Item k -> a 8x8 gray square of value k; "bad" cannot be decoded; `stop_at` asks for a stop
    as a signal would, while that item decodes."""

    channels = 1

    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def __call__(self, item):
        if item == self.stop_at:
            interrupts.request("SIGUSR1")
        if item == "bad":
            raise ValueError("not an image")
        return np.full((8, 8, 1), int(item), np.uint8)

    def fingerprint(self, item) -> bytes:
        return str(item).encode()


@pytest.fixture
def clean_flag():
    interrupts.clear()
    yield
    interrupts.clear()


def test_a_stop_in_the_last_chunk_leaves_no_cache_and_the_next_build_completes(tmp_path, clean_flag):
    items = ["1", "bad", "2", "3"]  # an unreadable one: the finish has gaps to close
    with pytest.raises(Interrupted) as e:
        build(tmp_path, items, [0, 1, 0, 1], Squares(stop_at="3"), cache_size=8)
    assert e.value.signame == "SIGUSR1"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".npy") or ".tmp" in p] == []
    interrupts.clear()
    cached = build(tmp_path, items, [0, 1, 0, 1], Squares(), cache_size=8)
    assert cached.images[:, 0, 0, 0].tolist() == [1, 2, 3]


def test_a_stop_while_the_gaps_are_closed_ends_at_the_next_block(tmp_path, clean_flag, monkeypatch):
    from emotion_dist.data import cache

    monkeypatch.setattr(cache, "CHUNK_BYTES", 64)  # one 8x8 row a block
    moved = []
    real = cache._pwrite_all

    def pwrite_then_signal(fd, buf, pos):  # the signal arrives while the first block moves up
        if sys._getframe(1).f_code.co_name == "_close_gaps":
            moved.append(pos)
            interrupts.request("SIGTERM")
        return real(fd, buf, pos)

    monkeypatch.setattr(cache, "_pwrite_all", pwrite_then_signal)
    items = ["bad", "1", "2", "3", "4"]
    with pytest.raises(Interrupted):
        build(tmp_path, items, [0] * 5, Squares(), cache_size=8)
    assert len(moved) == 1  # the stop came at the next block, not after all of them
    assert [p for p in os.listdir(tmp_path) if p.endswith(".npy") or ".tmp" in p] == []
