"""A real N-node Slurm cluster on this one machine (Debian's slurmctld/slurmd + munge).

Debian's slurmd is built with multiple-slurmd support: every node is one slurmd (`slurmd -N n1`)
with its own port, spool, pid and log file (`%n` in slurm.conf). Each slurmd starts as one node of
nodes.py: its own mount namespace with a node-local tmpfs at `Cluster.scratch` (the same path on
every node) and its own host name. Job steps inherit them, so a job sees what a real multi-node job
sees: `hostname` says n1 or n2, and what n1 writes to scratch, n2 does not find.

How node names resolve: inside every node, a private /etc/hosts maps n1..nN to 127.0.0.1 (see
nodes.py). The sbatch scripts then run exactly as written for a real cluster, where node names
resolve (`scontrol show hostnames` gives the rendezvous host); they are not taught this machine's
NodeAddr. slurmctld itself reaches the slurmds by NodeAddr=127.0.0.1 and needs no names.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conftest import ROOT
from nodes import hosts_file, kill_namespace, node_argv, node_path

# Ports of this cluster alone: no other test (or the old single-node cluster, 6917/6918) uses them.
CTLD_PORT = 6931
SLURMD_PORT = 6932  # n1; n2 = 6933, ...
# Job ids from here: the scripts' default MASTER_PORT is 20000 + job id % 20000, so this cluster's
# jobs use ports 31000+ where another test cluster's jobs (ids from 1) use 20001+.
FIRST_JOB_ID = 11000
CPUS = 2  # per node; the machine has 2 cores in all, so nodes overcommit them (fine for tiny CPU jobs)

CONF = """ClusterName=edtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
FirstJobId={first_job}
KillWait=10
# keep finished jobs' records for the session (default 300 s): a test reads a job that ended long ago
MinJobAge=3600
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
NodeName=n[1-{n}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{d_port}-{d_port_last}] CPUs={cpus} \
Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n[1-{n}] Default=YES MaxTime=INFINITE State=UP
"""

@dataclass
class Job:
    id: int
    out: Path  # the job's output file
    run_dir: Path

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.is_file() else ""


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged", "unshare") if not shutil.which(t)]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (SlurmUser=root, mount namespaces)"
    return None


_cleanups: list[Callable[[], None]] = []
_cleanup_lock = threading.Lock()
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def run_cleanups() -> None:
    """Run every registered cleanup once (atexit, a stop signal, or a fixture's teardown: whichever first)."""
    with _cleanup_lock:
        todo = list(reversed(_cleanups))
        _cleanups.clear()
    for fn in todo:
        try:
            fn()
        except Exception as e:  # one failing cleanup must not keep the others from running
            print(f"cleanup {fn!r} failed: {e}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    """The test run is being stopped (a CI timeout's SIGTERM, a closed terminal's SIGHUP, Ctrl-C):
    stop what it started, then let the signal do what it did before."""
    run_cleanups()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if signum == signal.SIGINT and previous is signal.default_int_handler:
        raise KeyboardInterrupt  # pytest reports the interrupted run as usual
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_previous_handlers: dict = {}


def register_cleanup(fn: Callable[[], None]) -> None:
    """`fn` runs when this process ends however it can still run code: a normal exit, an exception,
    SIGTERM, SIGHUP or SIGINT. The daemons a test starts are not this process's children
    (slurmctld and slurmd fork into the background), so nothing else would stop them. Handlers are
    installed from the main thread only (Python's rule); elsewhere atexit alone covers it."""
    with _cleanup_lock:
        first = not _cleanups and not _previous_handlers
        _cleanups.append(fn)
    if first:
        atexit.register(run_cleanups)
    if threading.current_thread() is threading.main_thread():
        for sig in CLEANUP_SIGNALS:
            current = signal.getsignal(sig)
            if current is not _on_signal:
                _previous_handlers[sig] = current
                signal.signal(sig, _on_signal)


class Cluster:
    def __init__(self, folder: Path, nodes: int = 2):
        self.dir = folder
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        for sub in ("state", "spool", "log", "scratch"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.scratch = folder / "scratch"  # each node mounts its own tmpfs here
        self.hosts = hosts_file(folder / "hosts", self.nodes)
        self.conf = folder / "slurm.conf"
        self.conf.write_text(CONF.format(d=folder, n=nodes, cpus=CPUS, first_job=FIRST_JOB_ID, ctld_port=CTLD_PORT,
                                         d_port=SLURMD_PORT, d_port_last=SLURMD_PORT + nodes - 1))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _munge_ok(self) -> bool:
        return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0

    def start(self) -> None:
        register_cleanup(self.stop)  # before the first daemon starts: a stop mid-start still cleans up
        if not self._munge_ok():
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=False)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True)
        for node in self.nodes:
            self.start_node(node)
        self.wait_nodes("idle")

    def start_node(self, node: str) -> None:
        """slurmd for `node` in a fresh node namespace (a restarted node: empty scratch)."""
        subprocess.run(node_argv(node, self.scratch, self.hosts, ["slurmd", "-N", node]), env=self.env, check=True)

    def slurmd_pid(self, node: str) -> int:
        return int((self.dir / f"slurmd.{node}.pid").read_text().strip())

    def node_alive(self, node: str) -> bool:
        try:
            stat = Path(f"/proc/{self.slurmd_pid(node)}/stat").read_text()
        except (OSError, ValueError):
            return False
        name, state = stat.split("(", 1)[1].rsplit(")", 1)
        return name == "slurmd" and state.split()[0] != "Z"

    def node_path(self, node: str, path: Path) -> Path:
        """`path` as `node` sees it (its scratch tmpfs included)."""
        return node_path(self.slurmd_pid(node), path)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
        return dict(zip(out[::2], out[1::2]))

    def wait_nodes(self, state: str, nodes=None, timeout: float = 60) -> None:
        nodes = nodes or self.nodes
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n) == state for n in nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes {nodes} not {state} after {timeout}s: {self.node_states()}\n"
                           + (self.dir / "log/slurmctld.log").read_text()[-2000:])

    def kill_node(self, node: str) -> list[int]:
        """The node dies whole: its slurmd and every job step process on it (SIGKILL). A node whose
        slurmd is gone was killed whole already (its pid may belong to another process by now)."""
        if not self.node_alive(node):
            return []
        return kill_namespace(self.slurmd_pid(node))

    def set_state(self, node: str, state: str, reason: str = "test") -> None:
        args = ["scontrol", "update", f"NodeName={node}", f"State={state}"]
        out = self.run(*args, *([f"Reason={reason}"] if state in ("DOWN", "DRAIN") else []))
        assert out.returncode == 0, out.stderr

    def revive_node(self, node: str) -> None:
        """Restart a killed node (fresh scratch, as after a reboot) and return it to service."""
        self.kill_node(node)  # whatever is left of it
        self.start_node(node)
        # ReturnToService=2 may bring it back by itself when slurmd registers; RESUME is then refused
        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
        self.wait_nodes("idle", [node])

    def heal(self) -> None:
        """Between tests: no job left, and every node up and idle (a test may have killed or downed one)."""
        jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if jobs:
            self.run("scancel", *jobs)
        for node, state in self.node_states().items():
            if not self.node_alive(node) or state.startswith(("down", "drain", "fail")):
                self.revive_node(node)
        self.wait_nodes("idle", timeout=120)

    def stop(self) -> None:
        """Every slurmd (with its node's job steps) and slurmctld; once (a second call does nothing,
        so a pid that was reused meanwhile is never signalled)."""
        if getattr(self, "stopped", False):
            return
        self.stopped = True
        for node in self.nodes:
            try:
                self.kill_node(node)
            except (OSError, ValueError, RuntimeError):  # never started, or its pid file is stale
                pass
        pid_file = self.dir / "slurmctld.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.5)

    # ---- job helpers
    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
        return int(out.stdout.strip().split(";")[0])

    def submit(self, script: str, folder: Path, name: str, *overrides: str, options: tuple = (),
               env: dict | None = None, cwd: Path = ROOT) -> Job:
        """sbatch one of the project's scripts on CPU: configs/default.yaml, run dir folder/name,
        output folder/name.out (unless `options` names its own)."""
        out, run_dir = folder / f"{name}.out", folder / name
        env = {"CONFIG": "configs/default.yaml", "PYTHON": sys.executable, "RUN_DIR": str(run_dir),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
        output = [] if any(o.startswith("--output") for o in options) else [f"--output={out}"]
        jid = self.sbatch(f"--job-name={name}", "--gpus-per-node=0", *output, *options, script, *overrides,
                          env=env, cwd=cwd)
        return Job(jid, out, run_dir)

    def job(self, jid: int) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], env=self.env, capture_output=True, text=True)
        if "Invalid job id" in out.stderr:  # slurmctld no longer knows it: waiting for it cannot help
            raise RuntimeError(f"job {jid} is unknown to slurmctld (its record was purged?): {out.stderr.strip()}")
        fields = {}
        for tok in out.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, jid: int, states=TERMINAL, timeout=300, until=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(jid)
            if info.get("JobState") in states or (until and until(info)):
                return info
            time.sleep(0.3)
        info = self.job(jid)
        self.run("scancel", str(jid))
        raise TimeoutError(f"job {jid} still {info.get('JobState')} ({info.get('Reason')}) after {timeout}s")

    def requeued(self, jid: int, restarts: int = 1, timeout: float = 120) -> dict:
        """Wait until the job is back in the queue after its `restarts`-th requeue."""
        return self.wait(jid, until=lambda j: j.get("Restarts") == str(restarts) and j.get("JobState") == "PENDING",
                         timeout=timeout)

    def release(self, jid: int) -> None:
        """Start a requeued job now instead of after Slurm's ~2 min hold (Reason=BeginTime), but not
        within the second its old credential was revoked: slurmd compares whole seconds and would
        refuse the relaunch ("Job credential revoked"), failing the job. So wait until no node is
        still completing the old run, then 2 s more."""
        deadline = time.monotonic() + 60
        while any("comp" in s for s in self.node_states().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        out = self.run("scontrol", "update", f"JobId={jid}", "StartTime=now")
        assert out.returncode == 0, out.stderr

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True)
