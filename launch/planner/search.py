"""The planner: for a stage, model, sequence length, target global batch and hardware, the cheapest
way to train that fits -- strategy, gradient checkpointing, micro batch, accumulation.

1. Candidates, from least to most memory-saving: DDP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-2/3 with the
   optimizer offloaded to host RAM, ZeRO-3 with the parameters offloaded too; each without and
   with gradient checkpointing. Flags the user set (--zero_stage, --offload, --deepspeed none,
   --gradient_checkpointing, an integer micro batch) are constraints, not suggestions.
2. For each, the largest micro batch whose memory (launch/planner/memory.py) stays within the budget:
   the device memory less SAFETY_MARGIN (allocator fragmentation and transients the model does
   not itemise), and whose offloaded states fit the host RAM.
3. Among those that fit, the lowest estimated time per sequence trained (a step's time over its
   micro x accumulation x world sequences; with --global_batch_size every candidate trains the
   same number, so this is the fastest step): compute (6 Psi per token,
   +1/3 with checkpointing) + communication over the slowest link (ZeRO-2 reduces gradients and
   ZeRO-3 gathers parameters on every micro step, DDP and ZeRO-1 once per step) + offload traffic
   and the CPU optimizer. So GeForce boxes without P2P stay on DDP/ZeRO-1/2 while those fit, and
   across nodes ZeRO-3's per-micro-step traffic counts against it.
4. Accumulation to reach --global_batch_size (exactly where a micro batch divides it, else the
   nearest above, and the plan says so).
When nothing fits, the plan says what would: LoRA, offload, a shorter sequence, more GPUs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from launch.planner import memory as mem
from launch.planner.hardware import HOST_LINK_GBPS, LINK_GBPS, Hardware
from launch.planner.memory import GiB, ModelShape, Setup
from trainers.devices import resolve_precision
from trainers.errors import UsageError
from trainers.stages import plan_names

SAFETY_MARGIN = 0.10  # of the device memory left unplanned
MAX_MICRO_BATCH = 64  # a micro batch beyond this buys no speed and starves the accumulation
ASSUMED_MFU = 0.40  # compute time estimate: the bf16 sheet rate x 0.4 (measured MFU: 57-58% torchtitan Llama 3 8B, ~60% llm.c GPT-2 on A100; 0.4 leaves room for smaller runs)
CPU_ADAM_PARAMS_PER_CORE_S = 5e7  # DeepSpeedCPUAdam, ~1e9 parameters/s on a 20-core host
TIME_TIE = 0.01  # candidates whose estimated time per sequence is within 1% of the fastest count as equally fast
CPU_FLOPS = 1e11  # CPU ranks: only the ordering of strategies matters there


@dataclass(frozen=True)
class Request:
    """What to plan for. None / "auto" fields are the planner's to decide."""

    stage: str
    shape: ModelShape
    seq_len: int
    hardware: Hardware
    global_batch: int = 0  # sequences per optimizer step; 0: no target
    micro_batch: int | None = None
    accumulation: int | None = None
    precision: str = "auto"
    optimizer: str = "adamw"
    lora_rank: int = 0
    lora_dropout: bool = True
    dora: bool = False  # --use_dora
    quantization_auto: bool = False  # --quantization auto: a 16-bit base where every GPU holds it whole, else 4 bits if they fit
    base_bits: int = 16  # the frozen LoRA base's linear layers: 4 or 8 (bitsandbytes), 16 (not quantized)
    double_quant: bool = True  # 4-bit: the blocks' scales quantized too
    gradient_checkpointing: bool | None = None
    deepspeed: str = "auto"  # auto | none | a DS JSON's (stage, offload) given as "stage:offload"
    zero_stage: str = "auto"
    offload: str = "auto"
    ds_zero: tuple = ()  # a named DS JSON's buffer settings (trainers.ds_config.buffer_keys); () for trainrig's own
    attn: str = "sdpa"
    chunked_loss: bool = True  # the run computes its LM loss with trainers/chunked_loss.py (launch/plan.py decides)


