"""bench/gpu.py, section (e): its whole pipeline on CPU (corpus, tokenizer, a real launch/pretrain.py
run, parsing, MFU, the report), the targets' wording, and the skip without a GPU."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from bench_common import flops_per_token, machine  # noqa: E402
from bench_gpu import FLASH_TOLERANCE, largest_running_micro, per_sample_logit_error, render_gpu, steady_tokens_per_s  # noqa: E402


def run_gpu_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_cpu_smoke_run_end_to_end(tmp_path):
    """`--device cpu`: a real tiny pretraining run at the planner's micro batch; every figure in
    gpu.json checked against the run's own files, and the rendered section shows those figures."""
    work, output = tmp_path / "work", tmp_path / "report" / "RESULTS.md"
    proc = run_gpu_script("--device", "cpu", "--presets", "tiny", "--steps", "3", "--warmup", "1", "--block_size", "16",
                          "--vocab_size", "1024", "--docs", "200", "--search_limit", "1.1", "--output", str(output),
                          "--workdir", str(work), "--qlora", "tiny", "--qlora_steps", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((output.parent / "results" / "gpu.json").read_text())
    assert output.is_file() and result["machine"]["date"] and result["device"]["name"] == "cpu"
    assert result["tokenizer"] == {**result["tokenizer"], "requested": 1024, "tokens": 1024, "rows": 1024}
    (r,) = result["runs"]
    assert "error" not in r and r["device"] == "cpu" and r["precision"] == "fp32"

    out = work / "run_tiny"
    plan = json.loads((out / "plan.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the micro batch is the planner's: auto resolved in plan.json, and what the run trained with
    assert r["micro_batch"] == plan["micro_batch_size"] > 1 and r["accumulation"] == plan["gradient_accumulation_steps"]
    assert [x["step"] for x in records] == [1, 2, 3]
    # tokens/s: steps 2-3 (the warmup window, step 1, left out); the trainer counts predicted tokens, 15 per 16-token block
    assert r["timed_tokens"] == records[-1]["tokens"] - records[0]["tokens"] == 2 * r["micro_batch"] * r["accumulation"] * 15
    rates = [x["tokens_per_sec"] for x in records[1:]]
    assert r["tok_s"] > 0 and min(rates) <= r["tok_s"] <= max(rates)
    # MFU = model FLOPs/token x tokens/s / the measured peak, FLOPs by bench/run.py's convention
    flops = flops_per_token("tiny", work / "tokenizer", 16)
    assert r["flops_per_token"] == flops and result["peak"]["flops"] > 0
    assert r["model_flops"] == pytest.approx(flops["per_token"] * r["tok_s"])
    assert r["mfu"] == pytest.approx(flops["per_token"] * r["tok_s"] / result["peak"]["flops"])
    # memory on CPU: the whole estimate against the peak RSS, as bench/run.py's section (d)
    assert r["predicted_gb"] == plan["memory_gb"]["total"]
    assert r["measured_gb"] == max(x["peak_memory_gb"] for x in records) > 0
    assert r["ratio"] == pytest.approx(r["predicted_gb"] / r["measured_gb"], abs=1e-3)

    # the search above the planned micro batch: real 2-step runs at the plan and 10% (at least 1) above it
    search = r["search"]
    assert search["tried"] == [f"{r['micro_batch']}: ran", f"{r['micro_batch'] + max(1, r['micro_batch'] // 10)}: ran"]
    assert search["largest_micro"] == r["micro_batch"] + max(1, r["micro_batch"] // 10)

    # the QLoRA run: a random-weight tiny model, 4-bit base, the planner's micro batch, its memory against the plan
    (q,) = result["qlora"]
    assert "error" not in q and q["base_bits"] == 4 and q["steps"] == 3 and q["tok_s"] > 0, q
    qplan = json.loads((work / "qlora_tiny" / "plan.json").read_text())
    assert q["micro_batch"] == qplan["micro_batch_size"] and q["predicted_gb"] == qplan["memory_gb"]["total"]
    assert not (work / "qlora_model_tiny").exists()  # the model is removed after its run
    assert "QLoRA SFT (`launch/sft.py --lora_r 16 --load_in_4bit" in output.read_text()
    assert search["planned_share"] == round(r["micro_batch"] / search["largest_micro"], 3)
    assert result["flash"] == {"skipped": "needs a CUDA GPU (the CPU tests check the flat layout with fake kernels)"}

    text = "\n".join(render_gpu(result))
    row = next(line for line in text.splitlines() if line.startswith("| cpu | tiny |"))
    for figure in (f"{r['micro_batch']} x 16", f"{r['tok_s']:,.0f}", f"{r['mfu']:.1%}", f"{r['predicted_gb']:.2f}",
                   f"{r['measured_gb']:.2f}", f"{r['ratio']:.3f}"):
        assert figure in row, figure
    assert text.startswith("## (e) GPU: fp32 pretraining, tiny") and "Smoke run on CPU" in text
    assert f"{result['peak']['flops'] / 1e12:,.1f} TFLOP/s" in text and "1,024 tokens" in text
    assert "## (e) GPU: fp32 pretraining, tiny" in proc.stdout


def hand_made(device: str, runs: list[dict]) -> dict:
    return {"machine": {"date": "today"}, "device": {"name": device, "driver": "550.54", "cuda": "12.8", "torch": "2.9.1",
                                                     "flash_attn": None},
            "peak": {"flops": 750e12, "dtype": "bf16", "n": 8192, "timings": 20, "per_timing": 10, "spec_flops": 989e12},
            "corpus": {"documents": 10000, "words": 3_600_000, "lexicon": 400_000, "bytes": 40_000_000},
            "tokenizer": {"requested": 151936, "tokens": 151936, "rows": 151936, "seconds": 20.0},
            "steps": 60, "warmup": 10, "block_size": 2048, "runs": runs}


def a_run(preset: str, mfu: float, ratio: float, device: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {"preset": preset, "device": device, "block_size": 2048, "micro_batch": 9, "accumulation": 1, "strategy": "single",
            "gradient_checkpointing": False, "precision": "bf16", "attn_implementation": "sdpa",
            "attn_reason": "flash-attn is not installed", "loss_reason": None, "plan_notes": [], "steps": 60,
            "timed_tokens": 50 * 9 * 2048, "tok_s": 90_000.0, "flops_per_token": {"matmul_weights": 494e6, "attention": 0.53e9,
                                                                                  "per_token": 3.49e9},
            "model_flops": mfu * 750e12, "mfu": mfu,
            "terms": {"parameters": 2.51, "gradients": 1.84, "optimizer_states": 3.68, "activations": 27.59, "logits": 31.3,
                      "overhead": 1.0, "total": 67.92}, "predicted_gb": 60.0, "measured_gb": 60.0 / ratio,
            "ratio": ratio, "mfu_spec": mfu * 750 / 989, "search": {"largest_micro": 10, "tried": ["9: ran", "10: ran", "11: out of memory"],
                                                                     "planned_share": 0.9}}


@pytest.mark.parametrize("mfu, verdict", [(0.40, "**met**"), (0.399, "**NOT met**"), (0.55, "**met**")])
def test_render_mfu_target_around_40_percent(mfu, verdict):
    lines = render_gpu(hand_made("NVIDIA H100 80GB HBM3", [a_run("125m", 0.2, 1.0), a_run("0.5b", mfu, 1.0)]))
    text = "\n".join(lines)
    assert lines[0] == "## (e) GPU: bf16 pretraining, 125M and 0.5B"
    assert f"Target MFU >= 40% for 0.5B on H100: {verdict} ({mfu:.1%})." in text
    half = next(line for line in lines if line.startswith("| NVIDIA H100 80GB HBM3 | 0.5B |"))
    assert f"| {mfu:.1%} {verdict} |" in half and "9 x 2048 (1)" in half and "90,000" in half
    small = next(line for line in lines if line.startswith("| NVIDIA H100 80GB HBM3 | 125M |"))
    assert "| 20.0% |" in small  # the target is for 0.5b only
    assert "0.5B 2.51 / 1.84 / 3.68 / 27.59 / 31.30 / 1.00" in text
    assert "Driver 550.54, CUDA 12.8" in text and "flash-attn not installed" in text and "151,936 embedding rows, as many" in text


@pytest.mark.parametrize("ratio, verdict", [(0.90, "**met**"), (1.10, "**met**"), (1.0, "**met**"),
                                            (0.899, "**NOT met**"), (1.101, "**NOT met**")])
def test_render_memory_target_within_10_percent(ratio, verdict):
    lines = render_gpu(hand_made("NVIDIA H100 80GB HBM3", [a_run("0.5b", 0.45, ratio)]))
    row = next(line for line in lines if line.startswith("| NVIDIA H100 80GB HBM3 | 0.5B |"))
    assert row.endswith(f"| {ratio:.3f} {verdict} |") and f"| {60.0 / ratio:.2f} |" in row
    assert f"Target memory prediction within +-10%: 0.5B {verdict} ({ratio:.3f})." in "\n".join(lines)


def test_render_other_gpus_and_failed_runs():
    """The MFU target is not judged off an H100; a failed run is a row saying why, and fails the memory target."""
    a100 = render_gpu(hand_made("NVIDIA A100-SXM4-80GB", [a_run("0.5b", 0.5, 1.0, "NVIDIA A100-SXM4-80GB")]))
    assert "not evaluated (the target is for an H100; this is NVIDIA A100-SXM4-80GB)." in "\n".join(a100)
    failed = render_gpu(hand_made("NVIDIA H100 80GB HBM3", [
        a_run("125m", 0.3, 1.0), {"preset": "0.5b", "block_size": 2048, "error": "torch.OutOfMemoryError: CUDA out of memory"}]))
    row = next(line for line in failed if "| 0.5B |" in line)
    header = next(line for line in failed if line.startswith("| device |"))
    assert "failed: torch.OutOfMemoryError: CUDA out of memory" in row and row.count("|") == header.count("|")
    text = "\n".join(failed)
    assert "Target MFU >= 40% for 0.5B on H100: **NOT met** (the 0.5b run failed)." in text
    assert "125M **met** (1.000); 0.5B **NOT met** (failed)." in text


def test_steady_tokens_per_s_is_tokens_over_seconds():
    """Windows after the first: 1000 tokens at 100/s (10 s) and 3000 at 300/s (10 s) are 4000 in 20 s."""
    records = [{"step": 10, "tokens": 500, "tokens_per_sec": 5.0}, {"step": 20, "tokens": 1500, "tokens_per_sec": 100.0},
               {"step": 20, "skipped_update": True}, {"step": 30, "tokens": 4500, "tokens_per_sec": 300.0}]
    assert steady_tokens_per_s(records) == (200.0, 4000)


def test_machine_without_deepspeed(monkeypatch):
    """The lent GPU image has no deepspeed: the machine line says so instead of the bench failing."""
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name):
        if name == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    info = machine()
    assert info["deepspeed"] == "not installed" and info["torch"] and info["transformers"] == real_version("transformers")


def test_no_cuda_skips_and_writes_nothing(tmp_path):
    output = tmp_path / "RESULTS.md"
    proc = run_gpu_script("--output", str(output), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["bench/gpu.py: no CUDA GPU is visible, so the GPU section (e) is skipped (nothing written)"]
    assert list(tmp_path.iterdir()) == []


def test_cpu_smoke_refuses_the_real_results():
    """--device cpu with the default --output would put CPU figures in bench/results/gpu.json."""
    proc = run_gpu_script("--device", "cpu")
    assert proc.returncode == 2 and "--device cpu is a smoke run" in proc.stderr and "pass --output" in proc.stderr


def test_largest_running_micro_steps_up_10_percent_until_out_of_memory():
    fits_up_to = 23
    tried = []

    def runs(micro):
        tried.append(micro)
        return micro <= fits_up_to, micro > fits_up_to, "torch.OutOfMemoryError" if micro > fits_up_to else ""

    assert largest_running_micro(16, runs) == (22, ["16: ran", "17: ran", "18: ran", "19: ran", "20: ran", "22: ran",
                                                    "24: out of memory"])
    assert largest_running_micro(4, lambda m: (True, False, ""), limit=2.0)[0] == 8  # stops at the limit
    with pytest.raises(RuntimeError, match="another reason than memory: ImportError"):
        largest_running_micro(4, lambda m: (False, False, "ImportError: x"))


def test_the_flash_check_tells_the_flat_layout_from_the_leaky_one(chat_dir, sft_model_dir, monkeypatch):
    """per_sample_logit_error with fake flash kernels in transformers' flash path (tests/fake_flash.py):
    rounding in the flat layout, a leak in the old [B, L] rows at micro 2."""
    import torch
    from transformers import AutoModelForCausalLM

    from fake_flash import fake_flash_attention
    from test_flash_attention import _rows
    from test_sft import load_samples

    _, samples = load_samples(chat_dir, sft_model_dir)
    rows = _rows(samples, 2)
    sdpa = AutoModelForCausalLM.from_pretrained(sft_model_dir, attn_implementation="sdpa").eval()
    with fake_flash_attention(monkeypatch):
        flash = AutoModelForCausalLM.from_pretrained(sft_model_dir, attn_implementation="flash_attention_2").eval()
        flat = per_sample_logit_error(flash, sdpa, rows, "flat", torch.device("cpu"))
        leaky = per_sample_logit_error(flash, sdpa, rows, "packed", torch.device("cpu"))
    assert flat < 1e-5 < FLASH_TOLERANCE < leaky


def test_render_the_search_the_spec_mfu_the_overhead_and_the_flash_check():
    run = {**a_run("0.5b", 0.45, 1.0), "allocated_gb": 58.2, "overhead_measured_gb": 1.8, "allocated_ratio": 1.013}
    result = {**hand_made("NVIDIA H100 80GB HBM3", [run]),
              "flash": {"rows": 100, "samples_per_row": 3.1, "flat_ok": True,
                        "errors": {"1": {"flat": 1e-3, "packed": 1e-3}, "2": {"flat": 2e-3, "packed": 0.4}}}}
    lines = render_gpu(result)
    text = "\n".join(lines)
    row = next(line for line in lines if line.startswith("| NVIDIA H100 80GB HBM3 | 0.5B |"))
    header = next(line for line in lines if line.startswith("| device |"))
    assert row.count("|") == header.count("|") and "| 34.1% |" in row and "9 / 10 = 90% **met**" in row
    assert "1.80 GiB measured for 1.00 assumed" in text and "989 TFLOP/s" in text
    assert "Target planned micro batch >= 90% of the largest that runs: 0.5B **met** (tried 9: ran, 10: ran, 11: out of memory)." in text
    assert "micro 2: flat 2.00e-03, old [B, L] rows 4.00e-01" in text and "Target flat <= 0.02: **met**" in text
    skipped = render_gpu({**result, "flash": {"skipped": "flash-attn is not installed"}})
    assert "skipped: flash-attn is not installed." in "\n".join(skipped)
