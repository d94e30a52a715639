"""The benchmark's training loops run (a few steps), so `make bench` cannot rot unnoticed."""

import json
import sys

from conftest import REPO, pretrain_args

sys.path.insert(0, str(REPO / "bench"))
import run as bench  # noqa: E402


def test_bench_loops_run(corpus, tokenizer_dir, tmp_path):
    bare = bench.bare_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    ours = bench.trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "run")
    assert bare > 0 and ours > 0


def test_bench_sft_runs(corpus, tokenizer_dir, tmp_path):
    """Section (c) on a handful of steps: the chat set, the three loops, the fills and the report."""
    from launch.pretrain import main as pretrain
    from trainers.models import load_tokenizer

    pretrain(pretrain_args(corpus, tokenizer_dir, tmp_path / "base", max_steps=1))
    model_dir = tmp_path / "base" / "final"
    tokenizer = load_tokenizer(str(model_dir), False, "--model_name_or_path")
    chat = tmp_path / "chat.jsonl"
    stats = bench.make_chat_set(chat, corpus, tokenizer, 40, 64, seed=5)
    assert stats["samples"] == 40 and 16 <= stats["min_tokens"] and stats["max_tokens"] <= 64 and stats["multi_turn"]

    steps, warmup, loss_steps, cache = 4, 2, 2, tmp_path / "sft_cache"
    packed = bench.trainrig_sft(chat, model_dir, cache, 64, 2, steps, warmup, loss_steps, 1e-3, 0, tmp_path / "p", packing=True)
    grouped = bench.trainrig_sft(chat, model_dir, cache, 64, 2, steps, warmup, loss_steps, 1e-3, 0, tmp_path / "g", packing=False)
    bare = bench.bare_sft_in_process(chat, model_dir, 64, 2, steps, warmup, loss_steps, 1e-3, 0)
    for run in (packed, grouped, bare):
        assert run["trained_tok_s"] > 0 and run["tok_s"] >= run["trained_tok_s"] and run["loss"] > 0
    assert 0.5 < packed["row_fill"] <= 1 and 0 < bare["non_pad"] < 1
    # the same tokens are trained by trainrig's data pipeline and by the pad-to-max preprocess
    fill = bench.batch_fill(chat, tokenizer, cache, 64, 2, 0, packing=False)
    assert fill["dataset_trained_tokens"] == bare["dataset_trained_tokens"] and bare["non_pad"] < fill["batch_fill"] <= 1

    # the report renders from the section's JSON beside it
    result = {"preset": "tiny", "max_seq_length": 64, "micro_batch": 2, "steps": steps, "warmup": warmup,
              "loss_steps": loss_steps, "lr": 1e-3, "repeats": 1, "chat": stats, "kept": fill["kept"],
              "truncated": fill["truncated"], "ratio": 1.0, "grouped_ratio": 1.0,
              "targets": {"non_pad": True, "speedup": False},
              "trained_labels": {"trainrig": fill["dataset_trained_tokens"], "pad_to_max": bare["dataset_trained_tokens"]}}
    for name, run in (("packed", packed), ("grouped", grouped), ("pad_to_max", bare)):
        result[name] = {**run, "non_pad": 0.5, "batch_fill": 0.5, "samples_per_row": 1.0, "all": [1], "plan_row_fill": 0.5}
    machine = {key: "-" for key in ("cpu", "gpu", "python", "torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers")}
    bench.save_result(tmp_path / "results", "sft", {**machine, "date": "today", "cores": 2}, result)
    report = tmp_path / "RESULTS.md"
    bench.write_report(report, bench.load_results(tmp_path / "results"))
    text = report.read_text()
    assert "## (c) SFT" in text and "**met** (50.0%)" in text and "**NOT met**" in text and "## (a)" not in text
    assert json.loads((tmp_path / "results" / "sft.json").read_text())["machine"]["cores"]
