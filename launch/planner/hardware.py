"""What the planner plans for: the GPUs (or CPU) of one node, how many nodes, the links between
them, the host RAM that offload can use, and the Slurm allocation -- detected on this machine or
taken from a named profile, so a plan for a 4x4090 box or a 2-node H100 job can be made anywhere.

    --hardware auto        detect (CUDA GPUs, else the CPU)
    --hardware rtx5090     one RTX 5090            --hardware 4x4090     four RTX 4090s, no P2P
    --hardware 8xh100x2    2 nodes of 8 H100s      --hardware cpu | 2xcpu  CPU ranks (gloo)

GPU facts: the vendors' sheets (dense bf16 with fp32 accumulate); memory as torch reports it.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from trainers.errors import UsageError

GiB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model. `memory_bytes` is what torch's total_memory reports (a little under the
    marketed size); `bf16_tflops` is the dense bf16 rate with fp32 accumulate (PyTorch matmuls)."""

    name: str
    memory_bytes: int
    capability: tuple[int, int]
    bf16_tflops: float
    nvlink: bool  # GPUs of a node linked by NVLink (SXM boards)
    peer_access: bool  # GPU peer-to-peer works (GeForce drivers refuse it: NCCL must stage through host RAM)

    @property
    def bf16(self) -> bool:
        return self.capability[0] >= 8  # Ampere and newer


# name -> spec; the key is what `--hardware <N>x<key>` takes
GPUS: dict[str, GPUSpec] = {
    "3090": GPUSpec("NVIDIA GeForce RTX 3090", 25_438_126_080, (8, 6), 71.0, False, False),
    "4090": GPUSpec("NVIDIA GeForce RTX 4090", 25_386_352_640, (8, 9), 165.0, False, False),
    "5090": GPUSpec("NVIDIA GeForce RTX 5090", 33_668_988_928, (12, 0), 209.5, False, False),
    "l40s": GPUSpec("NVIDIA L40S", 47_697_362_944, (8, 9), 362.0, False, True),
    "a100-40g": GPUSpec("NVIDIA A100-SXM4-40GB", 42_298_834_944, (8, 0), 312.0, True, True),
    "a100-80g": GPUSpec("NVIDIA A100-SXM4-80GB", 85_097_971_712, (8, 0), 312.0, True, True),
    "h100": GPUSpec("NVIDIA H100 80GB HBM3", 85_045_231_616, (9, 0), 989.0, True, True),
    # the PCIe card: 114 SMs at a lower clock (756 TFLOP/s, not the SXM's 989), 2.0 TB/s HBM2e, no NVLink
    "h100-pcie": GPUSpec("NVIDIA H100 PCIe", 85_045_231_616, (9, 0), 756.0, False, True),
    "h200": GPUSpec("NVIDIA H200", 150_754_820_096, (9, 0), 989.0, True, True),
}

# All-reduce bus bandwidth in GB/s, for weighing strategies against each other (nccl-tests
# orders of magnitude): NVLink A100/H100 ~150-400; PCIe 4.0 x16 P2P ~20; GeForce without P2P
# stages every transfer through host RAM, ~12; 200 Gb/s InfiniBand between nodes ~20.
LINK_GBPS = {"nvlink": 150.0, "pcie": 20.0, "host": 12.0, "network": 20.0, "none": 0.0}
HOST_LINK_GBPS = 20.0  # GPU <-> host RAM over PCIe 4.0 x16 (offload traffic), measured ~20 on a 4090
PROFILE_RAM = {"3090": 64, "4090": 128, "5090": 64, "l40s": 512}  # GB of host RAM assumed per node; datacenter nodes: 1 TB
CPU_RESERVED_BYTES = 2 * GiB  # the OS and the launcher's own processes on a CPU-only run


@dataclass(frozen=True)
class Slurm:
    """The allocation this process runs in (from the SLURM_* environment)."""

    job_id: str
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    nodelist: str


