"""Which ranks still live: the survivors' way to name the node a failed collective lost.

gloo's error names only a socket address, and nodes behind NAT, in containers or in network
namespaces of one machine all read as 127.0.0.1 there. So every rank bumps its own counter in the
process group's store from a daemon thread, twice a second. After a collective fails, a survivor
reads the counters, waits a few beats and reads them again: the ranks whose counters stood still
are gone. The store lives on rank 0's node (or with torchrun's agent on the rendezvous host); when
it cannot be reached at all, that node is the one lost.

A rank that is stuck but alive keeps beating, so it is never named as lost: the message then says
a peer is stuck or died, as before.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch.distributed as dist

BEAT_S = 0.5
KEY = "emotion_dist/alive/{}"


class Heartbeat:
    def __init__(self, store, rank: int, world_size: int, beat_s: float = BEAT_S):
        self.store, self.rank, self.world_size, self.beat_s = store, rank, world_size, beat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emotion-dist-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.beat_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(KEY.format(self.rank), 1)
            except Exception:  # the store's host went down or the group closed: nothing left to tell
                return
            self._stop.wait(self.beat_s)

    def _counts(self) -> list[int]:
        return [self.store.add(KEY.format(r), 0) for r in range(self.world_size)]

    def silent_ranks(self, beats: int = 5) -> Optional[list[int]]:
        """The ranks whose counters did not move over `beats` beats; None when the store itself is
        gone (its host, rank 0's node, is lost)."""
        try:
            before = self._counts()
            time.sleep(beats * self.beat_s)
            after = self._counts()
        except Exception:
            return None
        return [r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != self.rank]


_active: Optional[Heartbeat] = None


def default_store():
    """The store init_process_group built (None without one). Private, but the only handle on the
    store built from env:// (stable since 1.x)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def start(rank: int, world_size: int) -> None:
    """Beat for this rank in the default process group's store (call after init_process_group)."""
    global _active
    if world_size < 2 or _active is not None:
        return
    store = default_store()
    if store is None:
        return
    # twice a second up to 500 ranks, then slower: the store serves every rank's beats
    _active = Heartbeat(store, rank, world_size, beat_s=max(BEAT_S, world_size / 1000)).start()


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None


def silent_ranks() -> Optional[list[int]]:
    """See Heartbeat.silent_ranks; [] when no heartbeat runs (one process, or no store)."""
    return _active.silent_ranks() if _active is not None else []
