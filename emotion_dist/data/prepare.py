"""Data preparation once per scope while the other ranks wait, never bounded by the training timeout.

Scope. `node`: each node's first rank (its local rank 0) prepares for its node, because the node's
run.cache_dir is its own disk. `job`: rank 0 prepares once for everyone, because all nodes see one
run.cache_dir (NFS, Lustre, one machine). data.prepare_scope=auto tells them apart: each node's first
rank writes a token file into run.cache_dir and reports how many of the nodes' tokens it sees; the
scope is `job` only when every node sees every token. A wrong answer can only be `node` on a shared
folder (e.g. a stale NFS lookup): every node then builds the same files, which is slower, not wrong.

Waiting. Waiting ranks poll the process group's store (the TCPStore that init_process_group already
uses) instead of sitting in a collective, so a preparation longer than dist.timeout_s is fine; their
own limit is data.prepare_timeout_s. Each rank refreshes a heartbeat key while it prepares, so a
preparer that died is one line on every waiting rank, not a hang. Stop signals are acted on while
waiting (exit 0 everywhere, so Slurm requeues). The first failure of any rank is posted on the store
and re-raised by every other rank as the same one-line error. Every step ends when every rank is
done with it, so no rank enters a collective while another still prepares.

Sharing. `once(..., together=True)`: the ranks of the preparing node all run `fn` at the same time
and the decoded-image cache (cache.py) splits its build among them (a `BuildGroup`); ranks of other
nodes (scope `job` only) wait and then only read what was built (`READER`).
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, TypeVar

from emotion_dist import errors
from emotion_dist.distributed import interrupts, liveness, topology
from emotion_dist.distributed.topology import Topology
from emotion_dist.errors import DataError, Interrupted, TrainingAborted, UserError, one_line
from emotion_dist.utils.fsutil import ensure_writable_dir, remove_stale_temps, temp_path

log = logging.getLogger("emotion_dist")
T = TypeVar("T")

POLL_S = 0.2  # how often a waiting rank looks at the store
SCAN_S = 1.0  # how often a waiting rank reads the others' heartbeats
STALE_S = 30.0  # no heartbeat for this long: the rank is taken for dead
NOTICE_AFTER_S = 3.0  # rank 0 says what it waits for once a wait lasts this long ...
NOTICE_EVERY_S = 60.0  # ... and again at this interval

READER = "reader"  # role of a rank that only reads what another node prepared


# ---------------------------------------------------------------- errors across ranks
def encode_error(e: BaseException, rank: int, what: str) -> str:
    if isinstance(e, Interrupted):
        return f"Interrupted\t{e.signame}"
    if isinstance(e, (UserError, TrainingAborted)):
        return f"{type(e).__name__}\t{e}"
    return f"TrainingAborted\trank {rank} failed while preparing {what}: {type(e).__name__}: {one_line(str(e))[:300]}"


def decode_error(text: str) -> BaseException:
    kind, message = text.split("\t", 1)
    if kind == "Interrupted":
        return Interrupted(message)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, (UserError, TrainingAborted)):
        return cls(message)
    return TrainingAborted(message)


# ---------------------------------------------------------------- the store, polled
class StepStore:
    """The keys of one preparation step on the process group's store. Reads never block: a wait is
    a loop of `check`, so it answers stop signals, dead peers and its own limit."""

    def __init__(self, store, ns: str, topo: Topology, *, timeout_s: float, what: str, stale_s: Optional[float] = None):
        self.store, self.ns, self.topo = store, ns, topo
        self.timeout_s, self.what = timeout_s, what
        self.stale_s = STALE_S if stale_s is None else stale_s
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last heartbeat count, when it last moved)

    def _op(self, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, OSError) as e:  # torch's DistStoreError/DistNetworkError are RuntimeErrors
            raise TrainingAborted(
                f"lost the process group's store while preparing {self.what} ({type(e).__name__}); it lives "
                f"with rank 0 on {self.topo.node_names[0]} (or the torchrun agent there), which has died or "
                f"become unreachable"
            ) from None

    def key(self, name: str) -> str:
        return f"{self.ns}/{name}"

    def post(self, name: str, value: str) -> None:
        self._op(self.store.set, self.key(name), value)

    def read(self, name: str) -> Optional[str]:
        if self._op(self.store.check, [self.key(name)]):
            return self._op(self.store.get, self.key(name)).decode("utf-8", "surrogateescape")
        return None

    def add(self, name: str, n: int = 1) -> int:
        return int(self._op(self.store.add, self.key(name), n))

    def abort(self, e: BaseException) -> None:
        """Post the first failure of the step (later ones keep the first), if the store still answers."""
        try:
            self.store.compare_set(self.key("abort"), "", encode_error(e, self.topo.rank, self.what))
        except Exception:  # the store is gone: the others notice that themselves
            pass

    def _check_alive(self, ranks: list[int], doing: Callable[[], str]) -> None:
        """Every rank beats in the store from the start of the process group (distributed/liveness.py):
        a watched rank whose count stood still for stale_s is dead or hung."""
        now = time.monotonic()
        for r in ranks:
            count = self._op(self.store.add, liveness.KEY.format(r), 0)
            last = self._beats.get(r)
            if last is None or last[0] != int(count):
                self._beats[r] = (int(count), now)
            elif now - last[1] > self.stale_s:
                raise TrainingAborted(
                    f"rank {r} on {self.topo.node_names[self.topo.node_of(r)]} stopped responding (no heartbeat "
                    f"for {self.stale_s:g} s) while rank {self.topo.rank} waited for {doing()}; it died or hangs, "
                    f"see its log"
                )

    def wait(self, ready: Callable[[], Optional[T]], watch: Callable[[], list[int]], doing: Callable[[], str]) -> T:
        """Poll `ready()` until it returns a value; meanwhile act on stop signals, another rank's
        failure, dead `watch()` ranks and data.prepare_timeout_s. Rank 0 says what it waits for."""
        start = time.monotonic()
        last_scan = last_notice = 0.0
        while True:
            interrupts.check()
            failure = self.read("abort")
            if failure is not None:
                raise decode_error(failure)
            value = ready()
            if value is not None:
                return value
            now = time.monotonic()
            if now - last_scan >= SCAN_S:
                self._check_alive(watch(), doing)
                last_scan = now
            waited = now - start
            if waited > self.timeout_s:
                raise DataError(
                    f"waited {self.timeout_s:g} s (data.prepare_timeout_s) for {doing()}; raise "
                    f"data.prepare_timeout_s, or build the cache ahead with `emotion-dist data cache`"
                )
            if self.topo.rank == 0 and waited >= NOTICE_AFTER_S and now - last_notice >= NOTICE_EVERY_S:
                log.info("waiting for %s (%.0f s so far; limit data.prepare_timeout_s=%g s)",
                         doing(), waited, self.timeout_s)
                last_notice = now
            time.sleep(POLL_S)


@contextmanager
def stop_signals():
    """SIGTERM/SIGINT/SIGUSR1 set interrupts' flag while preparing (the waits and the cache build
    check it); the handlers from before come back afterwards. A signal that came after the last
    check still stops here, before training starts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in interrupts.STOP_SIGNALS}
    interrupts.install()
    try:
        yield
        interrupts.check()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- building together
