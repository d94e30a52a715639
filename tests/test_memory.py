"""The memory model against its references: DeepSpeed's own estimators for the model states, the
tensors autograd really saves for the activations, and the process's peak RSS for the logits."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from launch.planner import memory as mem
from launch.planner.memory import Setup

DS_SHAPES = [  # (parameters, largest module, gpus per node, nodes)
    (494_032_768, 136_134_656, 1, 1), (494_032_768, 136_134_656, 4, 1),
    (7_615_616_512, 544_997_376, 8, 1), (7_615_616_512, 544_997_376, 8, 2), (14_770_033_664, 778_567_680, 4, 4),
]


def _shape(parameters: int, largest: int) -> mem.ModelShape:
    return mem.ModelShape(name="x", hidden=1024, intermediate=4096, layers=2, heads=8, kv_heads=2, head_dim=128, vocab=1000,
                          parameters=parameters, largest_module_parameters=largest, matrix_parameters=parameters // 2,
                          max_positions=4096)


@pytest.mark.parametrize("parameters,largest,per_node,nodes", DS_SHAPES)
def test_zero2_and_zero3_model_states_equal_deepspeeds_estimators(parameters, largest, per_node, nodes):
    """GPU bytes exact up to DeepSpeed's own int() rounding (a few bytes); host bytes exact."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, world = _shape(parameters, largest), per_node * nodes
    for offload in (False, True):
        s = Setup(world=world, nodes=nodes, deepspeed=True, zero_stage=2, offload="optimizer" if offload else "none")
        states = mem.model_states(shape, s)
        cpu, gpu = estimate_zero2_model_states_mem_needs(parameters, per_node, nodes, cpu_offload=offload)
        assert abs(states.parameters + states.gradients + states.optimizer_states - gpu) <= 4
        assert abs(states.cpu - cpu) <= 4
    for offload, params_too in ((False, False), (True, False), (True, True)):
        s = Setup(world=world, nodes=nodes, deepspeed=True, zero_stage=3,
                  offload="all" if params_too else "optimizer" if offload else "none")
        states = mem.model_states(shape, s)
        # from scratch trainrig builds without zero.Init (the same init on every world size): zero_init=False;
        # a checkpoint (CPT, SFT) loads under zero.Init: zero_init=True
        for sharded_load in (False, True):
            states = mem.model_states(shape, dataclasses.replace(s, sharded_load=sharded_load))
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(parameters, largest, per_node, nodes, cpu_offload=offload,
                                                                cpu_offload_params=params_too, zero_init=sharded_load)
            assert abs(states.parameters + states.gradients + states.optimizer_states - gpu) <= 4
            if sharded_load and offload:  # DeepSpeed's zero_init figure counts the states alone, not a gathered module
                assert states.cpu >= cpu - 4
            else:
                assert abs(states.cpu - cpu) <= 4


def test_zero1_and_ddp_follow_the_zero_paper():
    """ZeRO-1 in fp16: 16-bit weights and gradients whole (4 Psi), fp32 master/grad/moments sharded
    (16 Psi / N); in bf16 the fp32 gradients trainrig accumulates in are whole too (DeepSpeed's BF16
    optimizer: + 4 Psi, - 4 Psi / N). DDP with autocast: fp32 weights, grads, moments (16 Psi) + the
    bf16 copies of the matmul weights."""
    shape = _shape(1_000_000_000, 100_000_000)
    z1 = mem.model_states(shape, Setup(world=8, deepspeed=True, zero_stage=1, precision="fp16"))
    assert z1.parameters + z1.gradients + z1.optimizer_states == 4 * 10**9 + 16 * 10**9 // 8
    z1 = mem.model_states(shape, Setup(world=8, deepspeed=True, zero_stage=1, precision="bf16"))
    assert z1.parameters + z1.gradients + z1.optimizer_states == 8 * 10**9 + 12 * 10**9 // 8
    ddp = mem.model_states(shape, Setup(world=8))
    assert (ddp.parameters, ddp.gradients, ddp.optimizer_states) == (4 * 10**9 + 2 * shape.matrix_parameters, 4 * 10**9, 8 * 10**9)
    muon = mem.model_states(shape, Setup(optimizer="muon"))
    assert muon.optimizer_states == 4 * shape.matrix_parameters + 8 * (10**9 - shape.matrix_parameters)
    lora = mem.model_states(shape, Setup(lora_parameters=10**7))
    assert lora.parameters == 2 * 10**9 + 6 * 10**7 and lora.optimizer_states == 8 * 10**7  # frozen base in bf16


