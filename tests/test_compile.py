"""compile_decoder_layers: which layers it compiles, in place, and the setups it refuses (exit 2)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainers.errors import UsageError
from trainers.models import compile_decoder_layers


def tiny_qwen2():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def test_compiles_each_decoder_layer_in_place_and_nothing_else():
    model = tiny_qwen2()
    keys = list(model.state_dict())
    n, why = compile_decoder_layers(model, True, torch.device("cpu"), None)
    assert n == 3 and "Qwen2DecoderLayer" in why
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.lm_head._compiled_call_impl is None and model.model.norm._compiled_call_impl is None
    assert list(model.state_dict()) == keys  # no _orig_mod wrappers: checkpoints and PEFT see the same module tree


def test_disabled_compiles_nothing():
    model = tiny_qwen2()
    assert compile_decoder_layers(model, False, torch.device("cpu"), 3)[0] == 0
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


def test_refuses_zero3():
    with pytest.raises(UsageError, match="ZeRO-3.*--zero_stage 2"):
        compile_decoder_layers(tiny_qwen2(), True, torch.device("cpu"), 3)


def test_refuses_cpu_without_a_cxx_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(UsageError, match="'no-such-compiler-xyz' is not on PATH.*install g\\+\\+"):
        compile_decoder_layers(tiny_qwen2(), True, torch.device("cpu"), None)


def test_refuses_a_model_without_repeated_layers():
    class Plain(torch.nn.Module):
        _no_split_modules = None

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(UsageError, match="Plain names no repeated decoder layer class"):
        compile_decoder_layers(Plain(), True, torch.device("cpu"), None)
