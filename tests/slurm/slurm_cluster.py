"""A real two-node Slurm cluster on this machine for the tests: Debian's slurmctld, slurmd and
munge (installed once with apt-get), configured and started in a temporary directory, and stopped
afterwards. It needs root: the daemons run as root and switch to the job's user, and the nodes
are namespaces. Where that is impossible, `unavailable()` says why and the tests skip with that
reason.

The two nodes, trn1 and trn2, share the filesystem and one link, nothing else. Each is a network
namespace with its own address and slurmd, under its own host name (a UTS namespace); a veth pair
joins the two namespaces, so the ranks of a job on both nodes talk gloo across it, never over
loopback. Each node's daemons run in a mount namespace of their own, where the cluster's hosts
file is bound over /etc/hosts (names resolve as on a real cluster) and /sys stays the machine's
(slurmd needs its cgroup mounts, which `ip netns exec` would hide: the namespaces are entered with
nsenter). slurmctld runs on trn1, and so do the tests' client commands (sbatch, scontrol, scancel).
trn2 also mounts a tmpfs of its own at `scratch`: a node-local disk, at a path that on trn1 is the
shared filesystem.

Settings that make it fit a test run:
- ProctrackType=proctrack/linuxproc and TaskPlugin=task/none, so no cgroups are created;
- SelectType=select/cons_tres with CR_CPU, so the cores are the only resource (each node offers
  all of this machine's cores: the two nodes share them);
- cred_expire=10, because a requeued job may start only after its previous credential expires
  (default 120 s), and sched_interval=1, so the scheduler then starts it within a second;
- MinJobAge=3600, so finished jobs stay visible to `scontrol show job` (there is no accounting);
- its own state, spool, logs and munge socket (a path-named socket: reachable from every network
  namespace), so the cluster touches nothing outside its directory and its two namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "iproute2")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "ip", "nsenter", "unshare")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.uname().sysname != "Linux":
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return ("Slurm tests need root (the cluster's daemons run as root, its two nodes are network namespaces); "
                "run the suite as root to include them")
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


class Cluster:
    """slurmctld, two slurmd and munged under `root`; `env` is what a client command needs."""

    NODES = ("trn1", "trn2")
    ADDRESSES = ("10.231.17.1", "10.231.17.2")  # a private /24 that exists only between the two namespaces

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        tag = secrets.token_hex(3)  # unique even beside namespaces a killed run left; interface names are at most 15 characters
        self.netns = tuple(f"trainrig{tag}{n}" for n in "ab")
        self.veth = tuple(f"trv{tag}{n}" for n in "ab")
        self.scratch = root / "scratch"  # node-local on trn2; the shared filesystem on trn1
        self._pids: list[Path] = []

    def start(self) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in self.NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir()
        self._start_network()
        self._start_munge()
        self.conf.write_text(self._settings())
        conf = self.conf
        self._as_node(0, f"exec slurmctld -c -f {conf}")
        self._pids.append(self.root / "slurmctld.pid")
        self._as_node(0, f"exec slurmd -N {self.NODES[0]} -f {conf}")
        self._as_node(1, f"mount -t tmpfs -o size=256m trainrig-scratch {self.scratch} && exec slurmd -N {self.NODES[1]} -f {conf}")
        self._pids += [self.root / f"slurmd.{name}.pid" for name in self.NODES]
        self.wait_idle()

    def _start_network(self) -> None:
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in zip(self.NODES, self.ADDRESSES)))
        commands = [["ip", "netns", "add", ns] for ns in self.netns]
        commands.append(["ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1]])
        for ns, veth, address in zip(self.netns, self.veth, self.ADDRESSES):
            commands += [["ip", "link", "set", veth, "netns", ns], ["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", veth],
                         ["ip", "-n", ns, "link", "set", veth, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for command in commands:
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr.strip()}")

    def _start_munge(self) -> None:
        r = self.root
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        subprocess.run(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}"], check=True)
        self._pids.append(r / "munge" / "munged.pid")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.sock"

    def _settings(self) -> str:
        r, cpus = self.root, os.cpu_count() or 1
        nodes = "".join(f"NodeName={name} NodeAddr={address} CPUs={cpus} State=UNKNOWN\n" for name, address in zip(self.NODES, self.ADDRESSES))
        return f"""\
