"""liveness.Heartbeat on a real TCPStore with real processes: a killed rank stops beating and is
named; a stuck-but-alive one is not; a lost store reads as None (its node is the one gone)."""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import torch.distributed as dist
from conftest import ROOT

from emotion_dist.distributed.liveness import KEY, Heartbeat

BEAT = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from emotion_dist.distributed.liveness import Heartbeat
port, rank = int(sys.argv[1]), int(sys.argv[2])
store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=30))
Heartbeat(store, rank, 3, beat_s=0.1).start()
time.sleep(600)  # the main thread is 'stuck'; the heartbeat thread goes on
"""


def test_killed_rank_is_silent_and_a_stuck_one_is_not():
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", BEAT, str(store.port), str(r)], env=env) for r in (1, 2)]
    try:
        mine = Heartbeat(store, 0, 3, beat_s=0.1).start()
        deadline = time.time() + 60
        while not all(store.add(KEY.format(r), 0) > 0 for r in (1, 2)):
            assert time.time() < deadline, "the ranks never beat"
            time.sleep(0.1)
        assert mine.silent_ranks() == []  # both alive (rank 1 and 2 sleep in their main threads)
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].wait()
        assert mine.silent_ranks() == [2]
        mine.stop()
        count = store.add(KEY.format(0), 0)
        time.sleep(0.5)
        assert store.add(KEY.format(0), 0) == count  # stopped means stopped
    finally:
        for p in ranks:
            p.kill()
            p.wait()


def test_store_gone_reads_as_none():
    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    client = dist.TCPStore("127.0.0.1", master.port, 2, is_master=False, timeout=timedelta(seconds=2))
    beat = Heartbeat(client, 1, 2, beat_s=0.1).start()
    del master  # the store's host goes down
    assert beat.silent_ranks() is None
    beat.stop()