@dataclass(frozen=True)
class Candidate:
    setup: Setup  # at its largest micro batch (or 1 when it does not fit)
    memory: mem.Memory
    fits: bool
    why_not: str  # "" when it fits
    accumulation: int = 1
    step_seconds: float = 0.0

    @property
    def seconds_per_sequence(self) -> float:
        """The ranking: a step's time over the sequences it trains (micro x accumulation x world),
        so a strategy that fits micro 1 does not beat one that fits micro 12 by its shorter step."""
        return self.step_seconds / (self.setup.micro_batch * self.accumulation * self.setup.world)


@dataclass
class Plan:
    request: Request
    chosen: Candidate
    candidates: list[Candidate]
    budget: int  # bytes one rank may plan for
    notes: list[str] = field(default_factory=list)

    @property
    def setup(self) -> Setup:
        return self.chosen.setup

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    @property
    def global_batch(self) -> int:
        return self.setup.micro_batch * self.chosen.accumulation * self.setup.world

    @property
    def env(self) -> dict:
        """NCCL settings for this hardware: GeForce GPUs without peer access hang or corrupt
        unless NCCL stages transfers through host memory."""
        hw = self.request.hardware
        if hw.gpu is not None and hw.devices_per_node > 1 and not hw.peer_access:
            return {"NCCL_P2P_DISABLE": "1"}
        return {}

    def to_json(self) -> dict:
        s, hw = self.setup, self.request.hardware
        return {
            "stage": self.request.stage, "model": self.request.shape.name, "parameters": self.request.shape.parameters,
            "seq_len": self.request.seq_len,
            "hardware": hw.to_json(),
            "strategy": {"name": s.name, "deepspeed": s.deepspeed, "zero_stage": s.zero_stage, "offload": s.offload,
                         "gradient_checkpointing": s.gradient_checkpointing},
            "env": self.env,
            "micro_batch_size": s.micro_batch, "gradient_accumulation_steps": self.chosen.accumulation,
            "global_batch_size": self.global_batch, "global_batch_tokens": self.global_batch * self.request.seq_len,
            "world_size": s.world, "precision": s.precision, "attn_implementation": s.attn,
            "lora_parameters": s.lora_parameters, "base_bits": s.base_bits,
            "memory_gb": self.chosen.memory.gb(hw.device_memory_bytes),
            "safety_margin": SAFETY_MARGIN,
            "fits": self.fits,
            "estimated_step_seconds": round(self.chosen.step_seconds, 4),
            "candidates": [{"strategy": c.setup.name, "micro_batch_size": c.setup.micro_batch if c.fits else 0,
                            "total_gb": round(c.memory.total / GiB, 2), "fits": c.fits, "why_not": c.why_not,
                            "estimated_step_seconds": round(c.step_seconds, 4),
                            "estimated_seconds_per_sequence": round(c.seconds_per_sequence, 4) if c.fits else None}
                           for c in self.candidates],
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------ candidates


def strategies(req: Request) -> list[tuple[bool, int, str]]:
    """(deepspeed, stage, offload) allowed by the request, least memory-saving first."""
    every = [(False, 0, "none"), (True, 1, "none"), (True, 2, "none"), (True, 3, "none"),
             (True, 2, "optimizer"), (True, 3, "optimizer"), (True, 3, "all")]
    if req.deepspeed.count(":") == 1:  # a DS JSON fixes stage and offload
        stage, offload = req.deepspeed.split(":")
        if req.base_bits < 16 and (stage == "3" or offload != "none"):
            return []  # a quantized base under ZeRO-3 or offload: the trainer refuses it (trainers/lora.py)
        return [(True, int(stage), offload)]
    cpu_default = req.hardware.gpu is None and req.deepspeed == "auto" and req.zero_stage == "auto" and req.offload in ("auto", "none")
    keep = []
    for ds, stage, offload in every:
        if cpu_default and ds:
            continue  # CPU ranks: DeepSpeed only when asked (it JIT-builds ops and saves nothing DDP needs)
        if req.deepspeed == "none" and ds:
            continue
        if req.optimizer != "adamw" and ds:
            continue  # torch.optim.Muon needs whole matrices, bitsandbytes' 8-bit AdamW is not ZeRO's: runs without DeepSpeed
        if req.base_bits < 16 and ds and (stage == 3 or offload != "none"):
            continue  # a quantized base: DDP, ZeRO-1/2 or one process; ZeRO-3 partitions what bitsandbytes packs
        if req.hardware.gpu is None and offload != "none":
            continue  # offloading to the RAM the CPU ranks already use saves nothing
        if req.zero_stage != "auto" and (stage if ds else 0) != int(req.zero_stage):
            continue
        if req.offload not in ("auto", offload):
            continue
        keep.append((ds, stage, offload))
    return keep


def conflicting_flags(req: Request) -> str:
    said = [f"--{name} {value}" for name, value in (("deepspeed", req.deepspeed), ("zero_stage", req.zero_stage),
                                                      ("offload", req.offload)) if value != "auto"]
    if req.optimizer != "adamw":
        said.append(f"--optimizer {req.optimizer} (runs without ZeRO)")
    if req.base_bits < 16:
        said.append(f"--load_in_{req.base_bits}bit (runs without ZeRO-3 and offload)")
    if req.hardware.gpu is None and req.offload not in ("auto", "none"):
        said.append("CPU ranks (nothing to offload to)")
    return ", ".join(said) or "the request"


def micro_batch_cap(req: Request) -> int:
    if req.micro_batch:
        return req.micro_batch
    if req.global_batch:
        return max(1, min(MAX_MICRO_BATCH, -(-req.global_batch // req.hardware.world_size)))
    return MAX_MICRO_BATCH


def largest_micro_batch(shape: ModelShape, base: Setup, budget: int, cap: int) -> int:
    """Memory is affine in the micro batch: solve from micro 1 and 2 (0 when even 1 does not fit)."""
    one = mem.estimate(shape, dataclasses.replace(base, micro_batch=1)).total
    if one > budget:
        return 0
    per_sample = mem.estimate(shape, dataclasses.replace(base, micro_batch=2)).total - one
    return min(cap, 1 + int((budget - one) // per_sample)) if per_sample > 0 else cap


def accumulation_for(global_batch: int, micro: int, world: int, fixed: int | None, micro_fixed: bool = False) -> tuple[int, int]:
    """(micro, accumulation): fixed accumulation as given; a target global batch hit exactly with
    the largest micro batch <= `micro` that divides it, unless that costs more than half the
    micro batch (or the user set the micro batch), in which case the nearest global batch above."""
    if fixed:
        return micro, fixed
    if not global_batch:
        return micro, 1
    for m in range(micro, (micro if micro_fixed else max(micro // 2, 1)) - 1, -1):
        if global_batch % (m * world) == 0:
            return m, global_batch // (m * world)
    return micro, -(-global_batch // (micro * world))


def step_seconds(shape: ModelShape, s: Setup, accumulation: int, hw: Hardware) -> float:
    """Rough time of one optimizer step, for ranking strategies (not a throughput promise)."""
    tokens = s.tokens * accumulation
    peak = hw.gpu.bf16_tflops * 1e12 * ASSUMED_MFU if hw.gpu is not None and hw.gpu.bf16_tflops else CPU_FLOPS
    compute = mem.training_flops_per_token(shape, s) * tokens / peak
    n = s.world
    trainable = s.lora_parameters or shape.parameters
    ring = (n - 1) / n if n > 1 else 0.0
    bandwidth = LINK_GBPS[hw.slowest_link] * 1e9 or 1.0
    if not s.deepspeed:
        traffic = 2 * 4 * trainable  # all-reduce of the fp32 gradients autocast keeps, once per step
    elif s.zero_stage == 1:
        traffic = 2 * 2 * trainable  # reduce-scatter grads, all-gather updated weights, once per step
    elif s.zero_stage == 2:
        traffic = 2 * trainable * accumulation + 2 * trainable  # gradients reduced every micro step
    else:
        gathers = 3 if s.gradient_checkpointing else 2  # forward, backward (and the recompute)
        traffic = (2 * gathers * shape.parameters + 2 * trainable) * accumulation  # frozen weights are gathered too
    comm = traffic * ring / bandwidth
    offload = 0.0
    if s.offload != "none":
        per_node = max(hw.devices_per_node, 1)
        moved = (4 + 2) * trainable / n  # fp32 gradients down, 16-bit weights up
        if s.offload == "all":
            moved += 2 * 2 * shape.parameters / n * accumulation  # weights streamed in for forward and backward
        offload = moved * per_node / (HOST_LINK_GBPS * 1e9)
        offload += (trainable / n) / (CPU_ADAM_PARAMS_PER_CORE_S * max(hw.cpu_cores // per_node, 1))
    return compute + comm + offload


def evaluate_candidate(req: Request, base: Setup, budget: int) -> Candidate:
    cap = micro_batch_cap(req)
    micro = largest_micro_batch(req.shape, base, budget, cap)
    if req.micro_batch and micro < req.micro_batch:
        micro = 0  # the user's micro batch does not fit with this strategy
    setup = dataclasses.replace(base, micro_batch=max(micro, 1) if not req.micro_batch else req.micro_batch)
    memory = mem.estimate(req.shape, setup)
    ram = req.hardware.cpu_ram_bytes
    why = ""
    if micro == 0:
        why = f"needs {memory.total / GiB:.1f} GiB at micro batch {setup.micro_batch}, budget {budget / GiB:.1f} GiB"
    elif ram and memory.cpu > ram:
        why = f"needs {memory.cpu / GiB:.0f} GiB host RAM per node, have {ram / GiB:.0f} GiB"
    if why:
        return Candidate(setup, memory, False, why)
    micro, accumulation = accumulation_for(req.global_batch, setup.micro_batch, setup.world, req.accumulation,
                                           micro_fixed=req.micro_batch is not None)
    setup = dataclasses.replace(setup, micro_batch=micro)
    memory = mem.estimate(req.shape, setup)
    return Candidate(setup, memory, True, "", accumulation, step_seconds(req.shape, setup, accumulation, req.hardware))


def plan(req: Request, explain: bool = True) -> Plan:
    """The plan; `explain` adds what would fit when nothing does (off for the trials doing that)."""
    if req.quantization_auto and req.lora_rank and req.base_bits == 16:
        return plan_base_bits(req, explain)
    hw = req.hardware
    precision = resolve_precision(req.precision, hw.gpu is not None, hw.gpu is not None and hw.gpu.bf16)
    budget = int(hw.device_memory_bytes * (1 - SAFETY_MARGIN))
    lora = req.shape.lora_parameters(req.lora_rank, dora=req.dora) if req.lora_rank else 0
    stage = plan_names()[req.stage]
    checkpointing = [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]
    candidates = []
    for ckpt_on in checkpointing:
        for ds, zero_stage, offload in strategies(req):
            base = Setup(world=hw.world_size, nodes=hw.nodes, deepspeed=ds, zero_stage=zero_stage, offload=offload,
                         precision=precision, optimizer=req.optimizer, lora_parameters=lora,
                         lora_dropout=req.lora_dropout, dora=req.dora and bool(lora), base_bits=req.base_bits if lora else 16,
                         double_quant=req.double_quant, gradient_checkpointing=ckpt_on, attn=req.attn, ds_zero=req.ds_zero,
                         seq_len=req.seq_len, rows_per_sample=stage.sequences_per_sample,
                         attention_mask=stage.masked_rows, on_gpu=hw.gpu is not None,
                         sharded_load=stage.loads_weights(req.stage),  # the trainers load checkpoints under zero.Init
                         vocab_head=stage.vocab_head, chunked_loss=req.chunked_loss)
            candidates.append(evaluate_candidate(req, base, budget))
    if not candidates:
        raise UsageError(f"no strategy satisfies these flags together: {conflicting_flags(req)}; drop one of them")
    fitting = [c for c in candidates if c.fits]
    if fitting:
        fastest = min(c.seconds_per_sequence for c in fitting)
        # the first within TIME_TIE of the fastest: the least machinery (candidates go from DDP up), since the
        # time model cannot rank closer than that (a 1-ulp difference once put ZeRO-1 on a single GPU)
        chosen = next(c for c in fitting if c.seconds_per_sequence <= fastest * (1 + TIME_TIE))
    else:
        chosen = min(candidates, key=lambda c: c.memory.total)
    result = Plan(req, chosen, candidates, budget)
    result.notes.extend(hw.notes)
    busy = [(i, free) for i, free in enumerate(hw.free_bytes) if hw.gpu and free < 0.9 * hw.gpu.memory_bytes]
    for i, free in busy:
        result.notes.append(f"GPU {i} has {free / GiB:.1f} GiB free of {hw.gpu.memory_bytes / GiB:.1f}: another process holds "
                            f"memory; the plan assumes the whole GPU (free it, or pick others with CUDA_VISIBLE_DEVICES)")
    if hw.kernels:
        result.notes.append(hw.kernels)
    if stage.sequences_per_sample > 1:
        result.notes.append(f"{stage.name}: a micro batch of N {stage.samples} runs {stage.sequences_per_sample}N sequences")
    if fitting and req.global_batch and result.global_batch != req.global_batch:
        result.notes.append(f"--global_batch_size {req.global_batch} is not a multiple of micro {chosen.setup.micro_batch} x world "
                            f"{chosen.setup.world}; the effective global batch is {result.global_batch}")
    if not fitting and explain:
        result.notes.extend(what_would_fit(req, candidates))
    return result


def plan_base_bits(req: Request, explain: bool) -> Plan:
    """--quantization auto: the plan with a 16-bit LoRA base when every GPU holds that base whole
    (one process, DDP, ZeRO-1/2); else the 4-bit one (QLoRA) when it fits; else the 16-bit plan
    (ZeRO-3 or offload, or, when nothing fits, the one that does not, with what would).
    Predictable rather than clever: a 16-bit base trains the adapters against the weights themselves
    and NF4 against their rounding, so 4 bits are taken only where 16 would have to be sharded
    or sent to host RAM -- what QLoRA exists to avoid, and slower: 14B on 4x4090 is estimated at
    1.08 s per sequence under ZeRO-3 (its weights gathered over PCIe every micro step) and 0.74 with
    a 4-bit base under DDP; on one 5090 16 bits would need every weight offloaded. The plan's request
    keeps the flag, so the launch command pins the choice (planner/files.py)."""
    sixteen_req = dataclasses.replace(req, quantization_auto=False)
    sixteen = plan(sixteen_req, explain=False)
    four_req = dataclasses.replace(sixteen_req, base_bits=4)
    four = plan(four_req, explain=False) if strategies(four_req) else None
    whole = sixteen.fits and sixteen.setup.offload == "none" and sixteen.setup.zero_stage < 3
    if not sixteen.fits and not (four and four.fits):
        result, note = plan(sixteen_req, explain), "--quantization auto: neither a 16-bit nor a 4-bit base fits"
        # a QLoRA tip is one this run already tried, and --load_in_4bit beside --quantization auto is refused
        result.notes[:] = [n for n in result.notes if not n.startswith("QLoRA (")]
    elif whole or not (four and four.fits):
        result, note = sixteen, f"--quantization auto: the 16-bit base fits ({sixteen.setup.name}, micro batch {sixteen.setup.micro_batch})"
    else:
        why = (f"fits only sharded or offloaded ({sixteen.setup.name})" if sixteen.fits else
               f"does not fit (closest: {sixteen.setup.name}, {sixteen.chosen.why_not})")
        result, note = four, (f"--quantization auto: a 16-bit base {why}; the base loads in 4 bits (QLoRA): "
                              f"{four.setup.name}, micro batch {four.setup.micro_batch}")
    result.notes.insert(0, note)
    return dataclasses.replace(result, request=dataclasses.replace(result.request, quantization_auto=True))


# ------------------------------------------------------------------------ when nothing fits


def what_would_fit(req: Request, candidates: list[Candidate]) -> list[str]:
    """The nearest changes that make the plan fit, each with its numbers."""
    tips = []

    def fits(**changes) -> Plan | None:
        trial = plan(dataclasses.replace(req, **changes), explain=False)
        return trial if trial.fits else None

    if req.micro_batch:
        p = fits(micro_batch=None, accumulation=None)
        if p:
            tips.append(f"a smaller micro batch: {p.setup.micro_batch} fits with {p.setup.name} "
                        f"(--per_device_train_batch_size auto sizes it)")
    adaptable = plan_names()[req.stage].loads_weights(req.stage)  # every stage takes --lora_r from a checkpoint, none from scratch
    if not req.lora_rank and adaptable:
        p = fits(lora_rank=16)
        if p:
            tips.append(f"LoRA (--lora_r 16): {p.setup.name}, micro batch {p.setup.micro_batch}, "
                        f"{p.chosen.memory.total / GiB:.1f} GiB per GPU")
    if req.base_bits == 16 and adaptable:
        p = fits(lora_rank=req.lora_rank or 16, base_bits=4, deepspeed="auto", zero_stage="auto", offload="auto", ds_zero=())
        if p:
            tips.append(f"QLoRA (--lora_r {req.lora_rank or 16} --load_in_4bit): {p.setup.name}, micro batch {p.setup.micro_batch}, "
                        f"{p.chosen.memory.total / GiB:.1f} GiB per GPU")
    if req.offload not in ("auto",) or req.deepspeed == "none" or req.zero_stage != "auto":
        p = fits(offload="auto", deepspeed="auto", zero_stage="auto")
        if p and p.setup.offload != "none":
            tips.append(f"offload (--offload {p.setup.offload} --zero_stage {p.setup.zero_stage}): micro batch "
                        f"{p.setup.micro_batch}, {p.chosen.memory.total / GiB:.1f} GiB per GPU, "
                        f"{p.chosen.memory.cpu / GiB:.0f} GiB host RAM per node")
    short_of_ram = [c for c in candidates if "host RAM" in c.why_not]
    if short_of_ram:
        best = min(short_of_ram, key=lambda c: c.memory.cpu)
        tips.append(f"more host RAM: {best.setup.name} fits the GPUs but needs {best.memory.cpu / GiB:.0f} GiB "
                    f"of RAM per node; {'this machine' if req.hardware.name == 'detected' else 'the profile ' + req.hardware.name} has "
                    f"{req.hardware.cpu_ram_bytes / GiB:.0f} GiB")
    if req.gradient_checkpointing is False:
        p = fits(gradient_checkpointing=None)
        if p:
            tips.append(f"gradient checkpointing (--gradient_checkpointing): {p.setup.name}, micro batch {p.setup.micro_batch}")
    length = req.seq_len // 2
    while length >= 128:
        p = fits(seq_len=length)
        if p:
            tips.append(f"a shorter sequence: {length} tokens fits ({p.setup.name}, micro batch {p.setup.micro_batch})")
            break
        length //= 2
    hw = req.hardware
    if hw.gpu is not None:
        for factor in (2, 4, 8, 16):
            per_node = min(hw.devices_per_node * factor, 8)
            nodes = max(1, hw.devices_per_node * factor // 8) if hw.devices_per_node * factor > 8 else 1
            ram = hw.cpu_ram_bytes * per_node // hw.devices_per_node  # host RAM grows with the GPUs of a node
            bigger = dataclasses.replace(hw, devices_per_node=per_node, nodes=nodes, cpu_ram_bytes=ram, name=f"{per_node}x{nodes}")
            p = fits(hardware=bigger)
            if p:
                tips.append(f"more GPUs: {per_node * nodes} x {hw.gpu.name} ({nodes} node(s)) fit with {p.setup.name}, "
                            f"micro batch {p.setup.micro_batch}")
                break
    return tips or ["a smaller model or a GPU with more memory (nothing else tried fits)"]

