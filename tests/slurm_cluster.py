"""A real single-node SLURM cluster (munge + slurmctld + slurmd) for tests, started and stopped by PID.

Settings follow what was measured on this kind of machine: a requeued job waits for the credential
lifetime (cred_expire, 10 s here instead of 120) and the scheduler interval (2 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


def ensure_installed() -> bool:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, timeout=900)
    return bool(shutil.which("slurmctld") and shutil.which("munged"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        root = self.root
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = root / "munge" / "munge.socket"
        self.processes.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
             f"--log-file={root / 'munge' / 'munged.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        host = socket.gethostname()
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]
        node = " ".join(part for part in node.split() if not part.startswith(("UpTime", "NodeName")))
        self.conf.write_text("\n".join([
            "ClusterName=vitpipe-test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket},cred_expire=10",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            "MailProg=/bin/true", "ReturnToService=2", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "KillWait=10", "MinJobAge=600",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            f"NodeName={host} {node} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        time.sleep(0.5)
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            self.processes.append(subprocess.Popen([*daemon, "-f", str(self.conf)], env=self.env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up (sinfo: {state!r}); see {root}/slurmctld.log")

    def run(self, args: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
        return result

    def job_state(self, job: str) -> str:
        out = self.run(["scontrol", "show", "job", job], check=False).stdout
        for part in out.split():
            if part.startswith("JobState="):
                return part.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(self, job: str, states: tuple[str, ...], timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job} is {state}, not in {states} after {timeout}s")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