def test_parameter_counts_of_the_shipped_qwen_shapes():
    """Meta-device counts equal the published sizes (Qwen2.5 model cards: 0.49B, 1.54B, 3.09B, 7.61B, 14.7B)."""
    expected = {"qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.544, "qwen2.5-3b": 3.086, "qwen2.5-7b": 7.616, "qwen2.5-14b": 14.770}
    for name, billions in expected.items():
        shape = mem.load_shape(name)
        assert round(shape.parameters / 1e9, 3) == billions, name
    seven = mem.load_shape("qwen2.5-7b")
    assert seven.largest_module_parameters == 152064 * 3584  # the (untied) embedding
    assert seven.lora_parameters(8) == 8 * 28 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)


# ------------------------------------------------------------------ activations, measured


def _saved_bytes(h, inter, heads, kv_heads, layers, seq, mode, attn="sdpa", lora=False, ckpt=False, packed_rows=0,
                 dora=False, lora_dropout=0.05, bits=16, tmp_path=None) -> int:
    """Bytes autograd keeps for the backward of one forward (distinct storages alive when the forward
    ends, weights excluded). packed_rows: that many rows of two samples each, through the trainer's own
    inputs (the shared mask). bits 4: the base saved and reloaded in NF4 (bitsandbytes) under `tmp_path`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, vocab_size=512, max_position_embeddings=2048, use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    half = mode == "half" or (lora and mode == "amp")
    if bits == 4:
        from transformers import BitsAndBytesConfig

        from trainers.quantization import keep_training_layout

        path = tmp_path / f"base-{h}-{inter}-{layers}"
        model.save_pretrained(path)
        dtype = torch.bfloat16 if half else torch.float32
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=nf4, device_map={"": "cpu"}, attn_implementation=attn)
        keep_training_layout(model, torch.device("cpu"))
    elif half:
        model = model.to(torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules="all-linear", use_dora=dora))
    model.train()
    weights = {p.data_ptr() for p in model.parameters()}
    held: list[weakref.ref] = []

    class Saved:  # what the graph holds; alive after the forward only if the backward needs it
        def __init__(self, tensor):
            self.tensor = tensor

    def pack(t):
        kept = Saved(t)
        if t.data_ptr() not in weights:
            held.append(weakref.ref(kept))
        return kept

    ids = torch.randint(0, 512, (max(packed_rows, 1), seq))
    inputs = {"input_ids": ids, "labels": ids}
    if packed_rows:
        from trainers.data.collate import model_inputs

        position_ids = torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).expand(packed_rows, -1)
        inputs = model_inputs({**inputs, "position_ids": position_ids}, "cpu", torch.float32 if mode == "fp32" else torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "amp" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda kept: kept.tensor), autocast:
        outputs = model(**inputs)  # holds the graph, and what it saved, until the storages are counted
    storages = {ref().tensor.untyped_storage().data_ptr(): ref().tensor.untyped_storage().nbytes() for ref in held if ref() is not None}
    del outputs
    return sum(storages.values())


CASES = [  # (mode, setup, attn, lora); the shape below was not among the five the coefficients were fitted on
    ("amp", Setup(precision="bf16"), "sdpa", False),
    ("half", Setup(precision="bf16", deepspeed=True, zero_stage=2), "sdpa", False),
    ("fp32", Setup(precision="fp32"), "sdpa", False),
    ("amp", Setup(precision="bf16", lora_parameters=1), "sdpa", True),
    ("fp32", Setup(precision="fp32", lora_parameters=1), "sdpa", True),
    ("half", Setup(precision="bf16", deepspeed=True, zero_stage=2, attn="eager"), "eager", False),
]


@pytest.mark.parametrize("mode,setup,attn,lora", CASES, ids=[f"{c[0]}-{c[2]}{'-lora' if c[3] else ''}" for c in CASES])
def test_layer_activations_match_what_autograd_saves(mode, setup, attn, lora):
    h, inter, heads, kv, seq = 320, 864, 5, 1, 192
    per_layer = (_saved_bytes(h, inter, heads, kv, 2, seq, mode, attn, lora)
                 - _saved_bytes(h, inter, heads, kv, 1, seq, mode, attn, lora))
    if mode == "amp" and not lora:  # autocast's bf16 weight copies are counted with the parameters
        per_layer -= 2 * (2 * h * h + 2 * h * kv * 64 + 3 * h * inter)
    shape = mem.ModelShape(name="t", hidden=h, intermediate=inter, layers=1, heads=heads, kv_heads=kv, head_dim=64, vocab=512,
                           parameters=0, largest_module_parameters=0, matrix_parameters=0, max_positions=2048)
    predicted = mem.layer_activation_bytes(shape, dataclasses.replace(setup, seq_len=seq)) * seq
    tolerance = 0.06 if attn == "eager" else 0.03
    assert abs(predicted - per_layer) / per_layer < tolerance, (predicted, per_layer)


@pytest.mark.parametrize("mode,setup", [("half", Setup(precision="bf16", deepspeed=True, zero_stage=2)), ("fp32", Setup(precision="fp32"))],
                         ids=["half", "fp32"])
def test_the_shared_attention_mask_is_saved_once_and_the_kv_heads_repeat(mode, setup):
    """Packed rows under SDPA: per layer, the layer's bytes plus the repeated key/value heads (no
    mask copy per layer, which transformers' boolean mask made: 2 B L^2 per layer in bf16); once,
    the (B, 1, L, L) mask itself."""
    h, inter, heads, kv, seq, rows = 384, 864, 6, 2, 192, 2  # kv 2: with one key/value head the repeat is a view
    one, two = (_saved_bytes(h, inter, heads, kv, n, seq, mode, packed_rows=rows) for n in (1, 2))
    shape = mem.ModelShape(name="t", hidden=h, intermediate=inter, layers=1, heads=heads, kv_heads=kv, head_dim=64, vocab=512,
                           parameters=0, largest_module_parameters=0, matrix_parameters=0, max_positions=2048)
    masked = dataclasses.replace(setup, seq_len=seq, micro_batch=rows, attention_mask=True)
    predicted = mem.layer_activation_bytes(shape, masked) * seq * rows
    assert abs(predicted - (two - one)) / (two - one) < 0.03, (predicted, two - one)
    unmasked = _saved_bytes(h, inter, heads, kv, 1, seq, mode) * rows  # the same tokens without a mask
    assert mem.mask_bytes(masked) == rows * seq * seq * (4 if mode == "fp32" else 2)
    repeat = 2 * (heads - kv) * 64 * (4 if mode == "fp32" else 2) * seq * rows
    assert abs((one - unmasked) - (mem.mask_bytes(masked) + repeat)) / mem.mask_bytes(masked) < 0.05, (one - unmasked, mem.mask_bytes(masked), repeat)


DORA_CASES = [  # (mode, setup, lora dropout, base bits); the first: QLoRA saves what LoRA on a 16-bit base does
    ("amp", Setup(precision="bf16", lora_parameters=1, lora_dropout=True, base_bits=4), 0.05, 4),
    ("fp32", Setup(precision="fp32", lora_parameters=1, dora=True, lora_dropout=False), 0.0, 16),
    ("amp", Setup(precision="bf16", lora_parameters=1, dora=True, lora_dropout=False), 0.0, 16),
    ("amp", Setup(precision="bf16", lora_parameters=1, dora=True, lora_dropout=True), 0.05, 16),
    ("fp32", Setup(precision="fp32", lora_parameters=1, dora=True, lora_dropout=True, base_bits=4), 0.05, 4),
]


@pytest.mark.parametrize("mode,setup,dropout,bits", DORA_CASES, ids=["qlora-amp-dropout-nf4", "dora-fp32", "dora-amp", "dora-amp-dropout",
                                                                   "dora-fp32-dropout-nf4"])
def test_qlora_and_dora_activations_match_what_autograd_saves(mode, setup, dropout, bits, tmp_path):
    """Saved bytes per layer, at two sequence lengths, so that both DoRA's per-token term (two
    outputs per adapted linear) and its per-layer one (with dropout, the dequantized weight of the
    second base matmul) are checked; the norm's transient is not saved and is not counted here.
    On a 4-bit base, bitsandbytes' matmul saves its input, which LoRA's adapter saves already."""
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    h, inter, heads, kv = 384, 1152, 6, 2
    shape = mem.ModelShape(name="t", hidden=h, intermediate=inter, layers=1, heads=heads, kv_heads=kv, head_dim=64, vocab=512,
                           parameters=0, largest_module_parameters=0, matrix_parameters=0, max_positions=2048)
    for seq in (96, 192):
        kw = dict(mode=mode, lora=True, dora=setup.dora, lora_dropout=dropout, bits=bits, tmp_path=tmp_path)
        measured = _saved_bytes(h, inter, heads, kv, 2, seq, **kw) - _saved_bytes(h, inter, heads, kv, 1, seq, **kw)
        s = dataclasses.replace(setup, seq_len=seq)
        norm = max((6 if s.half else 4) * i * i + 3 * (2 if s.half else 4) * i * o for i, o in shape.linear_sizes()) if s.dora else 0
        predicted = (mem.layer_activation_bytes(shape, s) + mem.dora_token_bytes(shape, s)) * seq + mem.dora_layer_bytes(shape, s) - norm
        assert abs(predicted - measured) / measured < 0.03, (seq, predicted, measured)


def test_checkpointing_keeps_only_each_layers_input():
    per_layer = _saved_bytes(256, 512, 4, 2, 2, 128, "fp32", ckpt=True) - _saved_bytes(256, 512, 4, 2, 1, 128, "fp32", ckpt=True)
    assert per_layer == mem.CHECKPOINT_BYTES["fp32"] * 256 * 128


# VmHWM, the address space's own peak: ru_maxrss would carry over the parent's peak across exec
LOGITS_PROBE = textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size={vocab}, use_cache=False)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, {vocab}, (1, {tokens}))
    before = peak_rss()
    loss = model(input_ids=ids, labels=ids).loss  # the loop keeps only the loss, as here
    loss.backward()
    print(peak_rss() - before)
""")


