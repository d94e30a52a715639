"""The benchmark's training loops run (a few steps), so `make bench` cannot rot unnoticed."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from bench_common import flops_per_token, load_results, make_chat_set, make_sft_model, save_result  # noqa: E402
from bench_data import bench_chat_masking, bench_template_masking, render_data  # noqa: E402
from bench_memory import measure_memory, render_memory  # noqa: E402
from bench_pretrain import (  # noqa: E402
    bare_tokens_per_s_in_process,
    hf_trainer_compiled_tokens_per_s_in_process,
    hf_trainer_tokens_per_s_in_process,
    render_training,
    trainrig_tokens_per_s,
)
from bench_report import write_report  # noqa: E402
from bench_sft import (  # noqa: E402
    SFT_HELDOUT_SEED,
    bench_sft,
    chat_samples,
    heldout_examples,
    heldout_loss,
    render_sft,
    sft_data_stats,
)


def test_bench_loops_run(corpus, tokenizer_dir, tmp_path):
    bare = bare_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    trainer = hf_trainer_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    ours = trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "run")
    own = trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "own",
                                chunked_loss=False)
    compiled = trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "comp",
                                     torch_compile=True)
    trainer_compiled = hf_trainer_compiled_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1,
                                                                   0, 1e-3)
    assert bare > 0 and trainer > 0 and ours > 0 and own > 0 and compiled > 0 and trainer_compiled > 0
    assert '"compiled_layers": 4' in (tmp_path / "comp" / "plan.json").read_text()
    assert '"chunked_loss": true' in (tmp_path / "run" / "plan.json").read_text()
    assert '"chunked_loss": false' in (tmp_path / "own" / "plan.json").read_text()


def test_render_training_reports_each_loop_and_the_targets():
    rates = {"trainrig": 12100.0, "trainrig_compiled": 13200.0, "trainrig_own_loss": 10400.0, "hf_trainer": 10500.0,
             "hf_trainer_compiled": 11000.0, "bare": 10600.0}
    row = {"preset": "tiny", "block_size": 256, "micro_batch": 16, "steps": 60, "warmup": 10, "repeats": 3, "peak_flops": 1.0e11,
           **{f"{name}_tok_s": rate for name, rate in rates.items()},
           **{f"{name}_all": [round(rate)] * 3 for name, rate in rates.items()},
           "flops_per_token": {"per_token": 7.0e6, "matmul_weights": 0.9e6, "attention": 1.6e6},
           "mfu": {name: rate * 7.0e6 / 1.0e11 for name, rate in rates.items()}}
    slow = {**row, "preset": "small", "trainrig_tok_s": 10000.0, "trainrig_compiled_tok_s": 11600.0}
    text = "\n".join(render_training([row, slow]))
    assert "| tiny (256 x 16, 60 (10)) | trainrig (default: chunked loss) | 12,100 | 1.152x | 1.142x | 84.7% | [12100, 12100, 12100] |" in text
    assert "| tiny (256 x 16, 60 (10)) | HF `Trainer` `torch_compile=True` | 11,000 | 1.048x | 1.038x | 77.0% |" in text
    assert ("- tiny: default 1.152x the Trainer (met), 1.142x bare (met); `--torch_compile` 1.257x the Trainer (met), 1.245x bare "
            "(met); compiled against compiled, `--torch_compile` 1.200x the Trainer's `torch_compile=True`.") in text
    assert "- small: default 0.952x the Trainer (NOT met), 0.943x bare (NOT met); `--torch_compile` 1.105x the Trainer (met)" in text


def test_flops_per_token_counts_matmul_weights_and_attention(tokenizer_dir):
    """6 x (every weight but the input embedding, plus the head) + 12 x layers x hidden x length,
    against the tiny preset's shape counted by hand."""
    import json

    from transformers import AutoTokenizer

    from trainers.models import padded_vocab_size

    shape = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    vocab = padded_vocab_size(AutoTokenizer.from_pretrained(tokenizer_dir))  # the model's rows: the tokenizer's, padded
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    flops = flops_per_token("tiny", tokenizer_dir, 64)
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = hidden * (hidden + 2 * kv) + (hidden + 2 * kv) + hidden * hidden + 3 * hidden * shape["intermediate_size"] + 2 * hidden
    expected = layers * per_layer + hidden + vocab * hidden  # + final norm + head (tied or not, the head is a matmul)
    assert flops["matmul_weights"] == expected
    assert flops["attention"] == 12 * layers * hidden * 64
    assert flops["per_token"] == 6 * expected + flops["attention"]


