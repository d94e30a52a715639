"""SFT end to end on CPU: packed and padded batches give the same loss and gradients, full and
LoRA runs, adapter-only checkpoints, merged weights equal to the adapter model, resume equality
and the usage errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import read_losses, sft_args
from launch.sft import main as sft_main
from trainers.data.chat import ChatSettings, prepare_chat
from trainers.data.collate import collate_rows, model_inputs, trained_tokens
from trainers.data.packing import RowDataset, pack_rows


def load_samples(chat_dir, model_dir, max_seq_length=128):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, prepare_chat([str(chat_dir / "sft.jsonl")], "--train_files", tok, ChatSettings(max_seq_length),
                             "auto", False, "", build=True)


def loss_and_grads(model, batch):
    """Through the trainer's own inputs: the shared fp32 attention mask SDPA and eager get."""
    model.zero_grad()
    inputs = model_inputs(batch, "cpu", torch.float32)
    loss = model(**inputs, num_items_in_batch=torch.tensor(trained_tokens(batch["labels"]))).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(chat_dir, sft_model_dir, attn):
    from transformers import AutoModelForCausalLM

    tok, samples = load_samples(chat_dir, sft_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    chosen = list(range(12))
    rows = RowDataset(samples, [[chosen[j] for j in row] for row in pack_rows(samples.lengths[chosen], 128, seed=0)])
    assert len(rows) < len(chosen)  # several samples share a row
    packed = collate_rows([rows[r] for r in range(len(rows))], pad_id=tok.pad_token_id, layout="packed")
    padded = collate_rows([[samples[i]] for i in chosen], pad_id=tok.pad_token_id, layout="padded")
    assert trained_tokens(packed["labels"]) == trained_tokens(padded["labels"]) > 0
    loss_a, grads_a = loss_and_grads(model, packed)
    loss_b, grads_b = loss_and_grads(model, padded)
    assert abs(loss_a - loss_b) < 1e-5, (loss_a, loss_b)
    worst = max(float((grads_a[n] - grads_b[n]).abs().max() / (grads_b[n].abs().max() + 1e-12)) for n in grads_b)
    assert worst < 1e-4, worst
    # and a wrong mask would show: attending across samples moves the loss by over 10x the tolerance
    # above (3.8e-4 with this briefly pretrained model; a model that attends more moves it further)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert abs(loss_and_grads(model, leaky)[0] - loss_b) > 1e-4


def test_full_sft_run(chat_dir, sft_model_dir, tmp_path):
    out = tmp_path / "full"
    summary = sft_main(sft_args(chat_dir, sft_model_dir, out, max_steps=30, logging_steps=5))
    losses = read_losses(out)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.5, losses  # it learns the short answers
    plan = json.loads((out / "plan.json").read_text())
    assert plan["packing"] is True and plan["batch_fill"] > 0.8 and plan["lora_r"] == 0
    assert summary["data"]["kept"] == 400 and summary["trainable_parameters"] == summary["parameters"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["trained_tokens_per_sec"] > 0 for r in lines if "loss" in r)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out / "final").chat_template
    assert "eval_loss" in summary and (out / "loss.png").is_file()


def test_default_learning_rates(chat_dir, sft_model_dir, tmp_path):
    import yaml

    def lr(out, **kw):
        sft_main(sft_args(chat_dir, sft_model_dir, out, max_steps=1, **kw))
        return yaml.safe_load((out / "resolved_config.yaml").read_text())["learning_rate"]

    assert lr(tmp_path / "a", learning_rate=None) == 2e-5
    assert lr(tmp_path / "b", learning_rate=None, lora_r=4) == 2e-4
    assert lr(tmp_path / "c", learning_rate=5e-4, lora_r=4) == 5e-4


def test_lora_checkpoint_holds_only_the_adapter_and_merge_equals_adapter(chat_dir, sft_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    summary = sft_main(sft_args(chat_dir, sft_model_dir, out, lora_r=4, merge_lora=True, save_steps=3, learning_rate=1e-2))
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 5
    with safe_open(str(out / "checkpoint-6" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_" in k or "trainable_tokens_delta" in k for k in keys)  # adapters + chat-token rows
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2, 0, 1, 90]])
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-5), (a - m).abs().max()
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something


@pytest.mark.parametrize("variant", [{"lora_r": 4}, {"packing": False}])
def test_resume_equals_uninterrupted(chat_dir, sft_model_dir, tmp_path, variant):
    reference = tmp_path / "reference"
    sft_main(sft_args(chat_dir, sft_model_dir, reference, save_steps=3, **variant))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    sft_main(sft_args(chat_dir, sft_model_dir, resumed, resume="auto", **variant))
    expected, again = read_losses(reference), read_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert max(abs(again[s] - expected[s]) for s in again) < 1e-6, (again, expected)


