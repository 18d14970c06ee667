"""One job per run directory: the lease that a job's global rank 0 holds on `run.dir`.

`RUN_DIR/lease.json` names the holder: host, pid (and its PID namespace), the Slurm job id (with the
array job and task) or torchrun run id, the restart attempt, the start time and the heartbeat
interval. The heartbeat is the file's modification time, refreshed by a daemon thread. A second job
is refused at once with one line (RunDirBusy, exit 2); a stale lease (its process gone from this
host, or no heartbeat for `stale_after_s`) is taken over with a warning. A restart of the same job
(same Slurm job id or torchrun run id: a torchrun restart, a Slurm requeue) takes over its own lease
as soon as its earlier run is shown gone, without waiting for the staleness: at once by pid on this
host, else when the heartbeat has stopped for a few beats.

Run directories live on shared filesystems (NFS, Lustre), so nothing here relies on flock or
O_EXCL, which NFS clients have not always honoured across hosts. Each step is an operation that the
server performs atomically:
- Creating: the record is written to a unique temp file, then `link()`ed to its final name. link
  fails with EEXIST if the name exists, in one server operation, and the lease is never seen half
  written. If the server's reply is lost, the retried link reports EEXIST although it succeeded;
  the temp file's link count (2) tells the truth (the recipe in open(2), "O_EXCL").
- Taking over (a compare-and-swap on a path): whoever replaces the lease with token T must first
  create `.lease.json.takeover.T` by link(); one process can, whatever the timing. It checks that
  the lease still holds T, then renames its own record over it (rename is atomic on the server).
  Releasing takes the same claim, so a job never deletes a lease that a restart has just taken over.
- The heartbeat: `futimens()` on a descriptor whose record was just read and found to be ours, so it
  never refreshes another job's lease. On NFS it asks the server to stamp its own time, and open()
  revalidates cached attributes (close-to-open), so readers on other hosts see the new stamp.
- Ages are measured on one clock: the heartbeat's stamp against the stamp of a file the reader has
  just written in the same folder, so clock skew between hosts does not matter.
The one case no lease without fencing covers: a process frozen longer than the staleness (a paused
VM) that wakes after its lease was taken over. Its heartbeat thread then finds the lease gone and
`lost` is set; training checks it at step boundaries and stops (TrainingAborted).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

from emotion_dist.distributed import interrupts
from emotion_dist.errors import ConfigError, TrainingAborted
from emotion_dist.utils.fsutil import disk_error, ensure_writable_dir, process_alive, temp_path

log = logging.getLogger("emotion_dist")

LEASE_NAME = "lease.json"
CLAIM_PREFIX = f".{LEASE_NAME}.takeover."  # not a temp-file name: remove_stale_temps must leave claims alone
DEFAULT_INTERVAL_S = 10.0  # a heartbeat costs one open and one setattr: cheap even on a busy NFS server
DEFAULT_STALE_S = 60.0  # six missed beats: longer than NFS client retries and a GC or checkpoint-write pause
_MAX_TRIES = 20  # restarts of the acquire loop when the lease changes under us (released, taken over)
_CLAIM_CHAIN = 3  # a taker that died between its claim and its rename, and the one after it


class RunDirBusy(ConfigError):
    """Another live job holds the run directory's lease: one line, exit code 2."""


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds (or claims) a lease. `attempt` is (Slurm requeue count, torchrun restart count)."""

    token: str
    host: str
    pid: int
    pid_ns: Optional[str]
    slurm_job_id: Optional[str]
    slurm_array: Optional[str]
    torchrun_run_id: Optional[str]
    attempt: tuple
    started: float
    interval_s: float

    @classmethod
    def of_this_process(cls, interval_s: float, env: Mapping[str, str]) -> "LeaseRecord":
        array = None
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            array = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        run_id = env.get("TORCHELASTIC_RUN_ID") or None
        if run_id == "none":  # torchrun's default without --rdzv-id: unrelated launches share it
            run_id = None
        return cls(
            token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), pid_ns=_pid_namespace(),
            slurm_job_id=env.get("SLURM_JOB_ID") or None, slurm_array=array, torchrun_run_id=run_id,
            attempt=(_env_int(env, "SLURM_RESTART_COUNT"), _env_int(env, "TORCHELASTIC_RESTART_COUNT")),
            started=time.time(), interval_s=float(interval_s),
        )

    def job_key(self) -> Optional[str]:
        """What stays the same across a requeue or restart: the Slurm job (which may run torchrun
        inside, with a new run id after each requeue), else the torchrun run id."""
        if self.slurm_job_id:
            return f"slurm:{self.slurm_job_id}"
        if self.torchrun_run_id:
            return f"torchrun:{self.torchrun_run_id}"
        return None

    def describe(self) -> str:
        parts = [f"host {self.host}", f"pid {self.pid}"]
        if self.slurm_job_id:
            parts.append(f"Slurm job {self.slurm_job_id}"
                         + (f" (array task {self.slurm_array})" if self.slurm_array else ""))
        if self.torchrun_run_id:
            parts.append(f"torchrun run {self.torchrun_run_id}")
        requeue, restart = self.attempt
        if requeue:
            parts.append(f"requeue {requeue}")
        if restart:
            parts.append(f"restart {restart}")
        return ", ".join(parts)

    def to_bytes(self) -> bytes:
        return (json.dumps({"emotion_dist": "lease", **asdict(self)}, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.pop("emotion_dist", None) != "lease":
            raise ValueError("no emotion_dist lease marker")
        obj["attempt"] = tuple(obj["attempt"])
        return cls(**obj)


class RunDirLease:
    """The lease on one run directory. Global rank 0 acquires it before any expensive work and
    holds it for the whole run (`with lease:` or acquire()/release()); the other ranks learn the
    outcome by broadcast (see try_acquire)."""

    def __init__(self, run_dir, *, interval_s: float = DEFAULT_INTERVAL_S, stale_after_s: float = DEFAULT_STALE_S,
                 env: Optional[Mapping[str, str]] = None):
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ConfigError(f"run.lease_heartbeat_s={interval_s} must be a positive number of seconds")
        if not (math.isfinite(stale_after_s) and stale_after_s >= 3 * interval_s):
            raise ConfigError(f"run.lease_stale_s={stale_after_s} must be at least 3 heartbeats "
                              f"(3 x run.lease_heartbeat_s = {3 * interval_s:g}), or a slow beat looks like a dead job")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_NAME
        self.interval_s, self.stale_after_s = float(interval_s), float(stale_after_s)
        self.me = LeaseRecord.of_this_process(interval_s, os.environ if env is None else env)
        self.held = False
        self.lost: Optional[str] = None  # set by the heartbeat thread when the lease is no longer ours
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- the public API -------------------------------------------------------------------

    def acquire(self) -> "RunDirLease":
        """Hold the lease, or raise RunDirBusy naming the holder and what to do. A stale lease is
        taken over with a warning; this job's own, as soon as its earlier run is shown gone."""
        if self.held:
            return self
        ensure_writable_dir(self.run_dir, "run.dir")
        for attempt in range(_MAX_TRIES):
            if self._link_new(self.path):
                return self._start()
            found = self._read(self.path)
            if found is None:
                continue  # released just now
            holder, beat = found
            verdict, why = self._judge(holder, beat)
            if verdict == "refuse":
                raise RunDirBusy(why)
            if verdict in ("restart", "stale") and self._take_over(holder):
                if verdict == "stale":
                    log.warning("run.dir=%s: taking over a stale lease: %s", self.run_dir, why)
                else:
                    log.info("run.dir=%s: taking over the lease of this job's earlier run: %s", self.run_dir, why)
                return self._start()
            time.sleep(0.01 * (1 + attempt))  # another job is creating or taking over the lease: look again
        found = self._read(self.path)
        raise RunDirBusy(self._busy_message(found[0], self._age(found[1])) if found else
                         f"run.dir={self.run_dir}: the lease {self.path} kept changing while starting; "
                         f"another job is starting there: use another run.dir")

    def try_acquire(self) -> Optional[str]:
        """For rank 0 before a broadcast: None when the lease is held, else the one-line reason
        (RunDirBusy, an unwritable run.dir, a failing filesystem). The other ranks raise
        RunDirBusy(reason) with what they receive, so every rank exits 2 alike."""
        try:
            self.acquire()
        except ConfigError as e:
            return str(e)
        except OSError as e:
            return (f"run.dir={self.run_dir}: "
                    f"{disk_error(e, f'the lease {self.path}', 'set run.dir to a writable folder')}")
        return None

    def check(self) -> None:
        """At a step boundary: raise TrainingAborted if another job has taken the lease over."""
        if self.lost is not None:
            raise TrainingAborted(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; never anyone else's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 2 * self.interval_s))
            self._thread = None
        if not self.held:
            return
        self.held = False
        claim = self.run_dir / (CLAIM_PREFIX + self.me.token)
        try:
            if not self._link_new(claim):  # another process is taking the lease over right now
                self._lose(None)
                return
        except OSError as e:
            log.warning("run.dir=%s: could not release the lease %s (%s); the next start will find it stale",
                        self.run_dir, self.path, e.strerror or e)
            return
        try:
            found = self._read(self.path, foreign_ok=True)
            if found is not None and found[0].token == self.me.token:
                self.path.unlink()
            else:
                self._lose(found[0] if found else None)
        except OSError as e:
            log.warning("run.dir=%s: could not remove the lease %s (%s)", self.run_dir, self.path, e.strerror or e)
        finally:
            claim.unlink(missing_ok=True)

    def __enter__(self) -> "RunDirLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- judging a lease found in place ---------------------------------------------------

    def _judge(self, holder: LeaseRecord, beat: float) -> tuple[str, str]:
        """("restart" (this job's) or "stale" (another job's), why to take it over), ("refuse", the
        one line) or ("retry", "") for a lease held by `holder` whose heartbeat was stamped at
        `beat` (the filesystem's clock)."""
        age = self._age(beat)
        stale_s = max(self.stale_after_s, 3 * holder.interval_s)
        same_job = holder.job_key() is not None and holder.job_key() == self.me.job_key()
        taken = "restart" if same_job else "stale"
        # A pid means something only in its own PID namespace: containers and `unshare -p` on one
        # host reuse numbers (two torchrun agents were both pid 1), so elsewhere only the heartbeat counts.
        checkable = holder.host == self.me.host and holder.pid_ns is not None and holder.pid_ns == self.me.pid_ns
        if checkable and not process_alive(holder.pid):
            return taken, f"{holder.describe()} is gone (no process {holder.pid} on this host)"
        if age > stale_s:
            return taken, f"{holder.describe()} has not beaten for {age:.0f} s (stale after {stale_s:g} s)"
        if same_job and not checkable:
            # A requeue or restart finds the lease of its own earlier run, killed on another node or
            # in another PID namespace, still fresh. It takes over once the heartbeat is seen to have
            # stopped: a few beats, not the staleness. One that keeps beating is alive whatever its
            # attempt: a second launch of the same job that never joined the first (same run id, a
            # world of its own), refused like any other job; taking over by attempt number would let
            # two such launches steal the lease from each other at every torchrun restart.
            state = self._watch(holder, beat)
            if state == "stopped":
                return "restart", f"{holder.describe()} stopped beating (an earlier run of this job)"
            if state == "changed":
                return "retry", ""
        return "refuse", self._busy_message(holder, age, twin=same_job)

    def _busy_message(self, holder: LeaseRecord, age: float, twin: bool = False) -> str:
        who = ("another live process of this same job (a second launch that never joined the first, or an earlier "
               "run still going)" if twin else "another job")
        return (f"run.dir={self.run_dir} is in use by {who}: {holder.describe()}, heartbeat {age:.0f} s ago; "
                f"wait for it to finish, set run.dir to another folder, or, if you are sure that job is dead, "
                f"remove {self.path}")

    def _watch(self, holder: LeaseRecord, beat: float) -> str:
        """"beating", "stopped" (no new stamp for 2.5 of its intervals) or "changed" (another lease)."""
        deadline = time.monotonic() + 2.5 * holder.interval_s
        while time.monotonic() < deadline:
            interrupts.check()
            time.sleep(holder.interval_s / 5)
            found = self._read(self.path)
            if found is None or found[0].token != holder.token:
                return "changed"
            if found[1] != beat:
                return "beating"
        return "stopped"

    def _take_over(self, holder: LeaseRecord) -> bool:
        """Replace the lease `holder` holds by ours if no one else does first."""
        key, abandoned = holder.token, []
        for _ in range(_CLAIM_CHAIN):
            claim = self.run_dir / (CLAIM_PREFIX + key)
            if self._link_new(claim):
                break
            found = self._read(claim)
            if found is None or self._age(found[1]) <= self.stale_after_s:
                return False  # another taker is at work (a claim lives for milliseconds): look again
            abandoned.append(claim)  # its taker died between claim and rename: claim its claim
            key = found[0].token
        else:
            return False
        try:
            found = self._read(self.path)
            if found is None or found[0].token != holder.token:
                return False  # released or replaced since we judged it
            tmp, _ = self._write_temp()
            try:
                os.replace(tmp, self.path)
            except FileNotFoundError:  # NFS: a retried rename whose first reply was lost
                now = self._read(self.path)
                if now is None or now[0].token != self.me.token:
                    raise
            finally:
                tmp.unlink(missing_ok=True)
            for old in abandoned:
                old.unlink(missing_ok=True)
            return True
        finally:
            claim.unlink(missing_ok=True)

    # ---- the heartbeat --------------------------------------------------------------------

    def _start(self) -> "RunDirLease":
        self.held, self.lost = True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="emotion-dist-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.interval_s):
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
                    try:
                        rec = LeaseRecord.from_bytes(data)
                    except (ValueError, KeyError, TypeError):
                        rec = None
                    if rec is None or rec.token != self.me.token:
                        self._lose(rec)
                        return
                    os.utime(f.fileno())  # this very file, just read and found ours
                warned = False
            except FileNotFoundError:
                self._lose(None)
                return
            except OSError as e:  # a hiccup of the filesystem: the lease goes stale only if it lasts
                if not warned:
                    log.warning("run.dir=%s: lease heartbeat failed (%s); retrying", self.run_dir, e.strerror or e)
                    warned = True

    def _lose(self, rec: Optional[LeaseRecord]) -> None:
        if self.lost is not None:
            return
        by = f"it is now held by {rec.describe()}" if rec else f"{self.path} was removed or replaced"
        self.lost = (f"lost the lease on run.dir={self.run_dir}: {by}; stopping so that two jobs never write "
                     f"one run directory")
        log.warning(self.lost)

    # ---- files ----------------------------------------------------------------------------

    def _write_temp(self) -> tuple[Path, float]:
        """Our record in a fresh, unique temp file next to the lease (a name remove_stale_temps
        knows, so a killed starter's leftover goes at the next start), and its stamp: the
        filesystem's "now"."""
        tmp = temp_path(self.run_dir / f"{LEASE_NAME}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(self.me.to_bytes())
                f.flush()
                os.fsync(f.fileno())
                return tmp, os.fstat(f.fileno()).st_mtime
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _link_new(self, dst: Path) -> bool:
        """Create `dst` holding our record if it does not exist, atomically, NFS included."""
        tmp, _ = self._write_temp()
        try:
            os.link(tmp, dst)
            return True
        except FileExistsError:
            try:
                return os.stat(tmp).st_nlink == 2  # the link was made and its reply lost (NFS)
            except FileNotFoundError:
                return False
        except FileNotFoundError:  # our temp file removed under us (a start cleaning temp files): look again
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _age(self, stamp: float) -> float:
        """Seconds since `stamp` on the filesystem's clock: the stamp of a file written just now."""
        tmp, now = self._write_temp()
        tmp.unlink(missing_ok=True)
        return max(0.0, now - stamp)

    def _read(self, path: Path, foreign_ok: bool = False) -> Optional[tuple[LeaseRecord, float]]:
        """(record, heartbeat stamp) of a lease or claim file, or None if there is none. open()
        then fstat(), so an NFS client revalidates rather than answer from its attribute cache."""
        try:
            with open(path, "rb") as f:
                data, stamp = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.from_bytes(data), stamp
        except (ValueError, KeyError, TypeError):
            if foreign_ok:
                return None
            raise ConfigError(f"run.dir={self.run_dir}: {path} is not a lease emotion-dist wrote; if no emotion-dist "
                              f"job uses this folder, remove it, or set run.dir to another folder") from None