def test_bench_sft_runs(corpus, tokenizer_dir, tmp_path):
    """Section (c) end to end on a handful of steps: base model, chat set, the three loops, the
    fills, the runs to equal trained tokens and their held-out losses, then its JSON and the report
    rendered from it. Without the TRL rows (trl_variants=()), so `make test` needs no TRL;
    test_trl_sft_runs covers those where TRL is installed."""
    import pytest

    from trainers.models import load_tokenizer

    # 100 samples of <= 128 tokens (2.5 to a packed row): a third of their trained tokens takes every
    # loop past the 4 timed steps (packed 8, pad-to-max 16)
    result = bench_sft(corpus, tokenizer_dir, tmp_path, max_len=128, micro=2, steps=4, warmup=2, loss_steps=2,
                       samples=100, repeats=1, trl_variants=(), heldout=20)
    chat = result["chat"]
    assert chat["samples"] == result["kept"] == 100 and result["truncated"] == 0
    assert 16 <= chat["min_tokens"] and chat["max_tokens"] <= 128 and chat["multi_turn"]
    for name in ("packed", "grouped", "pad_to_max"):
        run = result[name]
        assert run["trained_tok_s"] > 0 and run["tok_s"] >= run["trained_tok_s"] and run["loss"] > 0, name
        assert 0 < run["non_pad"] <= 1 and len(run["all"]) == 1, name
    assert result["pad_to_max"]["non_pad"] < result["grouped"]["non_pad"] and result["packed"]["samples_per_row"] > 1
    # trainrig's chat pipeline and the pad-to-max preprocess train the very same tokens
    assert result["trained_labels"]["trainrig"] == result["trained_labels"]["pad_to_max"] > 0

    # equal data: each loop stops at the first step by which it has trained T, so less than one
    # micro batch of trained tokens past it; trainrig's --max_steps comes from the replay of its data order
    equal = result["equal_tokens"]
    budget, loops = equal["budget"], equal["loops"]
    assert budget == round(result["trained_labels"]["trainrig"] / 3)
    for name, run in loops.items():
        assert budget <= run["tokens_reached"] < budget + 2 * 128 and run["steps_taken"] > result["steps"], name
        assert 0 < run["heldout_loss"] < equal["base_loss"], name  # every loop trains
    assert loops["packed"]["steps_taken"] < loops["pad_to_max"]["steps_taken"]  # packed rows: fewer, larger steps
    assert equal["within"] == (equal["worst_off"] <= equal["tolerance"])

    # one evaluator, one held-out set: the same model scores the same, another model differently, and
    # the held-out labels are trainrig's own, token for token
    tokenizer = load_tokenizer(str(tmp_path / "sft_base_tiny" / "final"), False, "--model_name_or_path")
    heldout = tmp_path / "sft_heldout.jsonl"
    examples = heldout_examples(heldout, tmp_path / "sft_chat.jsonl", tokenizer, 128)
    packed_model = tmp_path / "sft_packed_0" / "final"
    assert heldout_loss(packed_model, examples) == heldout_loss(packed_model, examples) == loops["packed"]["heldout_loss"]
    assert len({run["heldout_loss"] for run in loops.values()} | {equal["base_loss"]}) == 4
    samples = chat_samples(heldout, tokenizer, tmp_path / "sft_cache", 128)
    assert [(s["input_ids"].tolist(), s["labels"].tolist()) for s in (samples[i] for i in range(len(samples)))] == \
        [(ids.tolist(), labels.tolist()) for ids, labels in examples]
    assert equal["heldout_conversations"] == 20 and equal["heldout_trained_tokens"] == samples.meta["trained_tokens"]
    with pytest.raises(ValueError, match="also in the training set"):
        heldout_examples(tmp_path / "sft_chat.jsonl", tmp_path / "sft_chat.jsonl", tokenizer, 128)

    save_result(tmp_path / "results", "sft", {**dict.fromkeys(
        ("cpu", "gpu", "python", "torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers"), "-"),
        "date": "today", "cores": 2}, result)
    report = tmp_path / "RESULTS.md"
    report.write_text("# old\n\n## (a) Tokenize + pack, measured by hand-run script\n\n| a | table |\n")
    write_report(report, load_results(tmp_path / "results"))
    text = report.read_text()
    assert "## (c) SFT" in text and "Target non-pad >= 95% with packing: **" in text and "Measured today" in text
    assert "Carried over from the previous RESULTS.md" in text and "| a | table |" in text  # (a) had no JSON
    assert "TRL `SFTTrainer` rows skipped: not asked for" in text and "trained tokens in the 2 timed steps" in text
    assert f"### Held-out loss at equal trained tokens: T = {budget:,} (33% of the set's trained tokens)" in text
    assert f"| {loops['grouped']['steps_taken']:,} | {loops['grouped']['tokens_reached']:,} |" in text
    assert "with another seed, none of them in it" in text and ("**NOT every loop reached T" in text) != equal["within"]
    assert json.loads((tmp_path / "results" / "sft.json").read_text())["packed"]["trained_tok_s"] > 0


