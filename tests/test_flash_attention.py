"""The FlashAttention path on CPU, with fake kernels (tests/fake_flash.py) in transformers' own
flash code: SFT batches keep every sample's attention to itself at any micro batch, the varlen
kernel is the one called, an SFT run under FlashAttention gives SDPA's losses, reward pairs are
unpadded correctly, and the probe that decides whether flash-attn runs on the GPU at all."""

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch

from conftest import read_losses, sft_args
from fake_flash import fake_flash_attention
from test_sft import load_samples
from trainers import attention
from trainers.data.collate import collate_rows, model_inputs
from trainers.data.packing import RowDataset, pack_rows
from trainers.errors import UsageError


def _model(model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _rows(samples, micro):
    """`micro` packed rows of several samples each (best-fit leaves some long samples alone)."""
    rows = RowDataset(samples, [[int(j) for j in row] for row in pack_rows(samples.lengths, 128, seed=0) if len(row) >= 2])
    return [rows[r] for r in range(micro)]


@pytest.mark.parametrize("micro", [1, 2, 8])
def test_flat_batches_keep_each_sample_to_itself_and_call_the_varlen_kernel(chat_dir, sft_model_dir, monkeypatch, micro):
    tok, samples = load_samples(chat_dir, sft_model_dir)
    rows = _rows(samples, micro)
    assert all(len(row) >= 2 for row in rows)  # every packed row holds several samples
    reference = _model(sft_model_dir, "sdpa")
    with fake_flash_attention(monkeypatch) as fake, torch.no_grad():
        model = _model(sft_model_dir, attention.FLASH)
        batch = collate_rows(rows, pad_id=tok.pad_token_id, layout=attention.row_layout(attention.FLASH, packed=True))
        inputs = model_inputs(batch, "cpu", attention.mask_dtype(attention.FLASH, "bf16"))
        assert "attention_mask" not in inputs and isinstance(inputs["max_length_q"], int)  # no host sync per layer
        logits = model(**inputs).logits[0]
        lengths = [len(s["input_ids"]) for row in rows for s in row]
        assert fake.dense_calls == 0
        assert len(fake.varlen_calls) == model.config.num_hidden_layers
        assert fake.varlen_calls[0] == {"cu_seqlens_q": np.concatenate([[0], np.cumsum(lengths)]).tolist(), "max_seqlen_q": max(lengths)}
        at = 0
        for sample in (s for row in rows for s in row):
            n = len(sample["input_ids"])
            alone = reference(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
            assert torch.allclose(logits[at:at + n], alone, atol=1e-4), (at, float((logits[at:at + n] - alone).abs().max()))
            at += n

        if micro > 1:  # the layout this replaces: [B, L] packed rows make transformers run the dense kernel over each row
            fake.varlen_calls.clear()
            old = collate_rows(rows, pad_id=tok.pad_token_id, layout="packed")
            leaky = model(input_ids=old["input_ids"], position_ids=old["position_ids"]).logits[0]
            first, second = rows[0][0], rows[0][1]
            n1, n2 = len(first["input_ids"]), len(second["input_ids"])
            alone = reference(input_ids=torch.tensor([second["input_ids"]])).logits[0]
            assert fake.dense_calls > 0 and not fake.varlen_calls
            assert float((leaky[n1:n1 + n2] - alone).abs().max()) > 1e-3  # the second sample saw the first


def test_sft_under_flash_attention_gives_sdpas_losses(chat_dir, sft_model_dir, tmp_path, monkeypatch):
    """The trainer itself picks the flat layout under FlashAttention (micro 2, packed, with an eval)."""
    from launch.sft import main

    flags = dict(per_device_train_batch_size=2, max_steps=4, eval_steps=2, save_steps=0)
    main(sft_args(chat_dir, sft_model_dir, tmp_path / "sdpa", attn_implementation="sdpa", **flags))
    with fake_flash_attention(monkeypatch) as fake:
        monkeypatch.setattr("trainers.setup.resolve_attn_implementation", lambda *a: (attention.FLASH, "fake kernels (test)"))
        main(sft_args(chat_dir, sft_model_dir, tmp_path / "flash", **flags))
    assert fake.varlen_calls and fake.dense_calls == 0
    plan = json.loads((tmp_path / "flash" / "plan.json").read_text())
    assert plan["attn_implementation"] == attention.FLASH and plan["batch_layout"] == "flat" and plan["batch_fill"] == 1.0
    sdpa, flash = read_losses(tmp_path / "sdpa"), read_losses(tmp_path / "flash")
    assert sdpa.keys() == flash.keys() and all(abs(sdpa[s] - flash[s]) < 1e-5 for s in sdpa), (sdpa, flash)


def test_reward_pairs_under_flash_attention_are_unpadded_by_their_mask(sft_model_dir, tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import toy_pairs
    from trainers.data.pairs import collate_pairs, encode_pairs
    from trainers.reward import rewards

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, _ = encode_pairs([str(toy_pairs(tmp_path / "p.jsonl", 4, seed=1))], "--train_files", tokenizer, 64)
    batch = collate_pairs([{"chosen": c, "rejected": r, "index": i} for i, (c, r) in enumerate(pairs)], tokenizer.pad_token_id)
    with fake_flash_attention(monkeypatch) as fake, torch.no_grad():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(sft_model_dir, num_labels=1, attn_implementation=attention.FLASH)
        model.config.pad_token_id = tokenizer.pad_token_id
        scores = rewards(model, batch, "cpu", attention.mask_dtype(attention.FLASH, "bf16"))
        assert fake.varlen_calls and fake.dense_calls == 0
        model.config._attn_implementation = "sdpa"
        for i, row in enumerate([c for c, _ in pairs] + [r for _, r in pairs]):
            assert scores[i].item() == pytest.approx(model(input_ids=torch.tensor([row])).logits.item(), abs=1e-5)


# ------------------------------------------------------------------------------ the probe


def _fake_flash_module(monkeypatch, flash_attn_func):
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # what find_spec reports for an imported module
    module.__version__ = "2.8.3"
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    attention._flash_attn_problem.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    yield
    attention._flash_attn_problem.cache_clear()


def test_the_probe_passes_kernels_that_run_and_agree_with_sdpa(monkeypatch):
    def works(q, k, v, causal):
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)

    _fake_flash_module(monkeypatch, works)
    assert attention.flash_attn_problem(torch.device("cpu")) == ""


def test_the_probe_names_a_wheel_without_kernels_for_the_card(monkeypatch):
    calls = []

    def no_kernel(q, k, v, causal):
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors ...")

    _fake_flash_module(monkeypatch, no_kernel)
    problem = attention.flash_attn_problem(torch.device("cpu"))
    assert problem == ("flash-attn 2.8.3 fails on this GPU (RuntimeError: CUDA error: no kernel image is available for "
                       "execution on the device)")
    attention.flash_attn_problem(torch.device("cpu"))
    assert len(calls) == 1  # probed once per process


def test_the_probe_catches_wrong_results(monkeypatch):
    _fake_flash_module(monkeypatch, lambda q, k, v, causal: q * 3)
    assert "gives wrong results on this GPU" in attention.flash_attn_problem(torch.device("cpu"))


def test_a_failed_probe_falls_back_to_sdpa_or_refuses_an_explicit_request(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))  # an RTX 5090
    monkeypatch.setattr(attention, "flash_attn_problem", lambda device: "flash-attn 2.8.3 fails on this GPU (RuntimeError: no kernel image)")
    attn, why = attention.resolve_attn_implementation("auto", cuda, "bf16")
    assert attn == "sdpa" and why.startswith("flash-attn 2.8.3 fails on this GPU") and "--no-build-isolation" in why
    with pytest.raises(UsageError, match="flash_attention_2: flash-attn 2.8.3 fails on this GPU.*use --attn_implementation sdpa"):
        attention.resolve_attn_implementation("flash_attention_2", cuda, "bf16")
    monkeypatch.setattr(attention, "flash_attn_problem", lambda device: "")
    assert attention.resolve_attn_implementation("auto", cuda, "bf16")[0] == attention.FLASH
    assert attention.resolve_attn_implementation("auto", cuda, "fp32")[0] == "sdpa"
    assert attention.resolve_attn_implementation("auto", torch.device("cpu"), "bf16")[0] == "sdpa"