def test_logits_peak_matches_peak_rss():
    """12 bytes per vocabulary entry per token at the start of the backward (fp32 here; the
    16-bit runs measured the same, 12.0-12.1, when the model was written)."""
    vocab, tokens = 32768, 2048
    out = subprocess.run([sys.executable, "-c", LOGITS_PROBE.format(vocab=vocab, tokens=tokens)],
                         capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    shape = mem.ModelShape(name="t", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, head_dim=16, vocab=vocab,
                           parameters=0, largest_module_parameters=0, matrix_parameters=0, max_positions=4096)
    predicted = mem.logits_bytes(shape, Setup(seq_len=tokens, micro_batch=1, chunked_loss=False, on_gpu=False))
    assert abs(peak - predicted) / predicted < 0.05, (peak, predicted)


CHUNKED_PROBE = textwrap.dedent("""
    import torch
    from trainers.chunked_loss import linear_cross_entropy
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    hidden = torch.randn({tokens}, {d}, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn({vocab}, {d}) * 0.02)
    labels = torch.randint(0, {vocab}, ({tokens},))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled={bf16})  # Accelerate's bf16 over fp32 weights
    with autocast:
        linear_cross_entropy(hidden[:256], weight, labels[:256]).backward()  # first-use costs, paid in a run's forward
    hidden.grad = weight.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS:")
    with autocast:
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    print(status("VmHWM:") - base)
""")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_loss_peak_matches_peak_rss(precision):
    """The chunked loss's term (hidden-state and head gradients, the head's autocast copy, one
    chunk's logits) against the peak RSS of the loss alone on CPU, with every block of 64 KiB or
    more mmapped and returned on free, so the RSS is the live bytes (as a GPU's caching allocator
    sees them) and not what glibc's heap keeps: fp32 35.9 MiB measured for 36 predicted, bf16 54.2 for
    54 (6 bytes per chunk entry; at 32768 tokens 48.0-48.3 for 48 and 73.8 for 72, but bf16 matmuls
    take 5 minutes there on a CPU without bf16 units; 8192 tokens keep the hidden-state gradient 11% of
    the term). The model's own loss would take 12 x vocab x tokens bytes, 85x the fp32 term here."""
    vocab, tokens, d = 32768, 8192, 128
    out = subprocess.run([sys.executable, "-c", CHUNKED_PROBE.format(vocab=vocab, tokens=tokens, d=d, bf16=precision == "bf16")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    peak = int(out.stdout.strip().splitlines()[-1])
    shape = mem.ModelShape(name="t", hidden=d, intermediate=64, layers=1, heads=2, kv_heads=1, head_dim=32, vocab=vocab,
                           parameters=0, largest_module_parameters=0, matrix_parameters=0, max_positions=tokens)
    predicted = mem.logits_bytes(shape, Setup(seq_len=tokens, micro_batch=1, precision=precision, on_gpu=False))
    assert abs(peak - predicted) / predicted < 0.05, (peak, predicted)
    if precision == "fp32":
        unchunked = mem.logits_bytes(shape, Setup(seq_len=tokens, micro_batch=1, chunked_loss=False))
        assert unchunked == 12 * vocab * tokens and unchunked > 85 * predicted


def test_lora_parameter_count_equals_peft():
    """ModelShape.lora_parameters (the planner, no model built) against PEFT's own count, LoRA and DoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=1000, max_position_embeddings=256)
    shape = mem.shape_from_config(config, "t")
    for dora in (False, True):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules="all-linear", use_dora=dora))
        trainable, total = model.get_nb_trainable_parameters()
        assert trainable == shape.lora_parameters(8, dora=dora) and total - trainable == shape.parameters


@pytest.mark.parametrize("stage,offload", [(1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "all")])
def test_the_overhead_covers_the_buffers_of_the_ds_config_the_run_uses(stage, offload):
    """The buffers DeepSpeed allocates for the JSON trainrig writes (reduction buckets, ZeRO-3's
    reused gathered parameters) are in the overhead term, for trainrig's JSON and for a user's."""
    from trainers.ds_config import DeepSpeedSettings, build, buffer_bytes, buffer_keys

    shape = mem.load_shape("qwen2.5-7b")
    setup = Setup(world=4, deepspeed=True, zero_stage=stage, offload=offload, precision="bf16")
    settings = DeepSpeedSettings(micro_batch=1, accumulation=1, world_size=4, max_grad_norm=1.0, precision="bf16",
                                 zero_stage=str(stage), offload=offload, sources={}, hidden_size=shape.hidden)
    zero = build(stage, offload, settings)["zero_optimization"]
    buffers = buffer_bytes(zero, 2, shape.parameters)
    assert buffers >= (2 if stage < 3 else 1) * zero["reduce_bucket_size"] * 2 > 0
    assert mem.overhead_bytes(shape, setup) - mem.CUDA_CONTEXT_BYTES == buffers
    if stage == 3:  # 1e9 reused parameters in bf16 plus the prefetch: 2.1 GB the old model did not have
        assert buffers >= 2 * 10**9
    # a user's JSON with DeepSpeed's bigger default buckets is counted as written
    theirs = {**zero, "reduce_bucket_size": 500_000_000}
    user = dataclasses.replace(setup, ds_zero=buffer_keys(theirs, shape.hidden))
    assert mem.overhead_bytes(shape, user) - mem.CUDA_CONTEXT_BYTES == buffer_bytes(theirs, 2, shape.parameters) > buffers