def test_trl_sft_runs(corpus, tokenizer_dir, tmp_path):
    """bench/trl_sft.py: TRL's SFTTrainer, defaults and packing, 3 timed steps each on the bench's chat
    set and model, in their own processes, then on to a token budget and a saved model that the
    held-out evaluator scores; the labels are trainrig's (assistant-only) and the rows render."""
    import trl_sft
    from trainers.models import load_tokenizer

    model_dir = make_sft_model(corpus, tokenizer_dir, tmp_path / "base", "tiny", tmp_path / "cache")
    tokenizer = load_tokenizer(str(model_dir), False, "--model_name_or_path")
    chat = tmp_path / "chat.jsonl"
    make_chat_set(chat, corpus, tokenizer, 24, 64, seed=5)
    trainrig_labels = sft_data_stats(chat, tokenizer, tmp_path / "cache", 64, 0)["dataset_trained_tokens"]
    budget = trainrig_labels // 2  # past the 3 timed steps for both (20-30 tokens a step)
    runs = {v: trl_sft.trl_sft_in_process(chat, model_dir, 64, 2, 3, 1, 2, 1e-3, 0, v, budget, tmp_path / f"trl_{v}")
            for v in ("defaults", "packing")}
    for variant, run in runs.items():
        assert run["trained_tok_s"] > 0 and run["tok_s"] >= run["trained_tok_s"] and run["loss"] > 0, variant
        assert run["trained_tokens"] > 0 and run["assistant_only_loss"], variant
        assert run["dataset_trained_tokens"] == trainrig_labels, variant  # the very same trained tokens as trainrig
        # stopped at the first step by which it trained the budget: less than one micro batch past it
        assert budget <= run["tokens_reached"] < budget + 2 * 64 and run["steps_taken"] > 3, variant
    assert runs["packing"]["non_pad"] == 1.0 and runs["packing"]["samples_per_row"] > 1  # padding-free, packed rows
    assert runs["defaults"]["non_pad"] < 1.0 and runs["defaults"]["samples_per_row"] == 1.0
    assert runs["packing"]["steps_taken"] < runs["defaults"]["steps_taken"]

    # the saved models load in the held-out evaluator, and both trained
    heldout = tmp_path / "heldout.jsonl"
    make_chat_set(heldout, corpus, tokenizer, 10, 64, seed=SFT_HELDOUT_SEED)
    examples = heldout_examples(heldout, chat, tokenizer, 64)
    base_loss = heldout_loss(model_dir, examples)
    heldout_losses = {v: heldout_loss(run["model"], examples) for v, run in runs.items()}
    assert all(0 < loss < base_loss for loss in heldout_losses.values()) and len(set(heldout_losses.values())) == 2

    # the rows in section (c), on a result with made-up figures for the other loops
    loop = {"trained_tok_s": 100.0, "tok_s": 200.0, "loss": 5.0, "trained_tokens": 50, "all": [100], "non_pad": 0.9,
            "samples_per_row": 1.0}
    result = {"preset": "tiny", "max_seq_length": 64, "micro_batch": 2, "steps": 3, "warmup": 1, "loss_steps": 2,
              "length_group": 64, "lr": 1e-3, "repeats": 1, "kept": 24, "truncated": 0,
              "chat": {"samples": 24, "multi_turn": 3, "mean_tokens": 30.0, "median_tokens": 30.0, "max_tokens": 60},
              "packed": {**loop, "trained_tok_s": 300.0, "trained_tokens": 150, "rows_used": 0.9, "samples_per_row": 2.0},
              "grouped": loop, "pad_to_max": loop, "trained_labels": {"trainrig": 1, "pad_to_max": 1},
              "ratio": 3.0, "grouped_ratio": 1.0, "targets": {"non_pad": False, "speedup": True},
              "trl_variants": ["defaults", "packing"], "trl_skipped": None, "trl_ratio": 1.6, "trl_defaults_ratio": 1.6,
              "trl_packing_ratio": 1.1}
    result["targets"]["trl_speedup"] = True
    for variant, run in runs.items():
        result[f"trl_{variant}"] = {**{k: run[k] for k in ("trained_tok_s", "tok_s", "loss", "trained_tokens", "non_pad",
                                                           "samples_per_row", "trl", "assistant_only_loss")},
                                    "all": [round(run["trained_tok_s"])]}
        result["trained_labels"][f"trl_{variant}"] = run["dataset_trained_tokens"]
    made_up = {"steps_taken": 20, "tokens_reached": budget + 10, "heldout_loss": 5.0}
    result["equal_tokens"] = {
        "share": 1 / 2, "budget": budget, "tolerance": 0.03, "worst_off": 0.05, "within": False, "base_loss": base_loss,
        "heldout_conversations": len(examples), "heldout_trained_tokens": 100,
        "loops": {**dict.fromkeys(("packed", "grouped", "pad_to_max"), made_up),
                  **{f"trl_{v}": {"steps_taken": run["steps_taken"], "tokens_reached": run["tokens_reached"],
                                  "heldout_loss": heldout_losses[v]} for v, run in runs.items()}}}
    text = "\n".join(render_sft(result))
    assert "| TRL `SFTTrainer`, its defaults" in text and "| TRL `SFTTrainer`, `packing=True`" in text
    assert "Target >= 1.5x TRL `SFTTrainer` (defaults)'s trained tokens/s: **met** (1.60x; vs SFTTrainer packing: 1.10x)" in text
    assert "loss column is at equal steps, not equal data" in text and "for all five" in text
    packing = runs["packing"]
    assert (f"padding-free: each micro batch flattened) | {packing['steps_taken']:,} | {packing['tokens_reached']:,} | "
            f"{packing['tokens_reached'] / budget - 1:+.1%} | **{heldout_losses['packing']:.3f}** |") in text
    assert "**NOT every loop reached T within 3%** (the worst is 5.0% off)" in text