ClusterName=trainrig-test
SlurmctldHost={self.NODES[0]}({self.ADDRESSES[0]})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}.%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd'}.%n.log
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
{nodes}PartitionName=test Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def on_node(self, index: int, command: list[str]) -> list[str]:
        """`command` in node `index`'s network namespace (the machine's mounts and host name)."""
        return ["nsenter", f"--net=/var/run/netns/{self.netns[index]}", *command]

    def client(self, command: list[str]) -> list[str]:
        """A Slurm client command line, run on trn1."""
        return self.on_node(0, command)

    def _as_node(self, index: int, script: str) -> None:
        """Run `script` (a daemon that forks itself off) on node `index`: in its network namespace,
        under its host name and with mounts of its own (the cluster's hosts file over /etc/hosts)."""
        node = f"mount --bind {self.root / 'hosts'} /etc/hosts && hostname {self.NODES[index]} && {script}"
        subprocess.run(self.on_node(index, ["unshare", "--uts", "--mount", "sh", "-c", node]), env=self.env, check=True)

    def wait_idle(self) -> None:
        deadline, states = time.time() + 60, []
        while time.time() < deadline:
            states = subprocess.run(self.client(["sinfo", "-h", "-N", "-o", "%T"]), env=self.env, capture_output=True, text=True).stdout.split()
            if states == ["idle"] * len(self.NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's nodes never all became idle (sinfo says {states}); logs in {self.root / 'log'}")

    def stop(self) -> None:
        subprocess.run(self.client(["scancel", "--full", "--user", "root"]), env=self.env, capture_output=True)
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
        for index in range(len(self.NODES)):  # whatever a killed job left behind, then the namespaces (the veth pair goes with them)
            for pid in self.node_pids(index):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # ---------------------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        proc = subprocess.run(self.client(["sbatch", "--parsable", *args]), cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = subprocess.run(self.client(["scontrol", "show", "job", "-o", job_id]), env=self.env, capture_output=True, text=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float) -> dict:
        """Wait until the job has ended for good (a requeued job goes back to PENDING first)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ENDED:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def signal_batch(self, job_id: str, name: str) -> None:
        """What Slurm does at `--signal=B:<name>@<seconds>`: signal the batch shell only."""
        subprocess.run(self.client(["scancel", f"--signal={name}", "--batch", job_id]), env=self.env, check=True)

    def set_node_state(self, node: str, state: str, reason: str = "test") -> None:
        """`scontrol update` a node: DRAIN takes it out of scheduling (a running job keeps it), RESUME returns it."""
        extra = [f"reason={reason}"] if state.upper() == "DRAIN" else []
        subprocess.run(self.client(["scontrol", "update", f"nodename={node}", f"state={state}", *extra]), env=self.env, check=True)

    # -------------------------------------------------------------------------- probes

    def node_pids(self, index: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns[index]], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_training(self, index: int) -> list[int]:
        """SIGKILL every training process on node `index` (the per-node launcher, torchrun, the
        ranks), as if they had vanished with the machine; Slurm's own daemons stay."""
        killed = []
        for pid in self.node_pids(index):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "launch.slurm" in command or "torch.distributed.run" in command or "launch/" in command:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
                    killed.append(pid)
        return killed

    def link_bytes(self) -> int:
        """Bytes over the veth link so far, both directions, as trn1's end counts them."""
        out = subprocess.run(["ip", "-n", self.netns[0], "-s", "-j", "link", "show", "dev", self.veth[0]],
                             capture_output=True, text=True, check=True).stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]
