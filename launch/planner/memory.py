"""The memory model: bytes per GPU (or per CPU rank) for one training setup, term by term.

Each term is a small pure function of the model's shapes and the setup, written for what trainrig
actually runs (not a textbook model):

- DDP / single device: Accelerate's autocast keeps fp32 weights in the model and casts each
  matmul weight to bf16 inside the forward (those copies live until the layer's backward); a
  LoRA base is loaded in bf16 and stays frozen. Gradients are DDP bucket views (no second copy).
- DeepSpeed: the engine holds 16-bit weights; ZeRO shards fp32 master weights, Adam moments and
  fp32 gradients over the ranks. The ZeRO-2/3 terms reproduce DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`; see
  tests/test_memory.py) so the planner agrees with the engine it configures.
- Activations: what autograd saves per layer per token, measured on transformers 5 Qwen2 layers
  with saved-tensor hooks for each precision mode (tests re-measure on other shapes, within 3%).
- Logits, with the model's own loss (--no-chunked_loss, or a model trainers/chunked_loss.py does
  not route): 12 bytes per vocabulary entry per token at the start of the backward: the saved fp32
  log-softmax, the fp32 gradient coming out of the NLL loss and the one log-softmax's backward
  makes (measured as peak RSS on CPU: 12.0-12.1 V bytes per token, every precision). The loop
  drops the bf16 logits before the backward; kept, they would add 2 V more.
- Logits, chunked (the default): no term in V x tokens. What stays is the hidden states' gradient
  and the head's, plus one chunk's logits while the forward makes them (chunked_loss_bytes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from trainers.errors import UsageError

GiB = 2**30
MODEL_SHAPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
CUDA_CONTEXT_BYTES = int(1.0 * GiB)  # CUDA context + cuBLAS workspace + NCCL buffers, ~0.6-1.0 GiB on A100/H100
CPU_PROCESS_BYTES = int(0.8 * GiB)  # python + torch + transformers resident in a CPU rank
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host-memory estimates
LORA_TARGETS_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the memory terms need from a decoder-only model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int  # counted on a meta-device build (tied embeddings once)
    largest_module_parameters: int  # DeepSpeed ZeRO-3's working buffer holds one gathered module
    matrix_parameters: int  # 2-D weights inside the layers (Muon's share; autocast copies these)
    max_positions: int
    model_type: str = "qwen2"  # the HF config's: whether trainers/chunked_loss.py routes the loss
    tied_embeddings: bool = True  # the head is the input embedding (PEFT wraps both for LoRA's chat-token rows)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_sizes(self, targets: tuple[str, ...] = LORA_TARGETS_ALL_LINEAR) -> list[tuple[int, int]]:
        """(d_in, d_out) of each targeted linear layer of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        sizes = {"q_proj": (h, self.heads * self.head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
                 "o_proj": (self.heads * self.head_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return [sizes[t] for t in targets if t in sizes]

    def lora_parameters(self, rank: int, targets: tuple[str, ...] = LORA_TARGETS_ALL_LINEAR, dora: bool = False) -> int:
        """Trainable adapter parameters: r x (d_in + d_out) for every targeted linear of every layer,
        and with DoRA its magnitude vector, d_out more."""
        return self.layers * sum(rank * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in self.linear_sizes(targets))


def shape_from_config(config, name: str, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters by building the model on the meta device (no memory, no weights).
    trust_remote_code: the run's flag; a config with auto_map builds the model's own class, as training will."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer_matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(name=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
                      layers=config.num_hidden_layers, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=config.vocab_size, parameters=params, largest_module_parameters=largest,
                      matrix_parameters=layer_matrices, max_positions=getattr(config, "max_position_embeddings", 0) or 0,
                      model_type=getattr(config, "model_type", ""), tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def shipped_shape_names() -> list[str]:
    return sorted(p.stem for p in MODEL_SHAPES_DIR.glob("qwen*.json"))


def load_shape(name: str) -> ModelShape:
    """A shipped shape (qwen2.5-7b: configs/models/qwen2.5-7b.json, the model's own config.json),
    so planning works offline. A run's own model directory goes through the trainer's config
    loading instead (launch/plan.py)."""
    from transformers import Qwen2Config

    path = MODEL_SHAPES_DIR / f"{name.lower()}.json"
    if name.lower() not in shipped_shape_names():
        raise UsageError(f"--model_name_or_path {name}: not a shipped shape ({', '.join(shipped_shape_names())}) nor a model directory")
    return shape_from_config(Qwen2Config(**json.loads(path.read_text())), name.lower())


# --------------------------------------------------------------------------------- the setup


@dataclass(frozen=True)
class Setup:
    """One way to train: engine, sharding, precision, adapters, checkpointing, batch."""

    world: int = 1  # data-parallel ranks
    nodes: int = 1
    deepspeed: bool = False  # False: DDP (or one process) with Accelerate autocast
    zero_stage: int = 0
    offload: str = "none"  # none | optimizer | all
    precision: str = "bf16"  # bf16 | fp16 | fp32
    optimizer: str = "adamw"  # adamw | muon
    lora_parameters: int = 0  # 0: full fine-tuning
    lora_dropout: bool = True
    dora: bool = False  # DoRA (PEFT use_dora): magnitude vectors, and what its forward keeps (dora_token_bytes, dora_layer_bytes)
    base_bits: int = 16  # a LoRA base's linear layers quantized to 4 or 8 bits (bitsandbytes), or 16: not
    double_quant: bool = True  # 4-bit: the blocks' fp32 scales themselves quantized to 8 bits
    gradient_checkpointing: bool = False
    attn: str = "sdpa"  # sdpa | flash_attention_2 | eager
    seq_len: int = 2048  # tokens per row
    rows_per_sample: int = 1  # 2 for the reward model: a pair is two rows
    micro_batch: int = 1  # samples (a reward model's pairs)
    attention_mask: bool = False  # the batches carry a mask (packed or padded SFT rows, reward pairs) under SDPA/eager
    on_gpu: bool = True
    sharded_load: bool = False  # ZeRO-3 loading a checkpoint under zero.Init: no rank holds the whole model
    vocab_head: bool = True  # False: a scalar head (reward model), no vocabulary-sized logits
    chunked_loss: bool = True  # trainers/chunked_loss.py computes the head's loss a chunk of tokens at a time
    ds_zero: tuple = ()  # a user's DS JSON's buffer settings (trainers.ds_config.buffer_keys); () for the one trainrig builds


    @property
    def tokens(self) -> int:
        """Tokens in one micro batch."""
        return self.micro_batch * self.rows_per_sample * self.seq_len

    @property
    def masked(self) -> bool:
        """SDPA/eager with the shared (B, 1, L, L) mask trainers/attention.py builds (FlashAttention takes none)."""
        return self.attention_mask and self.attn != "flash_attention_2"

    @property
    def half(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def name(self) -> str:
        if not self.deepspeed:
            base = "ddp" if self.world > 1 else "single"
        else:
            base = f"zero{self.zero_stage}" + ("" if self.offload == "none" else f"+offload-{self.offload}")
        return base + ("+ckpt" if self.gradient_checkpointing else "")


# ------------------------------------------------------------------------------ model states


@dataclass(frozen=True)
class ModelStates:
    parameters: int
    gradients: int
    optimizer_states: int
    cpu: int  # host RAM per node (offloaded states, or the per-rank fp32 copy made while loading)


def ddp_model_states(shape: ModelShape, s: Setup) -> ModelStates:
    """Accelerate autocast (DDP or one process): weights stay fp32 in the model (4 B), each matmul
    weight gets a bf16 copy in the forward (2 B), grads are fp32 (4 B), AdamW keeps m and v in fp32
    (8 B), Muon one momentum buffer for the layers' 2-D matrices (4 B). A LoRA base is loaded in
    the training precision and frozen; only the adapters carry grads and optimizer states."""
    copies = 2 if s.half else 0  # autocast's bf16 copy of each trainable matmul weight
    if s.lora_parameters:
        base = lora_base_bytes(shape, s)
        trainable = s.lora_parameters
        params = base + (4 + copies) * trainable
        optimizer = optimizer_state_bytes(s.optimizer, trainable)
    else:
        trainable = shape.parameters
        params = 4 * trainable + copies * shape.matrix_parameters
        if s.optimizer == "muon":
            optimizer = 4 * shape.matrix_parameters + 8 * (trainable - shape.matrix_parameters)
        else:
            optimizer = optimizer_state_bytes(s.optimizer, trainable)
    load_bytes = 2 if s.lora_parameters and s.half else 4  # a LoRA base loads in the training precision
    ranks = max(s.world // s.nodes, 1)
    if s.lora_parameters and s.base_bits < 16:  # quantized as loaded, each tensor straight onto the rank's device
        cpu = load_bytes * shape.largest_module_parameters * ranks
    else:
        cpu = load_bytes * shape.parameters * ranks  # every rank loads the checkpoint before moving it
    return ModelStates(parameters=params, gradients=4 * trainable, optimizer_states=optimizer, cpu=cpu)


def optimizer_state_bytes(optimizer: str, trainable: int) -> int:
    """AdamW's two fp32 moments (8 B per trained parameter), or bitsandbytes' 8-bit ones: 1 B each
    plus an fp32 scale per block of 256 (2 + 8/256 B)."""
    return int((2 + 8 / 256) * trainable) if optimizer in ("adamw8bit", "paged_adamw8bit") else 8 * trainable


# 4-bit blocks of 64 weights, each with an fp32 absmax scale (4/64 B per weight); double quantization
# stores the scales in 8 bits, with an fp32 scale per 256 of them: 1/64 + 4/(64 x 256) B per weight
NF4_SCALE_BYTES = {False: 4 / 64, True: 1 / 64 + 4 / (64 * 256)}


def lora_base_bytes(shape: ModelShape, s: Setup) -> int:
    """The frozen base of a LoRA run: in the training precision (w B per weight), or with its layers'
    linear weights (matrix_parameters) quantized by bitsandbytes -- 4-bit: 0.5 B + the block scales;
    8-bit (LLM.int8): 1 B + an fp32 scale per output row -- while embeddings, head, norms and biases
    stay in w. A quantized matmul dequantizes its weight first: one w-byte copy of the largest
    linear (h x intermediate) is in flight."""
    w = 2 if s.half else 4
    if s.base_bits == 16:
        return w * shape.parameters
    quantized = shape.matrix_parameters
    if s.base_bits == 4:
        per_weight = 0.5 + NF4_SCALE_BYTES[s.double_quant]
    else:
        per_weight = 1 + 4 / shape.hidden  # one fp32 scale per row of h (or intermediate) inputs: at most 4/h
    workspace = w * shape.hidden * shape.intermediate
    return int(per_weight * quantized) + w * (shape.parameters - quantized) + workspace


def deepspeed_model_states(shape: ModelShape, s: Setup) -> ModelStates:
    """DeepSpeed ZeRO-`stage` with 16-bit (w = 2 B) or fp32 (w = 4 B) weights over N ranks.
    16-bit: fp32 master weights (4 B) and fp32 gradients (4 B) beside the 16-bit ones; AdamW m, v
    (8 B). ZeRO-1 shards the optimizer (master weights, m, v; in bf16 the fp32 gradients, in which it
    accumulates, are whole on every rank: DeepSpeed's BF16 optimizer); ZeRO-2 also the gradients; ZeRO-3 also the weights, plus a working buffer of one gathered module (2w B/param).
    Matches DeepSpeed: ZeRO-2 2Psi + 18Psi/N, ZeRO-3 4 largest + 18Psi/N; offload moves the sharded
    states to host RAM (their host estimate, with the 1.5 buffer factor)."""
    n, nodes = s.world, s.nodes
    per_node = max(n // nodes, 1)
    w = 2 if s.half else 4
    master = 4 if s.half else 0  # fp32 master copy; fp32 training updates the weights in place
    fp32_grads = 4 if s.half else 0
    frozen = lora_base_bytes(shape, s) if s.lora_parameters else 0  # a LoRA base, 16-bit or quantized (ZeRO-1/2 only)
    psi = s.lora_parameters or shape.parameters
    largest = 2 * w * shape.largest_module_parameters
    stage = s.zero_stage
    if stage == 0:  # DeepSpeed's bf16 optimizer without sharding
        params, grads, optim = w * psi + frozen, (w + fp32_grads) * psi, (master + 8) * psi
    elif stage == 1:  # bf16 accumulates in fp32 (trainers/ds_config.py): DeepSpeed's BF16 optimizer keeps a full fp32 copy
        params, grads, optim = w * psi + frozen, (w * psi + (4 * psi if s.precision == "bf16" else fp32_grads * psi / n)), (master + 8) * psi / n
    elif stage == 2:
        params, grads, optim = w * psi + frozen, (w + fp32_grads) * psi / n, (master + 8) * psi / n
    else:  # 16-bit weights sharded; the gradient partition is reduced into fp32
        params, grads, optim = (w * psi + frozen) / n + largest, 4 * psi / n, (master + 8) * psi / n
    # each rank's fp32 copy while the engine starts, or under zero.Init one gathered module per rank
    if s.lora_parameters and s.base_bits < 16:  # quantized as loaded, each tensor straight onto the rank's device
        loading = w * shape.largest_module_parameters * per_node
    else:
        loading = 4 * (shape.largest_module_parameters if stage == 3 and s.sharded_load else shape.parameters) * per_node
    cpu = loading * DS_BUFFER_FACTOR
    if s.offload != "none":
        grads = optim = 0
        if stage == 3:  # fp32 master + moments (+ 16-bit weights with "all") of the whole model, per node
            if s.offload == "all":
                params = largest
            offloaded = psi * (18 if s.offload == "all" else 16) + (frozen if s.offload == "all" else 0)  # + a frozen LoRA base
            cpu = max(loading, offloaded / nodes) * DS_BUFFER_FACTOR
        else:  # DeepSpeed's ZeRO-2 estimate counts a copy per rank of the whole job
            cpu = max(4 * n * shape.parameters, 16 * psi) * DS_BUFFER_FACTOR
    return ModelStates(parameters=int(params), gradients=int(grads), optimizer_states=int(optim), cpu=int(cpu))


def model_states(shape: ModelShape, s: Setup) -> ModelStates:
    return deepspeed_model_states(shape, s) if s.deepspeed else ddp_model_states(shape, s)


# ------------------------------------------------------------------------------ activations

# Bytes autograd saves per token in one Qwen2 decoder layer, as c_h*h + c_i*I + c_kv*kv_dim,
# measured with torch.autograd.graph.saved_tensors_hooks on transformers 5.23 (least squares over
# five shapes, residual < 0.3%). "amp": fp32 weights + bf16 autocast (fp32 residual stream, norms
# save fp32); "half": 16-bit weights (DeepSpeed); "fp32": no autocast. LoRA rows: a 16-bit frozen
# base (fp32 on CPU) with fp32 adapters; dropout > 0 adds each adapter's fp32 input copy and mask.
LAYER_BYTES = {
    # mode:             (c_h,  c_i,  c_kv)
    "amp": (30.0, 8.0, 4.0),
    "half": (20.0, 8.0, 4.0),
    "fp32": (32.0, 16.0, 8.0),
    "lora-half": (25.0, 8.2, 4.4),
    "lora-fp32": (25.0, 16.0, 8.6),
}
LORA_DROPOUT_BYTES = {"lora-half": (24.0, 4.0), "lora-fp32": (40.0, 4.0)}  # (c_h, c_i)
# With checkpointing only each layer's input survives the forward: fp32 residual 4 B, 16-bit 2 B.
CHECKPOINT_BYTES = {"amp": 4, "half": 2, "fp32": 4, "lora-half": 2, "lora-fp32": 4}


def activation_mode(s: Setup) -> str:
    if s.lora_parameters:
        return "lora-half" if s.half else "lora-fp32"
    if not s.half:
        return "fp32"
    return "half" if s.deepspeed else "amp"


def layer_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """Saved bytes of one layer per token without checkpointing. SDPA and FlashAttention keep
    q, k, v, the output and a fp32 log-sum-exp per head; eager attention also keeps the fp32
    softmax and its 16-bit copy (a x s each), so it grows with the sequence."""
    mode = activation_mode(s)
    c_h, c_i, c_kv = LAYER_BYTES[mode]
    total = c_h * shape.hidden + c_i * shape.intermediate + c_kv * shape.kv_dim + 4 * shape.heads
    if s.lora_parameters and s.lora_dropout:
        d_h, d_i = LORA_DROPOUT_BYTES[mode]
        total += d_h * shape.hidden + d_i * shape.intermediate
    if s.attn == "eager":
        per_score = 6 if s.half else 4
        total += per_score * shape.heads * s.seq_len + (2 if s.half else 4) * shape.hidden - 4 * shape.heads
    if s.masked and 1 < shape.kv_heads < shape.heads:
        # with a mask transformers repeats the key/value heads for grouped-query attention instead of
        # SDPA's enable_gqa: the saved keys and values have every query head's width (a copy, except
        # for a single key/value head, whose repeat is a view)
        total += 2 * (shape.heads - shape.kv_heads) * shape.head_dim * (2 if s.half else 4)
    return total


def mask_bytes(s: Setup) -> int:
    """The one (B, 1, L, L) additive mask in the compute dtype that every layer's attention saves
    (the same tensor: trainers/attention.py attention_bias), B the micro batch's rows."""
    if not s.masked:
        return 0
    return s.micro_batch * s.rows_per_sample * s.seq_len**2 * (2 if s.half else 4)


def dora_token_bytes(shape: ModelShape, s: Setup) -> int:
    """What DoRA adds to a layer's saved bytes per token: for each adapted linear, the base output
    and the LoRA output its magnitude scales, each d_out wide in the compute dtype (measured with
    saved-tensor hooks, peft 0.21: 8.0 B per output in fp32, 4.1 in bf16 autocast, 16- and 4-bit bases)."""
    if not s.dora:
        return 0
    return 2 * (2 if s.half else 4) * sum(d_out for _, d_out in shape.linear_sizes())


def dora_layer_bytes(shape: ModelShape, s: Setup) -> int:
    """DoRA's bytes per layer that do not grow with the tokens. With --lora_dropout > 0 PEFT runs the
    base matmul again on the dropped-out input, and autograd keeps its dequantized weight: w B per
    adapted weight, for every layer (measured 4.02-4.04 B fp32, 2.07-2.15 bf16, 16- and 4-bit bases).
    Without dropout too, vectors of the output's width per adapted linear (the magnitude over the
    norm, and what scales by it): measured 12 B per output in fp32, 44 in bf16 autocast, per layer.
    And the transient of its weight norm, once: for the largest adapted linear (d_in x d_out) an fp32
    identity d_in x d_in (PEFT's lora_B(lora_A(eye)), to stay FSDP-safe; autocast adds its 16-bit
    copy), that product, the scaled update and the weight plus it (three d_in x d_out tensors in w B)
    -- for Qwen2.5-14B's down_proj (13,824 x 5,120) 1.6 GB in bf16."""
    if not s.dora:
        return 0
    w = 2 if s.half else 4
    kept = w * sum(d_in * d_out for d_in, d_out in shape.linear_sizes()) if s.lora_dropout else 0
    kept += (44 if s.half else 12) * sum(d_out for _, d_out in shape.linear_sizes())
    identity = 6 if s.half else 4
    norm = max(identity * d_in * d_in + 3 * w * d_in * d_out for d_in, d_out in shape.linear_sizes())
    return kept * (1 if s.gradient_checkpointing else shape.layers) + norm


def activation_bytes(shape: ModelShape, s: Setup) -> int:
    """All layers' saved activations for one micro batch, plus the embedding/final-norm/RoPE
    tensors outside the layers, the shared attention mask and DoRA's per-layer bytes. With
    checkpointing: each layer's input, plus one layer's full set while it is recomputed in the backward."""
    tokens = s.tokens
    layer = layer_activation_bytes(shape, s) + dora_token_bytes(shape, s)
    outside = 16 * shape.hidden + 8 * shape.head_dim
    if s.gradient_checkpointing:
        per_token = shape.layers * CHECKPOINT_BYTES[activation_mode(s)] + layer + outside
    else:
        per_token = shape.layers * layer + outside
    return int(per_token * tokens) + mask_bytes(s) + dora_layer_bytes(shape, s)


def logits_bytes(shape: ModelShape, s: Setup) -> int:
    """Peak of the loss: with the model's own loss, 3 fp32 (tokens x vocab) tensors at the start of
    the backward; chunked, chunked_loss_bytes; none for a reward model's scalar head."""
    if not s.vocab_head:
        return 0
    if s.chunked_loss:
        return chunked_loss_bytes(shape, s)
    return 12 * shape.vocab * s.tokens


def chunked_loss_bytes(shape: ModelShape, s: Setup) -> int:
    """trainers/chunked_loss.py at the end of its forward: the hidden states' gradient (16-bit under
    a DeepSpeed 16-bit engine, whose hidden states are 16-bit; else fp32), the head's gradient
    accumulated in fp32 (plus its 16-bit copy under such an engine; none for a frozen LoRA head),
    the head and the hidden states cast to autocast's 16-bit dtype (Accelerate's bf16/fp16 over fp32
    weights), and one
    chunk's logits: fp32 (4 B per entry), plus, in a 16-bit run, first the matmul's 16-bit output,
    then the 16-bit copy of the gradient (2 B): 6 B at the peak.
    Live bytes, as a GPU's caching allocator reuses them; on CPU glibc's heap can keep freed chunk
    buffers besides (peak RSS 93 MiB for these 48 MiB, 32k vocab, 32k tokens, d 128; 48 MiB when
    every large block is mmapped and returned, MALLOC_MMAP_THRESHOLD_=65536)."""
    from trainers.chunked_loss import chunk_rows

    tokens = s.tokens
    head = shape.vocab * shape.hidden
    engine_half = s.deepspeed and s.half
    hidden_grad = tokens * shape.hidden * (2 if engine_half else 4)
    head_grad = 0 if s.lora_parameters else 4 * head + (2 * head if engine_half else 0)
    head_cast = 2 * head if s.half and not engine_half and not s.lora_parameters else 0
    hidden_cast = 2 * tokens * shape.hidden if s.half and not engine_half else 0  # autocast's fp32 hidden states, cast once
    rows = min(tokens, chunk_rows(shape.vocab, "cuda" if s.on_gpu else "cpu"))
    chunk = rows * shape.vocab * (6 if s.half else 4)
    return hidden_grad + head_grad + head_cast + hidden_cast + chunk


def overhead_bytes(shape: ModelShape, s: Setup) -> int:
    """CUDA context and library workspaces (or a CPU rank's resident libraries), plus what the DS
    JSON the run uses costs beyond the model states (trainers/ds_config.py buffer_bytes: reduction
    buckets, ZeRO-3's parameters kept gathered for reuse)."""
    from trainers.ds_config import buffer_bytes, trainrig_buffer_keys

    base = CUDA_CONTEXT_BYTES if s.on_gpu else CPU_PROCESS_BYTES
    if not s.deepspeed:
        return base
    zero = dict(s.ds_zero or trainrig_buffer_keys(s.zero_stage, s.offload, shape.hidden))
    return base + buffer_bytes(zero, 2 if s.half else 4, shape.parameters)


# ----------------------------------------------------------------------------------- totals


@dataclass(frozen=True)
class Memory:
    """Bytes per rank, by term (plan.json's memory_gb)."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    cpu: int  # host RAM per node, not counted in total

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.activations + self.logits + self.overhead

    def gb(self, available: int) -> dict:
        out = {k: round(v / GiB, 3) for k, v in asdict(self).items() if k != "cpu"}
        out.update(total=round(self.total / GiB, 3), available=round(available / GiB, 3), cpu_ram_per_node=round(self.cpu / GiB, 3))
        return out


def estimate(shape: ModelShape, s: Setup) -> Memory:
    states = model_states(shape, s)
    return Memory(parameters=states.parameters, gradients=states.gradients, optimizer_states=states.optimizer_states,
                  activations=activation_bytes(shape, s), logits=logits_bytes(shape, s),
                  overhead=overhead_bytes(shape, s), cpu=states.cpu)


def training_flops_per_token(shape: ModelShape, s: Setup) -> float:
    """6 Psi for a full backward (2 forward + 4 backward), 4 Psi with frozen weights (no weight
    gradients: LoRA), +2 Psi with checkpointing (a second forward); attention adds 12 L h s
    (the PaLM/Megatron accounting of model FLOPs per token). DoRA with dropout runs each adapted
    matmul a second time and its input gradient: +4 per layer weight (+2 more recomputed). DoRA's
    weight norms cost per step, not per token: ~0.9 TFLOP a forward for 14B at r 16, 0.1% of a
    micro batch of 8 x 2,048 tokens, left out."""
    per_param = 4 if s.lora_parameters else 6
    if s.gradient_checkpointing:
        per_param += 2
    attention = 12 * shape.layers * shape.hidden * s.seq_len * (per_param / 6)
    dora = (6 if s.gradient_checkpointing else 4) * shape.matrix_parameters if s.dora and s.lora_dropout else 0
    return per_param * shape.parameters + attention + dora
