"""The benchmark's training loops run (a few steps), so `make bench` cannot rot unnoticed."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import run as bench  # noqa: E402


def test_bench_loops_run(corpus, tokenizer_dir, tmp_path):
    bare = bench.bare_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    trainer = bench.hf_trainer_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    ours = bench.trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "run")
    assert bare > 0 and trainer > 0 and ours > 0


def test_flops_per_token_counts_matmul_weights_and_attention(tokenizer_dir):
    """6 x (every weight but the input embedding, plus the head) + 12 x layers x hidden x length,
    against the tiny preset's shape counted by hand."""
    import json

    from transformers import AutoTokenizer

    from trainers.models import padded_vocab_size

    shape = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    vocab = padded_vocab_size(AutoTokenizer.from_pretrained(tokenizer_dir))  # the model's rows: the tokenizer's, padded
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    flops = bench.flops_per_token("tiny", tokenizer_dir, 64)
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = hidden * (hidden + 2 * kv) + (hidden + 2 * kv) + hidden * hidden + 3 * hidden * shape["intermediate_size"] + 2 * hidden
    expected = layers * per_layer + hidden + vocab * hidden  # + final norm + head (tied or not, the head is a matmul)
    assert flops["matmul_weights"] == expected
    assert flops["attention"] == 12 * layers * hidden * 64
    assert flops["per_token"] == 6 * expected + flops["attention"]


def test_bench_sft_runs(corpus, tokenizer_dir, tmp_path):
    """Section (c) end to end on a handful of steps: base model, chat set, the three loops, the
    fills, then its JSON and the report rendered from it. Without the TRL rows (trl_variants=()),
    so `make test` needs no TRL; test_trl_sft_runs covers those where TRL is installed."""
    result = bench.bench_sft(corpus, tokenizer_dir, tmp_path, max_len=64, micro=2, steps=4, warmup=2, loss_steps=2,
                             samples=40, repeats=1, trl_variants=())
    chat = result["chat"]
    assert chat["samples"] == result["kept"] == 40 and result["truncated"] == 0
    assert 16 <= chat["min_tokens"] and chat["max_tokens"] <= 64 and chat["multi_turn"]
    for name in ("packed", "grouped", "pad_to_max"):
        run = result[name]
        assert run["trained_tok_s"] > 0 and run["tok_s"] >= run["trained_tok_s"] and run["loss"] > 0, name
        assert 0 < run["non_pad"] <= 1 and len(run["all"]) == 1, name
    assert result["pad_to_max"]["non_pad"] < result["grouped"]["non_pad"] and result["packed"]["samples_per_row"] > 1
    # trainrig's chat pipeline and the pad-to-max preprocess train the very same tokens
    assert result["trained_labels"]["trainrig"] == result["trained_labels"]["pad_to_max"] > 0

    bench.save_result(tmp_path / "results", "sft", {**dict.fromkeys(
        ("cpu", "gpu", "python", "torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers"), "-"),
        "date": "today", "cores": 2}, result)
    report = tmp_path / "RESULTS.md"
    report.write_text("# old\n\n## (a) Tokenize + pack, measured by hand-run script\n\n| a | table |\n")
    bench.write_report(report, bench.load_results(tmp_path / "results"))
    text = report.read_text()
    assert "## (c) SFT" in text and "Target non-pad >= 95% with packing: **" in text and "Measured today" in text
    assert "Carried over from the previous RESULTS.md" in text and "| a | table |" in text  # (a) had no JSON
    assert "TRL `SFTTrainer` rows skipped: not asked for" in text and "trained tokens in the 2 timed steps" in text
    assert json.loads((tmp_path / "results" / "sft.json").read_text())["packed"]["trained_tok_s"] > 0


def test_trl_sft_runs(corpus, tokenizer_dir, tmp_path):
    """bench/trl_sft.py: TRL's SFTTrainer, defaults and packing, 3 steps each on the bench's chat set
    and model, in their own processes; the labels are trainrig's (assistant-only) and the rows render."""
    import trl_sft
    from trainers.models import load_tokenizer

    model_dir = bench.make_sft_model(corpus, tokenizer_dir, tmp_path / "base", "tiny", tmp_path / "cache")
    chat = tmp_path / "chat.jsonl"
    bench.make_chat_set(chat, corpus, load_tokenizer(str(model_dir), False, "--model_name_or_path"), 24, 64, seed=5)
    trainrig_labels = bench.sft_data_stats(chat, load_tokenizer(str(model_dir), False, "--model_name_or_path"),
                                           tmp_path / "cache", 64, 0)["dataset_trained_tokens"]
    runs = {v: trl_sft.trl_sft_in_process(chat, model_dir, 64, 2, 3, 1, 2, 1e-3, 0, v) for v in ("defaults", "packing")}
    for variant, run in runs.items():
        assert run["trained_tok_s"] > 0 and run["tok_s"] >= run["trained_tok_s"] and run["loss"] > 0, variant
        assert run["trained_tokens"] > 0 and run["assistant_only_loss"], variant
        assert run["dataset_trained_tokens"] == trainrig_labels, variant  # the very same trained tokens as trainrig
    assert runs["packing"]["non_pad"] == 1.0 and runs["packing"]["samples_per_row"] > 1  # padding-free, packed rows
    assert runs["defaults"]["non_pad"] < 1.0 and runs["defaults"]["samples_per_row"] == 1.0

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
    text = "\n".join(bench.render_sft(result))
    assert "| TRL `SFTTrainer`, its defaults" in text and "| TRL `SFTTrainer`, `packing=True`" in text
    assert "Target >= 1.5x TRL `SFTTrainer` (defaults)'s trained tokens/s: **met** (1.60x; vs SFTTrainer packing: 1.10x)" in text
    assert "NOT at equal trained tokens" in text and "for all five" in text


def test_bench_memory_case_runs_and_renders(corpus, tokenizer_dir, tmp_path):
    """Section (d) on one tiny case: the run's plan estimate and its measured peak, then the report."""
    case = bench.measure_memory(("pretrain", "tiny", 64, 4, False, 0), corpus, tokenizer_dir, None, None,
                                tmp_path / "cache", tmp_path / "m")
    assert case["device"] == "cpu" and case["measured_gb"] > 0.3 and 0.3 < case["ratio"] < 3
    assert case["predicted_gb"] == case["terms"]["total"]  # on CPU the estimate includes the process's libraries
    text = "\n".join(bench.render_memory([case]))
    assert "## (d) Memory model vs. measured peak, cpu, fp32" in text and f"**{case['ratio']:.2f}**" in text


def test_chat_masking_pipelines_train_the_same_tokens(corpus, tokenizer_dir, tmp_path):
    """The data section's chat comparison: both pipelines run and label the very same tokens (the
    figure is void otherwise)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = tmp_path / "chat.jsonl"
    bench.make_chat_set(chat, corpus, tokenizer, 60, 128, seed=3)
    result = bench.bench_chat_masking(chat, tokenizer, 128, repeats=1, chunk=16)
    assert result["same_labels"] and result["trainrig"]["trained_tokens"] > 0
    assert result["trainrig"]["samples_s"] > 0 and result["hf_apply_chat_template"]["samples_s"] > 0
