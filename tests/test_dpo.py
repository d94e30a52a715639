"""Preference optimisation (DPO and its relatives): the pair data and its masks, each loss against
TRL's trainers or the paper's formula, the chunked token log-probs, the reference computed once
(cached; equal to a resident reference), accumulation that changes nothing, LoRA's
adapter-disabled reference, and training that raises the held-out reward accuracy."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import dpo_args, read_losses
from launch.dpo import main as dpo_main
from trainers.data import IGNORE_INDEX
from trainers.data.pairs import PreferenceDataset, collate_preferences, encode_preferences
from trainers.errors import UsageError
from trainers.preference import Objective, PairLogps, batch_logps, compute_reference, pair_losses


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tokenizer_at(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("tokenizer_fixture", ["tokenizer_dir", "qwen_style_tokenizer_dir"])
def test_each_side_scores_exactly_its_answer_and_im_end(tokenizer_fixture, request, tmp_path):
    tokenizer = tokenizer_at(request.getfixturevalue(tokenizer_fixture))
    context = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " 2+2?\n"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": context, "chosen": [{"role": "assistant", "content": "It is 4 😀"}], "rejected": [{"role": "assistant", "content": "五"}]},
        {"question": "q", "system": "Be exact.", "chosen": "\n  code()", "rejected": "no"},
    ])
    pairs, stats = encode_preferences([str(data)], "--train_files", tokenizer, max_seq_length=256)
    assert (stats.read, stats.kept, stats.truncated) == (2, 2, 0)
    for pair, (messages, answers) in zip(pairs, [(context, ("It is 4 😀", "五")),
                                                 ([{"role": "system", "content": "Be exact."}, {"role": "user", "content": "q"}], ("\n  code()", "no"))]):
        for ids, labels, answer in ((pair.chosen, pair.chosen_labels, answers[0]), (pair.rejected, pair.rejected_labels, answers[1])):
            conversation = messages + [{"role": "assistant", "content": answer}]
            template = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
            assert ids.tolist() == template[:len(ids)] and template[len(ids):] == tokenizer("\n", add_special_tokens=False)["input_ids"]
            scored = labels != IGNORE_INDEX
            first = int(np.argmax(scored))
            assert scored[first:].all() and not scored[:first].any()  # one run, to the end: the answer and its <|im_end|>
            assert tokenizer.decode(ids[first:].tolist()).endswith("<|im_end|>")
            assert tokenizer.decode(ids[first:-1].tolist()) in (answer, answer.lstrip("\n"))  # the header's "\n" may merge into it
            assert (labels[scored] == ids[scored]).all()


def test_long_pairs_lose_their_earliest_turns_then_are_skipped_with_their_place(tokenizer_dir, tmp_path):
    tokenizer = tokenizer_at(tokenizer_dir)
    long_turn = "many words here " * 12
    context = [{"role": "system", "content": "S"}, {"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn},
               {"role": "user", "content": "last question"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": context, "chosen": "yes", "rejected": "no"},
        {"prompt": "short", "chosen": long_turn * 3, "rejected": "no"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "forged <|im_end|> end", "rejected": "no"},
        {"prompt": "q", "chosen": "fine", "rejected": "also fine"},
    ])
    pairs, stats = encode_preferences([str(data)], "--train_files", tokenizer, max_seq_length=48)
    assert (stats.read, stats.kept, stats.truncated) == (5, 2, 1)
    assert dict(stats.skipped) == {"too_long": 1, "identical_answers": 1, "special_token_in_content": 1}
    places = {e["reason"]: e["where"] for e in stats.examples}
    assert places["too_long"].endswith("pairs.jsonl:2") and places["identical_answers"].endswith(":3")
    kept = pairs[0]
    assert kept.dropped_turns == 2 and len(kept.chosen) <= 48
    text = tokenizer.decode(kept.chosen.tolist())
    assert text.startswith("<|im_start|>system\nS<|im_end|>") and "many words" not in text and "last question" in text
    with pytest.raises(UsageError, match=r"bad.jsonl:1: a preference pair needs 'chosen' and 'rejected'"):
        encode_preferences([str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}]))], "--train_files", tokenizer, 48)


def test_collate_puts_chosen_first_with_labels_and_reference():
    pairs = [{"chosen": np.array([1, 2, 3]), "chosen_labels": np.array([-100, 2, 3]), "rejected": np.array([1, 4]),
              "rejected_labels": np.array([-100, 4]), "index": 7, "reference": np.array([-1.5, -2.5])},
             {"chosen": np.array([5, 6]), "chosen_labels": np.array([-100, 6]), "rejected": np.array([5, 8, 9, 9]),
              "rejected_labels": np.array([-100, -100, 9, 9]), "index": 2, "reference": np.array([-3.0, -4.0])}]
    batch = collate_preferences(pairs, pad_id=0)
    assert batch["input_ids"][:, :4].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 8, 9, 9]]
    assert batch["labels"][:, :4].tolist() == [[-100, 2, 3, -100], [-100, 6, -100, -100], [-100, 4, -100, -100], [-100, -100, 9, 9]]
    assert batch["input_ids"].shape[1] == 16 and batch["pairs"] == 2 and batch["sample_ids"].tolist() == [7, 2]
    assert batch["reference"].tolist() == [-1.5, -3.0, -2.5, -4.0]


# ---------------------------------------------------------------------- losses and log-probs


def test_chunked_token_logps_equal_the_log_softmax_and_its_gradients():
    from trainers.chunked_loss import linear_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = IGNORE_INDEX
    upstream = torch.randn(37)
    ours = linear_token_logps(hidden, weight, labels, rows=8)  # 5 chunks, the last one short
    (ours * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.log_softmax(F.linear(hidden, weight), -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * (labels != IGNORE_INDEX)
    (reference * upstream).sum().backward()
    assert torch.allclose(ours, reference, atol=1e-5) and (ours[::5] == 0).all()
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_label_smoothing_and_the_closed_forms():
    delta = torch.tensor([0.3, -1.2])
    policy = PairLogps(torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -3.0]), torch.tensor([4.0, 3.0]), torch.tensor([2.0, 6.0]))
    reference = (policy.chosen - torch.tensor([0.1, 0.2]), policy.rejected - torch.tensor([0.4, -1.4]))
    loss, chosen, rejected = pair_losses(Objective("sigmoid", 0.5, label_smoothing=0.2), policy, reference)
    delta = torch.tensor([0.1 - 0.4, 0.2 + 1.4])
    expected = -0.8 * torch.log(torch.sigmoid(0.5 * delta)) - 0.2 * torch.log(torch.sigmoid(-0.5 * delta))  # cDPO
    assert torch.allclose(loss, expected) and torch.allclose(chosen, torch.tensor([0.05, 0.1]))
    loss, _, _ = pair_losses(Objective("hinge", 0.5), policy, reference)
    assert torch.allclose(loss, torch.relu(1 - 0.5 * delta))
    loss, chosen, rejected = pair_losses(Objective("ipo", 0.5), policy, reference)
    assert torch.allclose(loss, (torch.tensor([0.1 / 4 - 0.4 / 2, 0.2 / 3 + 1.4 / 6]) - 1.0) ** 2)
    assert torch.allclose(chosen, 0.5 * torch.tensor([0.1 / 4, 0.2 / 3])) and torch.allclose(rejected, 0.5 * torch.tensor([0.4 / 2, -1.4 / 6]))
    loss, chosen, _ = pair_losses(Objective("orpo", 0.25), policy, None)
    a_c, a_r = torch.tensor([-1.0, -2.0]), torch.tensor([-2.5, -0.5])
    odds = lambda a: a - torch.log1p(-torch.exp(a))  # noqa: E731  log(p / (1 - p)) of p = exp(a)
    assert torch.allclose(loss, -a_c - 0.25 * F.logsigmoid(odds(a_c) - odds(a_r))) and torch.allclose(chosen, 0.25 * a_c)
    # a memorised answer (average log-prob 0 in fp32) keeps ORPO's loss and gradient finite
    avg = torch.tensor([0.0, -1e-8, -0.3, -5.0], requires_grad=True)
    loss, _, _ = pair_losses(Objective("orpo", 0.25), PairLogps(avg, torch.full((4,), -2.0), torch.ones(4), torch.ones(4)), None)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(avg.grad).all()
    with pytest.raises(UsageError, match="--label_smoothing 0.1 is defined for --loss_type sigmoid or simpo, not ipo"):
        from trainers.preference import objective_from

        objective_from(SimpleNamespace(loss_type="ipo", beta=0.1, label_smoothing=0.1, simpo_gamma=0.5))


@pytest.fixture(scope="module")
def two_models(sft_model_dir):
    """The SFT model (the reference) and a perturbed copy of it (a policy that has moved)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=generator))
    return policy.train(), reference


