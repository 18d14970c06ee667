"""One machine posing as several nodes, for multi-node tests without a second machine.

A "node" is a process tree in its own namespaces:
- mount: a private tmpfs at the same scratch path on every node (node-local disk: what one node
  writes there, the others do not see) and a private /etc/hosts in which every node name resolves,
  each to its own loopback address (127.0.1.N);
- UTS: its own host name (`socket.gethostname()`), as c10d rendezvous and the launch line see it;
- PID (optional): the node's first process is its init, so killing it ends the whole node at once,
  as a power cut would.

Node names resolve through a hosts file bind-mounted over /etc/hosts inside each node, not by
editing the machine's /etc/hosts: only the "cluster" sees the names (like a cluster's DNS), nothing
outside the test changes, and nothing is left behind when a test session dies. Each name has its
own address because c10d rendezvous tells nodes apart by `socket.getfqdn()` and pid: with every
name on 127.0.0.1 the reverse lookup says "localhost" on every node, and two agents that are both
pid 1 of their PID namespace become one node.

`TorchrunNode` runs one torchrun agent as one node. The Slurm cluster (slurm_cluster.py) starts
each slurmd the same way, so its job steps inherit the node's namespaces.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import TRAIN, env_for_child

SCRATCH_SIZE = "256m"


def available() -> str | None:
    """None when nodes can be made here, else the reason they cannot."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "nodes need root (mount, UTS and PID namespaces, tmpfs mounts)"
    return None


def hosts_file(path: Path, names: list[str]) -> Path:
    """The machine's /etc/hosts plus each node name on a loopback address of its own."""
    own = "".join(f"127.0.1.{i} {name}\n" for i, name in enumerate(names, start=1))
    path.write_text(Path("/etc/hosts").read_text().rstrip("\n") + "\n" + own)
    return path


def node_argv(name: str, scratch: Path, hosts: Path, command: list[str], pid_ns: bool = False) -> list[str]:
    """`command` run as node `name` (see the module doc). The mount point must already exist."""
    setup = (f"mount -t tmpfs -o size={SCRATCH_SIZE} tmpfs {shlex.quote(str(scratch))} && "
             f"mount --bind {shlex.quote(str(hosts))} /etc/hosts && hostname {shlex.quote(name)} && exec \"$@\"")
    pid = ["-p", "-f", "--mount-proc"] if pid_ns else []
    return ["unshare", "-m", "-u", *pid, "--propagation", "private", "sh", "-c", setup, name, *command]


def mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def processes_in_namespace(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


def kill_namespace(pid: int) -> list[int]:
    """SIGKILL every process that shares `pid`'s mount namespace (a node's daemons, launchers and
    workers alike). Returns the pids it signalled."""
    try:
        ns = mount_namespace(pid)
    except OSError:
        return []
    if ns == mount_namespace(os.getpid()):  # a reused pid, not a node: never the machine's own processes
        raise RuntimeError(f"pid {pid} is not in a node's mount namespace; refusing to kill its namespace")
    victims = processes_in_namespace(ns)
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def node_path(pid: int, path: Path) -> Path:
    """`path` as the node that `pid` lives on sees it (its own scratch tmpfs included)."""
    return Path(f"/proc/{pid}/root") / Path(path).resolve().relative_to("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(nnodes: str, nproc: int, endpoint: str, run_id: str, *overrides: str, extra: tuple = (),
                  script: str = TRAIN) -> list[str]:
    """A multi-node torchrun agent: c10d rendezvous at `endpoint` (host:port, the host being a node name)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", *extra, script, *overrides]


class TorchrunNode:
    """One torchrun agent as one node. `pid_ns=True` also gives it its own PID namespace: the agent's
    init is then the node, and `kill()` ends agent and workers in one stroke."""

    def __init__(self, name: str, scratch: Path, hosts: Path, argv: list[str], log: Path, env: dict | None = None,
                 pid_ns: bool = True):
        self.name, self.scratch, self.log_path, self.pid_ns = name, scratch, log, pid_ns
        self._log = open(log, "w")
        self.proc = subprocess.Popen(node_argv(name, scratch, hosts, argv, pid_ns), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env or env_for_child(), cwd=Path(TRAIN).parents[1],
                                     start_new_session=True)

    def init_pid(self) -> int:
        """The host pid of the node's first process: unshare's child in a PID namespace, else the agent."""
        if not self.pid_ns:
            return self.proc.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
                kids = task.read_text().split()
                if kids:
                    return int(kids[0])
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name}: unshare started no child")

    def path(self, path: Path) -> Path:
        return node_path(self.init_pid(), path)

    def kill(self) -> None:
        """The node dies whole: the agent and every worker, with no chance to clean up."""
        if self.proc.poll() is not None:
            return  # ended already (with a PID namespace, nothing of it can outlive its init)
        if self.pid_ns:
            os.kill(self.init_pid(), signal.SIGKILL)  # the kernel then kills the whole PID namespace
        else:
            kill_namespace(self.proc.pid)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node {self.name} still running after {timeout}s:\n{self.output()[-4000:]}") from None

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()
