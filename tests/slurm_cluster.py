"""A real single-node Slurm cluster in a temporary folder (Debian's slurmctld/slurmd + munge)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
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
KillWait=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
NodeName=localhost CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(t)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (SlurmUser=root)"
    return None


class Cluster:
    def __init__(self, folder: Path):
        self.dir = folder
        for sub in ("state", "spool", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        cpus = 2
        self.conf = folder / "slurm.conf"
        self.conf.write_text(CONF.format(d=folder, cpus=cpus, ctld_port=6917, d_port=6918))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _munge_ok(self) -> bool:
        return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0

    def start(self) -> None:
        if not self._munge_ok():
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=False)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.started_munge = True
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True)
        subprocess.run(["slurmd", "-N", "localhost"], env=self.env, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError("slurm did not become idle:\n" + (self.dir / "log/slurmctld.log").read_text()[-2000:])

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.dir / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)

    # ---- job helpers
    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip().split(";")[0])

    def job(self, jid: int) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], env=self.env, capture_output=True, text=True)
        fields = {}
        for tok in out.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, jid: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300,
             until=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(jid)
            if info.get("JobState") in states or (until and until(info)):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {jid} still {self.job(jid).get('JobState')} after {timeout}s")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True)
