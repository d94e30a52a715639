"""trainers/chunked_loss.py against the reference it replaces: F.cross_entropy over the whole
logits (the function), and transformers' own Qwen2 loss (the routed model), losses and every
gradient; and a pretraining run with it against one with --no-chunked_loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import pretrain_args, read_losses
from launch.pretrain import main as pretrain_main
from trainers.chunked_loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy, use_chunked_loss

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=128, use_cache=False)  # as build_model sets it for training


def reference_and_chunked(rows: int, denominator, frozen_weight: bool = False):
    torch.manual_seed(0)
    hidden = torch.randn(45, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=not frozen_weight)
    labels = torch.randint(0, 300, (45,))
    labels[::4] = IGNORE_INDEX
    valid = (labels != IGNORE_INDEX).sum()
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX, reduction="sum") / (
        valid if denominator is None else denominator)
    ref_grads = torch.autograd.grad(ref * 3.0, [t for t in (hidden, weight) if t.requires_grad])
    got = linear_cross_entropy(hidden, weight, labels, denominator, rows=rows)
    got_grads = torch.autograd.grad(got * 3.0, [t for t in (hidden, weight) if t.requires_grad])
    return ref, got, ref_grads, got_grads


@pytest.mark.parametrize("rows", [7, 45, 64])  # a ragged last chunk, one exact chunk, one chunk larger than the tokens
@pytest.mark.parametrize("denominator", [None, 1000.0])  # the mean, and a global token count from the loop
def test_equals_cross_entropy_over_the_whole_logits(rows, denominator):
    ref, got, ref_grads, got_grads = reference_and_chunked(rows, denominator)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    for r, g in zip(ref_grads, got_grads):  # scaled by the upstream gradient (3.0) like any autograd node
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    ref, got, ref_grads, got_grads = reference_and_chunked(8, None, frozen_weight=True)
    assert len(got_grads) == 1
    torch.testing.assert_close(got_grads[0], ref_grads[0], rtol=1e-4, atol=1e-7)


def test_without_gradients_it_only_evaluates():
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (20,))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, rows=6)
    assert got.grad_fn is None
    torch.testing.assert_close(got, F.cross_entropy(F.linear(hidden, weight), labels).detach())


def test_chunk_rows_follow_the_budget():
    assert chunk_rows(4096, "cpu") == 512  # 8 MiB of fp32 logits
    assert chunk_rows(151936, "cuda") == 883  # 512 MiB
    assert chunk_rows(151936, "cpu") == 128  # the floor: a chunk must still fill a matmul


def routed_pair(**config):
    torch.manual_seed(1)
    reference = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **config}, attn_implementation="sdpa"))
    model = copy.deepcopy(reference)
    used, why = use_chunked_loss(model, True)
    assert used, why
    return reference, model


def assert_same_loss_and_gradients(reference, model, **inputs):
    losses = []
    for m in (reference, model):
        loss = m(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_routed_model_equals_transformers_loss(tied):
    """Labels with ignored spans and the loop's global denominator; the model's own shift."""
    reference, model = routed_pair(tie_word_embeddings=tied)
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, :12] = IGNORE_INDEX
    assert_same_loss_and_gradients(reference, model, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(97))


def test_routed_model_padding_free_rows():
    """SFT's packed rows: one flattened row, position_ids restarting per sample."""
    reference, model = routed_pair()
    ids = torch.randint(0, 300, (1, 30))
    position_ids = torch.cat([torch.arange(12), torch.arange(18)])[None]
    labels = ids.clone()
    labels[0, 11] = IGNORE_INDEX  # the boundary token predicts nothing across samples
    assert_same_loss_and_gradients(reference, model, input_ids=ids, labels=labels, position_ids=position_ids)


def test_routed_model_still_gives_logits_and_evaluates():
    reference, model = routed_pair()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=ids, labels=ids, num_items_in_batch=1).loss,
                                   reference(input_ids=ids, labels=ids, num_items_in_batch=1).loss)
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False),
                           reference.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))


def test_bf16_autocast_matches_the_models_loss():
    """Accelerate's bf16 runs: autocast over fp32 weights; the head's matmul in bf16 as the model's own."""
    reference, model = routed_pair()
    ids = torch.randint(0, 300, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = reference(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


def test_lora_routes_the_base_unless_peft_wraps_the_head():
    from peft import LoraConfig, get_peft_model

    reference, model = routed_pair()
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(2)
    reference = get_peft_model(reference, lora)
    torch.manual_seed(2)
    routed = get_peft_model(copy.deepcopy(model), lora)
    ids = torch.randint(0, 300, (2, 20))
    assert_same_loss_and_gradients(reference, routed, input_ids=ids, labels=ids)

    torch.manual_seed(1)
    plain = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    wrapped = get_peft_model(plain, LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 4]))
    used, why = use_chunked_loss(wrapped, True)
    assert not used and "--lora_train_chat_tokens" in why


def test_refusals_say_why():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert use_chunked_loss(Qwen2ForCausalLM(Qwen2Config(**TINY)), False) == (False, "--no-chunked_loss: the model's own loss (full logits)")
    used, why = use_chunked_loss(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), True)
    assert not used and "'gpt2'" in why


def test_pretraining_equals_the_models_own_loss(corpus, tokenizer_dir, tmp_path):
    """Six steps with the chunked loss (the default) and with --no-chunked_loss: the same losses."""
    runs = {}
    for name, flag in (("chunked", {}), ("own", {"no-chunked_loss": True})):
        out = tmp_path / name
        args = pretrain_args(corpus, tokenizer_dir, out)
        pretrain_main(args + (["--no-chunked_loss"] if flag else []))
        runs[name] = read_losses(out)
        assert (f'"chunked_loss": {str(not flag).lower()}') in (out / "plan.json").read_text()
    assert sorted(runs["chunked"]) == sorted(runs["own"]) == list(range(1, 7))
    assert max(abs(runs["chunked"][s] - runs["own"][s]) for s in runs["own"]) < 1e-5


def test_fp16_gradients_do_not_underflow_with_a_large_token_count():
    """A 16-bit engine's head (DeepSpeed fp16): softmax / 1e6 tokens is below fp16's smallest
    subnormal (6e-8) for most entries; the 1/denominator is applied in fp32 in the backward, so the
    gradients equal fp32's to fp16 rounding instead of flushing to zero."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16), torch.randn(500, 16) * 0.5
    labels = torch.randint(0, 500, (64,))
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, denominator=1e6, rows=16)
        (loss * 1e6).backward()  # fp16's loss scale brings the gradients back into range
        grads[dtype] = (h.grad.float(), w.grad.float())
    for ref, got in zip(grads[torch.float32], grads[torch.float16]):
        assert got.abs().sum() > 0.9 * ref.abs().sum()
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)
