import math

import pytest
import torch

from trainers.optim import MuonWithAdamW, build_optimizer, lr_multiplier, set_learning_rate


def test_warmup_then_cosine_to_min():
    mult = [lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert mult[0] == pytest.approx(0.1) and mult[9] == pytest.approx(1.0)   # linear warmup, 1/10 per step
    assert mult[10] == pytest.approx(1.0) and mult[99] == pytest.approx(0.1)   # cosine from peak to min at the last step
    assert all(a >= b for a, b in zip(mult[10:], mult[11:]))
    assert mult[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_linear_and_constant():
    assert lr_multiplier(55, 101, 0, "linear", 0.0) == pytest.approx(0.45)
    assert lr_multiplier(80, 100, 5, "constant", 0.1) == 1.0


def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True))


def test_adamw_groups_skip_decay_on_norms_and_embeddings():
    from trainers.config import OptimConfig

    model = _tiny_model()
    cfg = OptimConfig(weight_decay=0.1, learning_rate=1e-3, warmup_steps=2)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    set_learning_rate(opt, 0, 10, cfg)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)


def test_muon_takes_hidden_matrices_and_round_trips_state():
    from trainers.config import OptimConfig

    model = _tiny_model()
    opt = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    muon_params = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (p.ndim == 2 and "embed" not in name), name
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh.optimizers[0].state.values()))["momentum_buffer"],
                       next(iter(opt.optimizers[0].state.values()))["momentum_buffer"])