@pytest.fixture(scope="module")
def few_pairs(preference_pairs, tokenizer_dir):
    pairs, _ = encode_preferences([str(preference_pairs)], "--train_files", tokenizer_at(tokenizer_dir), max_seq_length=64)
    return pairs[:6]


def trl_examples(pairs):
    """Our pairs in TRL's tokenized form: the prompt, and each completion (answer + <|im_end|>)."""
    examples = []
    for p in pairs:
        start_c, start_r = (int(np.argmax(labels != IGNORE_INDEX)) for labels in (p.chosen_labels, p.rejected_labels))
        assert start_c == start_r and (p.chosen[:start_c] == p.rejected[:start_r]).all()
        examples.append({"prompt_ids": p.chosen[:start_c].tolist(), "chosen_ids": p.chosen[start_c:].tolist(),
                         "rejected_ids": p.rejected[start_r:].tolist()})
    return examples


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-head", "full-logits"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_family_equals_trl_dpo_trainer(loss_type, chunked, two_models, few_pairs, tokenizer_dir, sft_model_dir, tmp_path):
    """The loss of a batch and each sequence's log-probs, for a policy that has moved away from its
    reference, against TRL 1.x's DPOTrainer on the same tokens (fp32, CPU)."""
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trainers.chunked_loss import use_chunked_loss

    policy, reference = two_models
    ours_policy, ours_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    if chunked:
        assert use_chunked_loss(ours_policy, True)[0] and use_chunked_loss(ours_reference, True)[0]
    beta = 0.3
    examples = trl_examples(few_pairs)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], per_device_train_batch_size=len(examples),
                     report_to="none", use_cpu=True, bf16=False, max_length=None, precompute_ref_log_probs=False)
    # the trainer is built on a one-pair text set (it tokenizes what it is given); our tokens go through its collator
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer_at(tokenizer_dir),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    per_pair = []
    for example in examples:
        trainer._metrics["train"].clear()
        trainer.compute_loss(trainer.model, trainer.data_collator([example]))
        per_pair.append((trainer._metrics["train"]["logps/chosen"][-1], trainer._metrics["train"]["logps/rejected"][-1]))
    theirs = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))

    batch = collate_preferences([PreferenceDataset(few_pairs, np.arange(len(few_pairs)))[i] for i in range(len(few_pairs))], pad_id=0)
    logps = batch_logps(ours_policy, batch, "cpu", None, chunked)
    with torch.no_grad():
        ref = batch_logps(ours_reference, batch, "cpu", None, chunked)
    ours, _, _ = pair_losses(Objective(loss_type, beta), logps, (ref.chosen, ref.rejected))
    # log-probs summed over ~100 tokens, ~-150: one fp32 ulp there is 1.5e-5, and TRL 1.16 lands one ulp
    # off ours (another summation order); a token missed or masked wrongly moves them by 1 or more
    assert torch.allclose(torch.stack([logps.chosen, logps.rejected], 1).detach(), torch.tensor(per_pair), atol=0, rtol=1e-6)
    assert abs(float(ours.mean()) - theirs) < 1e-5


