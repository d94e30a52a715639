"""The reward model: pair records in every form, the pairwise loss against a hand computation,
accumulation that changes nothing, and training on a toy set to full pair accuracy (full and LoRA),
with final/ loading as a sequence classifier."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_losses, toy_pairs
from conftest import reward_args as stage_reward_args
from launch.reward import main as reward_main
from trainers.data.pairs import collate_pairs, encode_pairs, pair_messages
from trainers.errors import UsageError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pair_forms(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    plain = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    chosen, rejected = pair_messages(plain, "x:1")
    assert chosen == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}] and rejected[-1]["content"] == "5"
    assert pair_messages({"question": "2+2?", "chosen": "4", "rejected": "5", "system": "Be exact."}, "x:2")[0][0] == \
        {"role": "system", "content": "Be exact."}
    context = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    assert pair_messages({"messages": context, "chosen": "4", "rejected": "5"}, "x:3")[0] == context + [{"role": "assistant", "content": "4"}]
    trl = {"prompt": context, "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    assert pair_messages(trl, "x:4")[1][-1] == {"role": "assistant", "content": "5"}
    with pytest.raises(UsageError, match=r"x:5: a preference pair needs 'chosen' and 'rejected'"):
        pair_messages({"prompt": "q", "chosen": "a"}, "x:5")
    with pytest.raises(UsageError, match=r"x:6: 'rejected' must be a non-empty string"):
        pair_messages({"prompt": "q", "chosen": "a", "rejected": 3}, "x:6")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", [plain, {"prompt": "q", "chosen": "same", "rejected": "same"},
                                                  {"prompt": "q", "chosen": "word " * 200, "rejected": "no"}])
    pairs, stats = encode_pairs([str(data)], "--train_files", tokenizer, max_seq_length=64)
    assert (stats.read, stats.kept, stats.identical, stats.too_long) == (3, 1, 1, 1)
    assert tokenizer.decode(pairs[0][0]) == tokenizer.apply_chat_template(pair_messages(plain, "")[0], tokenize=False)


def test_collate_puts_chosen_first():
    batch = collate_pairs([{"chosen": [1, 2, 3], "rejected": [4], "index": 0}, {"chosen": [5], "rejected": [6, 7], "index": 1}], pad_id=0)
    assert batch["input_ids"][:, :3].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["input_ids"].shape[1] == 16 and not batch["input_ids"][:, 3:].any()  # padded to a 16-aligned length
    assert batch["attention_mask"].sum().item() == 7 and batch["pairs"] == 2


def reward_args(model_dir, data, out, **extra):
    """conftest's reward command line, trained long enough (30 steps of 8 pairs, constant lr) to reach full accuracy."""
    return stage_reward_args(data, model_dir, out, **{"per_device_train_batch_size": 8, "max_steps": 30, "validation_split_ratio": 0.1,
                                                      "lr_scheduler_type": "constant", "warmup_ratio": 0, **extra})


@pytest.mark.parametrize("mask_dtype", [None, torch.float32], ids=["transformers-mask", "shared-mask"])
def test_pairwise_loss_is_the_hand_computed_one(sft_model_dir, tokenizer_dir, tmp_path, mask_dtype):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.reward import pairwise_loss, rewards

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, _ = encode_pairs([str(toy_pairs(tmp_path / "p.jsonl", 4, seed=1))], "--train_files", tokenizer, 64)
    batch = collate_pairs([{"chosen": c, "rejected": r, "index": i} for i, (c, r) in enumerate(pairs)], tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(sft_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        r = rewards(model, batch, "cpu", mask_dtype)
        loss = pairwise_loss(model, batch, "cpu", torch.tensor(8.0), mask_dtype)
        by_hand = []
        for i, (c, rej) in enumerate(pairs):  # each conversation alone, unpadded: its last token's score
            rc = model(input_ids=torch.tensor([c])).logits.item()
            rr = model(input_ids=torch.tensor([rej])).logits.item()
            by_hand.append(-torch.nn.functional.logsigmoid(torch.tensor(rc - rr)).item())
            assert r[i].item() == pytest.approx(rc, abs=1e-5) and r[4 + i].item() == pytest.approx(rr, abs=1e-5)
    assert loss.item() == pytest.approx(sum(by_hand) / 8, rel=1e-5)


@pytest.mark.slow
def test_toy_set_reaches_full_pair_accuracy_and_accumulation_changes_nothing(sft_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = toy_pairs(tmp_path / "pairs.jsonl", 400, seed=0)
    summary = reward_main(reward_args(sft_model_dir, data, tmp_path / "full"))
    assert summary["eval_pairs"] == 40 and summary["eval_accuracy"] >= 0.95, summary
    losses = read_losses(tmp_path / "full")
    assert losses[30] < 0.5 * losses[1], losses  # log 2 = 0.69 at the start
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None

    accumulated = reward_main(reward_args(sft_model_dir, data, tmp_path / "acc", per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=5))
    reference = read_losses(tmp_path / "full")  # a constant learning rate: the first 5 steps of 30 are comparable
    got = read_losses(tmp_path / "acc")
    assert max(abs(got[s] - reference[s]) for s in got) < 1e-5, (got, {s: reference[s] for s in got})
    assert accumulated["step"] == 5


@pytest.mark.slow
def test_lora_reward_model_trains_the_head_and_loads(sft_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = toy_pairs(tmp_path / "pairs.jsonl", 400, seed=0)
    summary = reward_main(reward_args(sft_model_dir, data, tmp_path / "lora", lora_r=8, learning_rate=3e-3))
    assert summary["trainable_parameters"] < summary["parameters"] / 2 and summary["eval_accuracy"] >= 0.9, summary
    base = AutoModelForSequenceClassification.from_pretrained(sft_model_dir, num_labels=1)
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora" / "final")
    assert any("score" in n for n, _ in loaded.named_parameters())


def test_inspect_reward_writes_the_pairs_training_reads(sft_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from launch.inspect_data import main as inspect_main

    data = toy_pairs(tmp_path / "pairs.jsonl", 20, seed=2)
    stats = inspect_main(["reward", "--model_name_or_path", str(sft_model_dir), "--train_files", str(data),
                          "--max_seq_length", "64", "--num_samples", "1", "--output", str(tmp_path / "ids.jsonl")])
    assert stats == {"read": 20, "kept": 20, "too_long": 0, "identical": 0}
    lines = [json.loads(line) for line in (tmp_path / "ids.jsonl").read_text().splitlines()]
    pairs, _ = encode_pairs([str(data)], "--train_files", AutoTokenizer.from_pretrained(sft_model_dir), 64)
    assert [(line["chosen_input_ids"], line["rejected_input_ids"]) for line in lines] == [(list(c), list(r)) for c, r in pairs]
    assert "pair 0, rejected" in capsys.readouterr().out
