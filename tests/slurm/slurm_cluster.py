"""A real one-node Slurm cluster on localhost for the tests: Debian's slurmctld, slurmd and
munge, installed once with apt-get, configured and started in a temporary directory, and stopped
afterwards. It needs root (the daemons run as root and switch to the job's user). Where that is
impossible, `unavailable()` says why and the tests skip with that reason.

Settings that make it fit a test run:
- ProctrackType=proctrack/linuxproc and TaskPlugin=task/none, so no cgroups are needed;
- SelectType=select/cons_tres with CR_CPU, so the node's cores are the only resource;
- cred_expire=10, because a requeued job may start only after its previous credential expires
  (default 120 s), and sched_interval=1, so the scheduler then starts it within a second;
- MinJobAge=3600, so finished jobs stay visible to `scontrol show job` (there is no accounting);
- private ports, sockets and state, so the cluster touches nothing outside its directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def unavailable() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.uname().sysname != "Linux":
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests need root (the one-node cluster's daemons run as root); run the suite as root to include them"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return f"Slurm is not installed and apt-get is missing; install {' '.join(PACKAGES)}"
    return None


def install() -> None:
    """apt-get install the packages if any binary is missing (once per machine)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """slurmctld + slurmd + munged under `root`; `env` is what a client command needs."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[Path] = []

    def start(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        socket_path = r / "munge" / "munge.sock"
        subprocess.run(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}"], check=True)
        self._pids.append(r / "munge" / "munged.pid")
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=trainrig-test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MinJobAge=3600
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], env=self.env, check=True)
        self._pids.append(r / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        self._pids.append(r / "slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's node never became idle (sinfo says {state!r}); logs in {r / 'log'}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for pid_file in reversed(self._pids):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 15)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):  # up to 10 s for a daemon to exit
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)

    # ---------------------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float) -> dict:
        """Wait until the job has ended for good (a requeued job goes back to PENDING first)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def signal_batch(self, job_id: str, name: str) -> None:
        """What Slurm does at `--signal=B:<name>@<seconds>`: signal the batch shell only."""
        subprocess.run(["scancel", f"--signal={name}", "--batch", job_id], env=self.env, check=True)
