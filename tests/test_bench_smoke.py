"""The benchmark's training loops run (a few steps), so `make bench` cannot rot unnoticed."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import run as bench  # noqa: E402


def test_bench_loops_run(corpus, tokenizer_dir, tmp_path):
    bare = bench.bare_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    ours = bench.trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "run")
    assert bare > 0 and ours > 0


def test_bench_sft_runs(corpus, tokenizer_dir, tmp_path):
    """Section (c) end to end on a handful of steps: base model, chat set, the three loops, the
    fills, then its JSON and the report rendered from it."""
    result = bench.bench_sft(corpus, tokenizer_dir, tmp_path, max_len=64, micro=2, steps=4, warmup=2, loss_steps=2,
                             samples=40, repeats=1)
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
    assert json.loads((tmp_path / "results" / "sft.json").read_text())["packed"]["trained_tok_s"] > 0


def test_bench_memory_case_runs_and_renders(corpus, tokenizer_dir, tmp_path):
    """Section (d) on one tiny case: the run's plan estimate and its measured peak, then the report."""
    case = bench.measure_memory(("pretrain", "tiny", 64, 4, False, 0), corpus, tokenizer_dir, None, None,
                                tmp_path / "cache", tmp_path / "m")
    assert case["device"] == "cpu" and case["measured_gb"] > 0.3 and 0.3 < case["ratio"] < 3
    assert case["predicted_gb"] == case["terms"]["total"]  # on CPU the estimate includes the process's libraries
    text = "\n".join(bench.render_memory([case]))
    assert "## (d) Memory model vs. measured peak, cpu, fp32" in text and f"**{case['ratio']:.2f}**" in text
