"""--torch_compile: which layers compile_decoder_layers compiles, in place, into one graph; the setups
check_torch_compile refuses (exit 2)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainers.errors import UsageError
from trainers.models import check_torch_compile, compile_decoder_layers


def tiny_qwen2():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False)  # as build_model sets it; a KV cache indexed by layer_idx would make one graph per layer
    return Qwen2ForCausalLM(config)


def test_compiles_each_decoder_layer_in_place_and_nothing_else():
    model = tiny_qwen2()
    keys = list(model.state_dict())
    n, why = compile_decoder_layers(model, True)
    assert n == 3 and "Qwen2DecoderLayer" in why
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.lm_head._compiled_call_impl is None and model.model.norm._compiled_call_impl is None
    assert list(model.state_dict()) == keys  # no _orig_mod wrappers: checkpoints and PEFT see the same module tree


def test_the_layers_share_one_compiled_graph_and_match_eager():
    """Compilation really runs, once for all layers (their weights are graph inputs), with eager's
    loss and gradients; a silent fallback to eager would leave no graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = tiny_qwen2()
    compiled = tiny_qwen2()
    compiled.load_state_dict(eager.state_dict())
    compile_decoder_layers(compiled, True)
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 64, (2, 16))
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_finds_the_layers_of_a_reward_model_and_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForSequenceClassification

    reward = Qwen2ForSequenceClassification(tiny_qwen2().config)
    assert compile_decoder_layers(reward, True)[0] == 3
    lora = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert compile_decoder_layers(lora, True)[0] == 3


def test_disabled_compiles_nothing_and_checks_nothing(monkeypatch):
    model = tiny_qwen2()
    assert compile_decoder_layers(model, False)[0] == 0
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    check_torch_compile(False, torch.device("cpu"), 3)


def test_refuses_zero3():
    with pytest.raises(UsageError, match="ZeRO-3.*--zero_stage 2"):
        check_torch_compile(True, torch.device("cpu"), 3)


def test_refuses_cpu_without_a_cxx_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(UsageError, match="'no-such-compiler-xyz' is not on PATH.*or drop --torch_compile"):
        check_torch_compile(True, torch.device("cpu"), None)
    monkeypatch.delenv("CXX")
    check_torch_compile(True, torch.device("cpu"), 2)  # g++ is on this machine's PATH


def test_refuses_a_gpu_without_triton(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(UsageError, match="needs triton.*or drop --torch_compile"):
        check_torch_compile(True, torch.device("cuda"), None)


def test_refuses_a_model_without_repeated_layers():
    class Plain(torch.nn.Module):
        _no_split_modules = None

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(UsageError, match="Plain names no repeated decoder layer class"):
        compile_decoder_layers(Plain(), True)