class BuildGroup:
    """The ranks of one node that build one cache together; the first of them leads. Members call
    the same methods in the same order (they run the same code); each call is one exchange."""

    def __init__(self, board: Optional[StepStore], ranks: tuple[int, ...], rank: int, what: str = "the data"):
        self.board, self.ranks, self.rank, self.what = board, ranks, rank, what
        self.index = ranks.index(rank)
        self._steps = 0
        self._progress = 0
        self._checked = 0.0

    @classmethod
    def solo(cls) -> "BuildGroup":
        return cls(None, (0,), 0)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def shows_progress(self) -> bool:
        """The leader of rank 0's team draws the progress bar (on rank 0's console)."""
        return self.is_leader and (self.board is None or self.board.topo.rank == 0)

    def _step(self) -> str:
        self._steps += 1
        return f"team{self.leader}/{self._steps}"  # one namespace per team: each node's team leads its own build

    def gather(self, value: str) -> Optional[list[str]]:
        """Every member's value in member order, on the leader; None on the others."""
        step = self._step()
        if self.board is None:
            return [value]
        if not self.is_leader:
            self.board.post(f"{step}/{self.index}", value)
            return None
        out = [value]
        for i, r in enumerate(self.ranks[1:], 1):
            out.append(self.board.wait(lambda: self.board.read(f"{step}/{i}"), lambda: [r],  # noqa: B023
                                       lambda: f"rank {r} to finish its share of {self.what}"))  # noqa: B023
        return out

    def broadcast(self, value: Optional[str] = None) -> str:
        """The leader's value on every member."""
        step = self._step()
        if self.board is None or self.is_leader:
            if self.board is not None:
                self.board.post(step, value)
            return value
        return self.board.wait(lambda: self.board.read(step), lambda: [self.leader],
                               lambda: f"rank {self.leader} (leading the build) on {self.what}")

    def check_abort(self) -> None:
        """Between chunks of work: stop at once when another rank failed (one store read a second)."""
        if self.board is None or time.monotonic() - self._checked < SCAN_S:
            return
        self._checked = time.monotonic()
        failure = self.board.read("abort")
        if failure is not None:
            raise decode_error(failure)

    def add_progress(self, n: int) -> int:
        """Add this member's finished items; returns the team's total so far."""
        if self.board is None:
            self._progress += n
            return self._progress
        return self.board.add(f"team{self.leader}/progress", n)