@dataclass(frozen=True)
class Hardware:
    """One node type times `nodes`. `gpu` None means CPU ranks (gloo)."""

    name: str  # the profile, or "detected"
    gpu: GPUSpec | None
    devices_per_node: int  # GPUs per node, or CPU ranks per node
    nodes: int = 1
    cpu_ram_bytes: int = 0  # per node
    cpu_cores: int = 0  # per node
    free_bytes: tuple[int, ...] = ()  # detected only: free memory of each local GPU
    peer_access: bool = True  # every pair of GPUs in the node (trivially true for one GPU)
    kernels: str = ""  # "" when this torch build runs the GPU, else why not and the fix
    slurm: Slurm | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.nodes

    @property
    def device_memory_bytes(self) -> int:
        """Memory one rank plans against: the GPU's, or its share of the node's RAM on CPU."""
        if self.gpu is None:
            return max(self.cpu_ram_bytes - CPU_RESERVED_BYTES, 0) // max(self.devices_per_node, 1)
        return self.gpu.memory_bytes

    @property
    def intra_node_link(self) -> str:
        if self.devices_per_node <= 1:
            return "none"
        if self.gpu is None:
            return "host"
        return "nvlink" if self.gpu.nvlink and self.peer_access else "pcie" if self.peer_access else "host"

    @property
    def slowest_link(self) -> str:
        """The link a collective over all ranks is bound by."""
        return "network" if self.nodes > 1 else self.intra_node_link

    def describe(self) -> str:
        what = f"{self.devices_per_node}x {self.gpu.name}" if self.gpu else f"{self.devices_per_node} CPU rank(s)"
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        mem = f", {self.device_memory_bytes / GiB:.1f} GiB each" if self.gpu else f", {self.device_memory_bytes / GiB:.1f} GiB RAM each"
        link = f", {self.intra_node_link} link" if self.devices_per_node > 1 else ""
        return f"{what}{nodes}{mem}{link} ({self.name})"

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(world_size=self.world_size, link=self.slowest_link, description=self.describe())
        return out


# ---------------------------------------------------------------------------------- profiles

_PROFILE = re.compile(r"^(?:(?P<n>\d+)x)?(?:rtx)?(?P<gpu>[a-z0-9-]+?)(?:x(?P<nodes>\d+))?$")


def profile_names() -> list[str]:
    return ["rtx5090", "4x4090", "cpu", "<N>xcpu"] + [f"<N>x{k}[x<nodes>]" for k in GPUS]


def profile(name: str) -> Hardware:
    """A named machine: rtx5090, 4x4090, cpu, <N>xcpu, or <N>x<gpu>[x<nodes>] for the GPUs above."""
    m = _PROFILE.match(name.lower().strip())
    if not m or (m["gpu"] not in GPUS and m["gpu"] != "cpu"):
        raise UsageError(f"--hardware {name}: unknown profile; use auto, or one of {', '.join(profile_names())}")
    count, nodes = int(m["n"] or 1), int(m["nodes"] or 1)
    if count < 1 or nodes < 1:
        raise UsageError(f"--hardware {name}: GPU and node counts must be at least 1")
    if m["gpu"] == "cpu":
        if nodes > 1:
            raise UsageError(f"--hardware {name}: CPU profiles are one node; use <N>xcpu")
        ram, cores = host_ram_bytes(), os.cpu_count() or 1  # a CPU run plans against this machine
        return Hardware(name=name, gpu=None, devices_per_node=count, cpu_ram_bytes=ram, cpu_cores=cores)
    gpu = GPUS[m["gpu"]]
    ram_gb = PROFILE_RAM.get(m["gpu"], 1024)
    return Hardware(name=name, gpu=gpu, devices_per_node=count, nodes=nodes, cpu_ram_bytes=ram_gb * 10**9,
                    cpu_cores=16 if ram_gb <= 128 else 64, peer_access=gpu.peer_access or count == 1)


def resolve(spec: str, local_only: bool = False) -> Hardware:
    """`--hardware` -> Hardware: `auto` detects, anything else is a profile."""
    return detect(local_only=local_only) if spec in ("", "auto") else profile(spec)


# --------------------------------------------------------------------------------- detection


def detect(local_only: bool = False) -> Hardware:
    """This machine. local_only: a training rank looks only at its own GPU (querying the others
    would create a CUDA context, ~500 MB, on every GPU from every rank)."""
    import torch

    from trainers.devices import require_torch_sees_gpus

    require_torch_sees_gpus()  # a plan for the CPU of a GPU machine whose torch wheel cannot use its GPUs is wrong
    slurm = slurm_allocation()
    ram, cores = host_ram_bytes(), os.cpu_count() or 1
    if not torch.cuda.is_available():
        per_node, nodes = launcher_topology(1, slurm)
        return Hardware(name="detected", gpu=None, devices_per_node=per_node, nodes=nodes, cpu_ram_bytes=ram,
                        cpu_cores=cores, slurm=slurm)
    count = torch.cuda.device_count()
    if local_only:
        indices = [int(os.environ.get("LOCAL_RANK", "0") or 0) % count]
    else:
        indices = list(range(count))
    props = [torch.cuda.get_device_properties(i) for i in indices]
    smallest = min(props, key=lambda p: p.total_memory)
    notes = []
    if len({p.name for p in props}) > 1:
        notes.append(f"mixed GPUs ({', '.join(sorted({p.name for p in props}))}): planning for the smallest, {smallest.name}")
    known = _known_spec(smallest.name)
    capability = (smallest.major, smallest.minor)
    peer = all(torch.cuda.can_device_access_peer(i, j) for i in indices for j in indices if i != j)
    if local_only:  # a rank cannot see its peers' links without touching them; trust NCCL_P2P_DISABLE
        peer = os.environ.get("NCCL_P2P_DISABLE", "0") != "1" and (known.peer_access if known else True)
    gpu = GPUSpec(name=smallest.name, memory_bytes=smallest.total_memory, capability=capability,
                  bf16_tflops=known.bf16_tflops if known else 0.0, nvlink=bool(known and known.nvlink),
                  peer_access=peer)
    # a rank queries its own GPU (its context exists anyway); the launcher asks nvidia-smi, since
    # cudaMemGetInfo would leave a context on every GPU while --probe's trial runs need the memory
    free = tuple(torch.cuda.mem_get_info(i)[0] for i in indices) if local_only else nvidia_smi_free_bytes()
    per_node, nodes = launcher_topology(count, slurm)
    return Hardware(name="detected", gpu=gpu, devices_per_node=per_node, nodes=nodes, cpu_ram_bytes=ram,
                    cpu_cores=cores, free_bytes=free, peer_access=peer,
                    kernels=kernel_support(capability, torch.cuda.get_arch_list(), torch.version.cuda, smallest.name),
                    slurm=slurm, notes=tuple(notes))