def test_bench_memory_case_runs_and_renders(corpus, tokenizer_dir, tmp_path):
    """Section (d) on one tiny case: the run's plan estimate and its measured peak, then the report."""
    case = measure_memory(("pretrain", "tiny", 64, 4, False, 0), corpus, tokenizer_dir, None, None,
                          tmp_path / "cache", tmp_path / "m")
    assert case["device"] == "cpu" and case["measured_gb"] > 0.3 and 0.3 < case["ratio"] < 3
    assert case["predicted_gb"] == case["terms"]["total"]  # on CPU the estimate includes the process's libraries
    text = "\n".join(render_memory([case]))
    assert "## (d) Memory model vs. measured peak, cpu, fp32" in text and f"**{case['ratio']:.2f}**" in text


def test_chat_masking_pipelines_train_the_same_tokens(corpus, tokenizer_dir, tmp_path):
    """The data section's chat comparison: both pipelines run and label the very same tokens (the
    figure is void otherwise)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = tmp_path / "chat.jsonl"
    make_chat_set(chat, corpus, tokenizer, 60, 128, seed=3)
    result = bench_chat_masking(chat, tokenizer, 128, repeats=1, chunk=16)
    assert result["same_labels"] and result["trainrig"]["trained_tokens"] > 0
    assert result["trainrig"]["samples_s"] > 0 and result["hf_apply_chat_template"]["samples_s"] > 0
    templates = bench_template_masking(chat, tokenizer_dir, repeats=1, chunk=16)  # Qwen3 with reasoning and tools, Llama 3
    for case in ("qwen3_reasoning_tools", "llama3"):
        assert templates[case]["same_labels"] and templates[case]["trainrig"]["trained_tokens"] > 0, case
    row = {"s": 1.0, "tok_s": 1.0, "blocks": 1}  # section (a)'s packing rows, here only for the report to render
    data = {"block_size": 128, "repeats": 1, "tokens": 1, "templates": templates,
            **{k: row for k in ("trainrig", "run_clm_default", "run_clm_num_proc", "tokenizer_alone")}}
    text = "\n".join(render_data(data, {"cores": 2}))
    assert "### Model templates rendered by their own Jinja" in text and "DIFFERENT" not in text


def test_bench_qlora_runs_and_renders(corpus, tokenizer_dir, tmp_path):
    """Section (f) on the tiny preset, one repeat of 2 timed steps: trainrig's three bases and, where
    TRL is installed, SFTTrainer + PEFT with the same ones; the report renders its rows and targets."""
    from bench_qlora import QLORA_CASES, bench_qlora, render_qlora
    from trl_sft import trl_available

    result = bench_qlora(corpus, tokenizer_dir, tmp_path, preset="tiny", max_len=64, micro=2, steps=3, warmup=1, samples=24, repeats=1)
    assert [r["name"] for r in result["rows"]] == [c[0] for c in QLORA_CASES]
    for row in result["rows"]:
        t = row["trainrig"]
        assert t["trained_tok_s"] > 0 and t["peak_gb"] > 0.3 and 0.3 < t["predicted_gb"] / t["peak_gb"] < 3, row
        if trl_available():
            assert row["trl"]["trained_tok_s"] > 0 and row["trl"]["peak_gb"] > 0.3
            assert row["speed_ratio"] == t["trained_tok_s"] / row["trl"]["trained_tok_s"]
    assert result["rows"][1]["trainrig"]["predicted_gb"] < result["rows"][0]["trainrig"]["predicted_gb"]  # the 4-bit base is smaller
    text = "\n".join(render_qlora(result))
    assert "## (f) QLoRA on CPU" in text and "| QLoRA, NF4 base + 8-bit AdamW |" in text
    assert ("Targets, on the QLoRA rows" in text) == trl_available()


def test_bench_dpo_runs_and_renders(corpus, tokenizer_dir, tmp_path):
    """Section (g) on the tiny preset, one repeat of 2 timed steps: trainrig's DPO and, where TRL is
    installed, its DPOTrainer on the same pairs; the report renders both rows and the targets."""
    from bench_dpo import bench_dpo, render_dpo
    from trl_sft import trl_available

    result = bench_dpo(corpus, tokenizer_dir, tmp_path, preset="tiny", max_len=128, micro=2, steps=3, warmup=1, repeats=1, n_train=40)
    t = result["trainrig"]
    assert t["pairs_s"] > 0 and t["peak_gb"] > 0.3 and 0 <= t["eval_reward_accuracy"] <= 1 and t["reference_s"] > 0
    assert t["whole_pairs_s"] < t["pairs_s"] * 3 / 2  # the reference pass and the first step are counted in it
    if trl_available():
        assert result["trl"]["pairs_s"] > 0 and result["trl"]["peak_rss_gb"] > 0.3
        assert result["speed_ratio"] == t["pairs_s"] / result["trl"]["pairs_s"]
    text = "\n".join(render_dpo(result))
    assert "## (g) DPO on CPU" in text and "| trainrig `launch/dpo.py` |" in text
    assert ("Targets: >= 1.5x TRL's pairs/s" in text) == trl_available()