_role: object = None  # None (build alone), a BuildGroup, or READER


def current_role():
    return _role


@contextmanager
def role(value):
    global _role
    before, _role = _role, value
    try:
        yield
    finally:
        _role = before


# ---------------------------------------------------------------- preparation steps
def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # no public accessor; present since torch 1.x


class Preparation:
    """`Preparation.start(cfg, env)` right after the process group starts, on every rank; then
    `prep.once(what, fn)` for each preparation, called by every rank in the same order."""

    def __init__(self, topo: Topology, scope: str, *, timeout_s: float, store=None, stale_s: Optional[float] = None):
        self.topo, self.scope, self.timeout_s, self.store, self.stale_s = topo, scope, timeout_s, store, stale_s
        self._steps = 0

    @classmethod
    def start(cls, cfg, env=None) -> "Preparation":
        topo = env.topology if env is not None and env.topology is not None else topology.detect(
            env.local_rank if env is not None else 0)
        store = _default_store() if topo.world_size > 1 else None
        prep = cls(topo, "job", timeout_s=cfg.data.prepare_timeout_s, store=store)
        prep.scope = prep.decide_scope(Path(cfg.run.cache_dir), cfg.data.prepare_scope)
        return prep

    def preparer_of(self, rank: int) -> int:
        return 0 if self.scope == "job" else self.topo.leader(self.topo.node_of(rank))

    def _board(self, what: str) -> StepStore:
        self._steps += 1
        return StepStore(self.store, f"emotion_dist/prepare/{self._steps}", self.topo, timeout_s=self.timeout_s,
                         what=what, stale_s=self.stale_s)

    def _step(self, what: str, body: Callable[[Optional[StepStore]], T]) -> T:
        """Run `body` on every rank, then wait until every rank is done with it (a store barrier);
        the first failure anywhere ends the step on every rank with the same error."""
        if self.topo.world_size == 1:
            with stop_signals():
                return body(None)
        board = self._board(what)
        topo = self.topo
        with stop_signals():
            try:
                result = body(board)
                board.post(f"fin/{topo.rank}", "ok")
                board.add("fin")

                def unfinished() -> list[int]:
                    return [r for r in range(topo.world_size) if board.read(f"fin/{r}") is None]

                board.wait(lambda: True if board.add("fin", 0) >= topo.world_size else None,
                           lambda: unfinished() if topo.rank == 0 else [0],
                           lambda: _ranks_text(topo, unfinished(), f"to finish preparing {what}"))
                return result
            except BaseException as e:
                board.abort(e)
                raise

    def once(self, what: str, fn: Callable[[], T], together: bool = False) -> T:
        """`fn` runs first on the scope's preparer(s) while the others wait, then on the others
        (which find its result on disk). With `together`, every rank of the preparing node runs
        `fn` at once and cache builds inside it are shared (BuildGroup); other nodes' ranks only read."""
        topo = self.topo

        def body(board: Optional[StepStore]):
            if board is None:
                with role(BuildGroup.solo() if together else None):
                    return fn()
            mine = self.preparer_of(topo.rank)
            team = topo.node_ranks[topo.node_of(mine)] if together else (mine,)
            if topo.rank == 0:
                log.info("%s: %s", what, self.plan_text(together))
            if topo.rank in team:
                with role(BuildGroup(board, team, topo.rank, what) if together else None):
                    result = fn()
                if topo.rank == mine:
                    board.post(f"done/{mine}", "ok")
                return result
            board.wait(lambda: board.read(f"done/{mine}"), lambda: [mine, 0],
                       lambda: f"rank {mine} on {topo.node_names[topo.node_of(mine)]} to prepare {what}")
            with role(READER):
                return fn()

        return self._step(what, body)

    def plan_text(self, together: bool) -> str:
        topo = self.topo
        limit = f"data.prepare_timeout_s={self.timeout_s:g} s"
        if self.scope == "node" and topo.num_nodes > 1:
            who = "each node's ranks together" if together else "each node's first rank while the others wait"
            return f"prepared once per node ({topo.num_nodes} nodes) by {who} ({limit})"
        team = topo.node_ranks[0] if together else (0,)
        who = (f"the {len(team)} ranks on {topo.node_names[0]} together" if len(team) > 1
               else f"rank 0 on {topo.node_names[0]}")
        waiting = topo.world_size - len(team)
        return f"prepared once by {who}" + (f"; {waiting} other rank{'s wait' if waiting > 1 else ' waits'} ({limit})"
                                            if waiting else "")

    # ------------------------------------------------------------ which scope
    def decide_scope(self, cache_dir: Path, wanted: str) -> str:
        """Every node's first rank makes sure run.cache_dir can be written; with `auto` and several
        nodes, they find out whether they all see the same folder. Returns `node` or `job`."""
        topo = self.topo
        leaders = [topo.leader(n) for n in range(topo.num_nodes)]

        def body(board: Optional[StepStore]) -> str:
            if topo.rank in leaders:
                ensure_writable_dir(cache_dir, "run.cache_dir")
                remove_stale_temps(cache_dir)
            if board is None or topo.num_nodes == 1:
                return "job" if wanted == "auto" else wanted
            if wanted != "auto":
                scope = wanted
            else:
                scope = self._probe_shared(board, cache_dir, leaders)
            if topo.rank == 0:
                shared = "shared by" if scope == "job" else "not shared between"
                how = "detected" if wanted == "auto" else "data.prepare_scope"
                log.info("data preparation once per %s: run.cache_dir=%s is %s the %d nodes (%s)",
                         scope, cache_dir, shared if wanted == "auto" else "taken as " + shared, topo.num_nodes, how)
            return scope

        return self._step("run.cache_dir", body)

    def _probe_shared(self, board: StepStore, cache_dir: Path, leaders: list[int]) -> str:
        topo = self.topo
        if topo.rank == 0:
            board.post("token", secrets.token_hex(8))
        if topo.rank not in leaders:
            return board.wait(lambda: board.read("scope"), lambda: [0], lambda: "rank 0 to decide the scope")
        token = board.wait(lambda: board.read("token"), lambda: [0], lambda: "rank 0's token")
        # a temp file of ours by name, so a killed run's probe is cleaned like any other temp
        probe = temp_path(cache_dir / f"prepare-scope-{token}-{topo.node}")
        probe.write_bytes(b"")
        try:
            board.post(f"probe/{topo.node}", probe.name)
            names = [board.wait(lambda n=n: board.read(f"probe/{n}"), lambda n=n: [leaders[n]],
                                lambda n=n: f"node {topo.node_names[n]} to write its token")
                     for n in range(topo.num_nodes)]
            # each name is looked up by itself (not a directory listing): NFS answers a fresh name exactly
            seen = sum((cache_dir / name).exists() for name in names)
            board.post(f"seen/{topo.node}", str(seen))
            if topo.rank == 0:
                counts = [int(board.wait(lambda n=n: board.read(f"seen/{n}"), lambda n=n: [leaders[n]],
                                         lambda n=n: f"node {topo.node_names[n]} to look for the tokens"))
                          for n in range(topo.num_nodes)]
                board.post("scope", "job" if min(counts) == topo.num_nodes else "node")
            return board.wait(lambda: board.read("scope"), lambda: [0], lambda: "rank 0 to decide the scope")
        finally:
            probe.unlink(missing_ok=True)


def _ranks_text(topo: Topology, ranks: list[int], doing: str) -> str:
    by_node: dict[str, list[int]] = {}
    for r in ranks:
        by_node.setdefault(topo.node_names[topo.node_of(r)], []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {n}" for n, rs in by_node.items()]
    return f"{'; '.join(parts) or 'the other ranks'} {doing}"