def test_resume_refuses_another_row_layout(chat_dir, sft_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sft_main(sft_args(chat_dir, sft_model_dir, out, save_steps=3, max_steps=3))
    with pytest.raises(SystemExit) as exit_info:
        sft_main(sft_args(chat_dir, sft_model_dir, out, resume="auto", packing=False))
    assert exit_info.value.code == 2
    assert "saved with packing True, this run uses False" in capsys.readouterr().err


def test_unpacked_batches_are_length_grouped(chat_dir, sft_model_dir):
    from trainers.data.collate import ResumableSampler
    from trainers.sft import LENGTH_GROUP

    _, samples = load_samples(chat_dir, sft_model_dir)
    rows = RowDataset(samples, [[i] for i in range(len(samples))])
    lengths = samples.lengths
    micro = 4

    def batches(world, rank, m):  # accumulation 1: the global batch is m x world = 2 x micro
        sampler = ResumableSampler(rows, world, rank, seed=0, global_batch=m * world, lengths=lengths,
                                   group_size=LENGTH_GROUP * m * world)
        order = list(sampler)
        return [order[i:i + m] for i in range(0, len(order) - m + 1, m)]

    one = batches(1, 0, 2 * micro)
    two = list(zip(batches(2, 0, micro), batches(2, 1, micro)))
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in two]  # the same global batches at any world size
    waste = np.mean([1 - lengths[b].mean() / lengths[b].max() for b in one])
    random_waste = np.mean([1 - lengths[b].mean() / lengths[b].max() for b in np.array_split(np.random.default_rng(0).permutation(len(lengths)), len(one))])
    assert waste < random_waste / 3, (waste, random_waste)


def _exits_2(capsys, argv, pattern):
    import re

    with pytest.raises(SystemExit) as exit_info:
        sft_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


def test_usage_errors(chat_dir, sft_model_dir, tokenizer_dir, tmp_path, capsys):
    args = lambda **kw: sft_args(chat_dir, sft_model_dir, tmp_path / "e", **kw)  # noqa: E731
    _exits_2(capsys, args(model_name_or_path=None), r"--model_name_or_path is required")
    _exits_2(capsys, args(merge_lora=True), r"--merge_lora needs LoRA \(--lora_r > 0\)")
    _exits_2(capsys, args(lora_r=4, lora_target_modules="nonexistent"), r"--lora_target_modules nonexistent: .*q_proj")
    _exits_2(capsys, args(max_seq_length=100000), r"--max_seq_length 100000 exceeds the \d+ positions")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    _exits_2(capsys, args(train_files=bad), r"no trainable sample \(1 x no_assistant_turn\)")
    _exits_2(capsys, args(train_files=bad, strict=True), rf"{bad}:1: .*\(no_assistant_turn\)")
    _exits_2(capsys, args(chat_format="alpaca"), r"no trainable sample \(400 x unknown_format\)")


def test_inspect_sft_marks_trained_spans_and_writes_ids_and_labels(chat_dir, sft_model_dir, tmp_path, capsys):
    from launch.cli import main as cli

    data = tmp_path / "chat.jsonl"
    data.write_text((chat_dir / "sft.jsonl").read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    common = ["--train_files", str(data), "--model_name_or_path", str(sft_model_dir), "--max_seq_length", "128"]
    assert cli(["inspect", "sft", *common, "--no-packing", "--output", str(tmp_path / "one.jsonl")]) == 0
    shown = capsys.readouterr().out
    assert "[[" in shown and "<|im_end|>]]" in shown and "skipped 1 x unknown_role" in shown and f"{data}:2" in shown
    lines = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    from trainers.data.chat import ChatRenderer

    tok = AutoTokenizer.from_pretrained(sft_model_dir)
    messages = json.loads(data.read_text().splitlines()[0])["messages"]
    expected = ChatRenderer(tok, ChatSettings(128)).encode_batch([messages])[0]
    assert lines == [{"input_ids": expected.input_ids.tolist(), "labels": expected.labels.tolist()}]

    assert cli(["inspect", "sft", *common, "--train_files", str(chat_dir / "sft.jsonl"), "--output", str(tmp_path / "rows.jsonl")]) == 0
    assert "packed rows of 128" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 128 for r in rows)
    assert sum(r["position_ids"].count(0) for r in rows) >= 400 - 5  # every kept sample starts a segment


def test_torch_compile_same_losses(chat_dir, sft_model_dir, tmp_path):
    """--torch_compile on packed rows, whose lengths change from batch to batch (dynamic shapes after
    the first recompile), with LoRA's adapters inside the compiled layers: eager's losses. LoRA
    without dropout: inductor draws its own dropout masks (same distribution, other samples)."""
    lora = {"lora_r": 4, "lora_dropout": 0}
    sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "eager", **lora))
    sft_main(sft_args(chat_dir, sft_model_dir, tmp_path / "compiled", torch_compile=True, **lora))
    eager, compiled = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == set(range(1, 7))
    assert max(abs(eager[s] - compiled[s]) for s in eager) < 1e-4, (eager, compiled)
    assert json.loads((tmp_path / "compiled" / "plan.json").read_text())["compiled_layers"] == 4  # the tiny base's layers