def launcher_topology(devices: int, slurm: Slurm | None, env: dict | None = None) -> tuple[int, int]:
    """(ranks per node, nodes). Inside a launched rank, what the launcher exported: WORLD_SIZE and
    LOCAL_WORLD_SIZE (torchrun, accelerate) or LOCAL_SIZE (deepspeed); before launching, one rank
    per local device on each node of the Slurm allocation."""
    env = os.environ if env is None else env
    nodes = slurm.nodes if slurm else int(env.get("NNODES", "1") or 1)
    world = int(env.get("WORLD_SIZE", "0") or 0)
    if not world:
        return devices, nodes
    per_node = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 0) or max(world // nodes, 1)
    return per_node, max(world // per_node, 1)


def _known_spec(device_name: str) -> GPUSpec | None:
    """The table entry for a detected device name (for its bf16 rate and links)."""
    lowered = device_name.lower()
    for key, spec in GPUS.items():
        if spec.name.lower() == lowered:
            return spec
    if "h100" in lowered and "pcie" in lowered:  # "NVIDIA H100 PCIe": not the SXM board "h100" would match
        return GPUS["h100-pcie"]
    for key in ("3090", "4090", "5090", "l40s", "h200", "h100"):
        if key in lowered:
            return GPUS[key]
    if "a100" in lowered:
        return GPUS["a100-80g" if "80" in lowered else "a100-40g"]
    return None


def kernel_support(capability: tuple[int, int], arch_list: list[str], cuda_version: str | None, device_name: str) -> str:
    """"" when this torch build carries kernels for a GPU of `capability`, else the reason and the
    fix (instead of CUDA's "no kernel image is available for execution on the device").
    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); PTX (compute_XY) is compiled at
    load time for any later GPU; an 'a'-suffixed arch only on exactly that GPU."""
    cc = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        specific = version.endswith("a")
        code = int(version.rstrip("af"))
        if kind == "sm" and (code == cc if specific else (code // 10 == cc // 10 and code <= cc)):
            return ""
        if kind == "compute" and code <= cc and not specific:
            return ""
    from trainers.devices import GPU_TORCH_INSTALL

    built = ", ".join(a for a in arch_list if a.startswith("sm_")) or "none"
    # the pinned CUDA 12.8 build has kernels for sm_75 through sm_120; older cards need CUDA 12.6's
    fix = (f"install the CUDA 12.8 build trainrig pins: {GPU_TORCH_INSTALL}" if cc >= 75 else
           "install a CUDA 12.6 build: pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126")
    return f"{device_name} is sm_{cc}, but this torch build (CUDA {cuda_version or '?'}) has kernels only for {built}; {fix}"


def nvidia_smi_free_bytes() -> tuple[int, ...]:
    """Free memory of every GPU from nvidia-smi (no CUDA context needed); () where it is missing."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return tuple(int(line.strip()) * 2**20 for line in out.splitlines() if line.strip())  # MiB
    except (subprocess.SubprocessError, OSError, ValueError):
        return ()


def slurm_allocation(env: dict | None = None) -> Slurm | None:
    """The Slurm job this process runs in, from SLURM_* variables; None outside Slurm."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
    gpus_per_node = int(gpus.rsplit(":", 1)[-1]) if gpus.rsplit(":", 1)[-1].isdigit() else 0  # "h100:8" or "8"
    cpus = env.get("SLURM_CPUS_ON_NODE") or "0"
    return Slurm(job_id=env["SLURM_JOB_ID"], nodes=nodes, gpus_per_node=gpus_per_node,
                 cpus_per_node=int(cpus) if cpus.isdigit() else 0, nodelist=env.get("SLURM_JOB_NODELIST", ""))


def host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (what offload can still take), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