def test_simpo_and_orpo_equal_trl_cpo_and_orpo_trainers(two_models, few_pairs):
    """SimPO against TRL's CPOTrainer.cpo_loss (loss_type simpo), ORPO's odds-ratio term against
    ORPOTrainer.odds_ratio_loss, both on average log-probs equal to their get_batch_logps(average_log_prob=True);
    ORPO's NLL is the paper's, the mean over each chosen answer's tokens (TRL's ORPOTrainer also counts the prompt's)."""
    import copy

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from trainers.chunked_loss import use_chunked_loss

    policy, _ = two_models
    chunked = copy.deepcopy(policy)
    use_chunked_loss(chunked, True)
    batch = collate_preferences([PreferenceDataset(few_pairs, np.arange(len(few_pairs)))[i] for i in range(len(few_pairs))], pad_id=0)
    logps = batch_logps(chunked, batch, "cpu", None, chunked=True)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs_avg = CPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True)
    n = batch["pairs"]
    ours_avg = torch.cat([logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens]).detach()
    assert torch.allclose(ours_avg, theirs_avg, atol=1e-5, rtol=0)
    assert torch.allclose(ours_avg, ORPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True), atol=1e-5, rtol=0)

    cpu = SimpleNamespace(device="cpu")
    simpo = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.1, accelerator=cpu)
    expected, expected_chosen, _ = CPOTrainer.cpo_loss(simpo, theirs_avg[:n], theirs_avg[n:])
    ours, chosen, _ = pair_losses(Objective("simpo", 2.0, label_smoothing=0.1, simpo_gamma=0.8), logps, None)
    assert torch.allclose(ours.detach(), expected, atol=1e-5) and torch.allclose(chosen, expected_chosen, atol=1e-5)

    orpo = SimpleNamespace(beta=0.25, accelerator=cpu)
    ratio_terms, expected_chosen, *_ = ORPOTrainer.odds_ratio_loss(orpo, theirs_avg[:n], theirs_avg[n:])
    ours, chosen, _ = pair_losses(Objective("orpo", 0.25), logps, None)
    nll = -theirs_avg[:n]  # the paper's L_SFT: each chosen answer's mean token NLL
    assert abs(float(ours.mean()) - float(nll.mean() - ratio_terms.mean())) < 1e-5
    assert torch.allclose(chosen, expected_chosen, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_first_step_loss_of_a_run(loss_type, preference_pairs, sft_model_dir, tokenizer_dir, tmp_path):
    """A one-step run's loss is the loss above of the pairs it drew (--record_sample_ids), under
    the SFT model it starts from: for the DPO family the policy is still its reference, so the
    loss is the closed form at a zero margin (DPO: log 2, hinge: 1, IPO: (1 / (2 beta))^2)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = dpo_main(dpo_args(preference_pairs, sft_model_dir, out, loss_type=loss_type, beta=0.5, max_steps=1,
                                record_sample_ids=True, validation_split_ratio=0))
    ids = json.loads((out / "sample_ids.rank0.jsonl").read_text().splitlines()[0])["ids"]
    pairs, _ = encode_preferences([str(preference_pairs)], "--train_files", tokenizer_at(tokenizer_dir), max_seq_length=64)
    batch = collate_preferences([PreferenceDataset(pairs, np.array(ids))[i] for i in range(len(ids))], pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = batch_logps(model, batch, "cpu", None, chunked=False)
    expected, _, _ = pair_losses(Objective(loss_type, 0.5), logps, (logps.chosen, logps.rejected))
    assert abs(summary["loss"] - float(expected.mean())) < 1e-5
    closed_form = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1.0}
    if loss_type in closed_form:
        assert abs(summary["loss"] - closed_form[loss_type]) < 1e-6


# ---------------------------------------------------------------------------- the reference


class OneProcess:
    """The collectives compute_reference and RewardTotals need, for one process."""

    device, world_size, rank, is_main = torch.device("cpu"), 1, 0, True

    def gather_objects(self, items):
        return list(items)

    def all_reduce_sum(self, values):
        return list(values)


def test_the_precomputed_reference_equals_a_resident_reference(sft_model_dir, few_pairs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32)
    dataset = PreferenceDataset(few_pairs, np.arange(len(few_pairs)))
    collate = lambda items: collate_preferences(items, pad_id=0)  # noqa: E731
    table = compute_reference(OneProcess(), model, dataset, 4, collate, None, chunked=False)  # batches of 4 and 2 pairs
    assert model.training  # handed back in training mode
    resident = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32).eval()
    for i in range(len(few_pairs)):  # one pair at a time: no padding at all
        with torch.no_grad():
            logps = batch_logps(resident, collate([dataset[i]]), "cpu", None, chunked=False)
        assert abs(table[i, 0] - float(logps.chosen)) < 1e-5 and abs(table[i, 1] - float(logps.rejected)) < 1e-5


def test_the_reference_is_cached_and_accumulation_changes_nothing(preference_pairs, sft_model_dir, tmp_path):
    first = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "a"))
    again = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert first["reference"]["train"]["cached"] is False and again["reference"]["train"]["cached"] is True
    assert first["reference"]["train"]["cache"] == again["reference"]["train"]["cache"]
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 for s in a)
    other = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "c", max_seq_length=48, max_steps=1))
    assert other["reference"]["train"]["cached"] is False  # other pairs (shorter rows): another key


def test_training_raises_the_held_out_reward_accuracy_and_writes_the_figures(preference_pairs, sft_model_dir, tmp_path):
    from trainers.tracking import read_metrics

    out = tmp_path / "dpo"
    summary = dpo_main(dpo_args(preference_pairs, sft_model_dir, out, max_steps=12, eval_steps=4, validation_split_ratio=0.1,
                                learning_rate=5e-4, lr_scheduler_type="constant"))
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "rewards/accuracy" in r]
    evals = [r for r in records if "eval_rewards/accuracy" in r]
    assert len(train) == 12 and all(set(r) >= {"rewards/chosen", "rewards/rejected", "rewards/margin"} for r in train)
    assert [r["step"] for r in evals] == [4, 8, 12] and evals[-1]["eval_pairs"] == 20
    assert train[0]["rewards/margin"] == 0.0  # the first step's policy is its reference
    assert summary["eval_rewards/accuracy"] >= 0.9 and summary["eval_rewards/margin"] > 0 and summary["loss"] < math.log(2)
    assert 0 <= summary["reference"]["eval_logps/accuracy"] <= summary["eval_logps/accuracy"] <= 1  # the policy prefers chosen more often
    assert (out / "loss.png").stat().st_size > 0 and (out / "final" / "model.safetensors").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["loss_type"] == "sigmoid" and plan["reference"] == "precomputed"


def test_lora_reference_with_the_adapter_disabled_equals_the_precomputed_one(preference_pairs, sft_model_dir, tmp_path):
    common = {"lora_r": 8, "max_steps": 4, "learning_rate": 1e-3}
    precomputed = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "pre", **common))
    live = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "live", reference="adapter_disabled", **common))
    assert live["reference"] == {"source": "adapter_disabled"} and precomputed["reference"]["source"] == "precomputed"
    a, b = read_losses(tmp_path / "pre"), read_losses(tmp_path / "live")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a) and a[4] < a[1]
    assert (tmp_path / "live" / "final" / "adapter_model.safetensors").is_file()


def test_a_lora_adapter_directory_is_refused_naming_final_merged(preference_pairs, sft_model_dir, tmp_path, capsys):
    adapter = tmp_path / "sft" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        dpo_main(dpo_args(preference_pairs, adapter, tmp_path / "x"))
    assert exit_info.value.code == 2 and "a LoRA adapter, not a whole model; pass the run's final/merged" in capsys.readouterr().err


def test_reward_totals_leave_out_non_finite_pairs():
    from trainers.preference import RewardTotals

    totals = RewardTotals(torch.device("cpu"))
    totals.add(torch.tensor([1.0, float("nan"), 0.5]), torch.tensor([0.0, 0.0, 1.0]))
    assert totals.take(OneProcess()) == {"rewards/chosen": 0.75, "rewards/rejected": 0.5, "rewards/accuracy": 0.5, "rewards/margin": 0.25}


def test_qlora_dpo_trains(preference_pairs, sft_model_dir, tmp_path):
    summary = dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "q", lora_r=8, load_in_4bit=True, max_steps=4,
                                learning_rate=1e-3, merge_lora=True))
    assert math.isfinite(summary["loss"]) and summary["trainable_parameters"] < summary["parameters"] / 5
    assert json.loads((tmp_path / "q" / "plan.json").read_text())["base_bits"] == 4
    assert (tmp_path / "q" / "final" / "merged" / "config.json").is_file()


@pytest.mark.parametrize("flags, message", [
    ({"reference": "adapter_disabled"}, "--reference adapter_disabled takes the reference from the policy with its LoRA adapter off: it needs --lora_r > 0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "--label_smoothing 0.1 is defined for --loss_type sigmoid or simpo, not hinge"),
    ({"beta": 0}, "--beta 0.0 must be above 0"),
])
def test_bad_settings_exit_2_naming_the_flag(flags, message, preference_pairs, sft_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo_main(dpo_args(preference_pairs, sft_model_dir, tmp_path / "x", **flags))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_inspect_dpo_marks_the_scored_answer_and_writes_what_training_reads(sft_model_dir, tokenizer_dir, tmp_path, capsys):
    from launch.inspect_data import main as inspect_main

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is 5."},
                                                  {"prompt": "q", "chosen": "same", "rejected": "same"}])
    out = tmp_path / "pairs_ids.jsonl"
    stats = inspect_main(["dpo", "--model_name_or_path", str(sft_model_dir), "--train_files", str(data), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "[[It is 4.<|im_end|>]]" in printed and "[[It is 5.<|im_end|>]]" in printed  # only the answers are scored
    assert "skipped 1 x identical_answers" in printed and stats["kept"] == 1
    line = json.loads(out.read_text().splitlines()[0])
    pairs, _ = encode_preferences([str(data)], "--train_files", tokenizer_at(tokenizer_dir), 2048)
    assert line["chosen_input_ids"] == pairs[0].chosen.tolist() and line["rejected_labels"] == pairs[0].rejected_labels.tolist()
