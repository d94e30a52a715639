"""(e) GPU, the section's code (bench/gpu.py is its command line and says what it measures): the
corpus's tokenizer, the `launch/pretrain.py` runs at the planner's micro batch and the search above
it, their figures (tokens/s, MFU, memory against the plan), FlashAttention against SDPA on packed
SFT rows, the device's matmul peak; and the section's rendering for RESULTS.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench_common import REPO, flops_per_token, make_chat_set, matmul_peak_flops, run_quietly

QWEN_VOCAB_ROWS = 151_936  # Qwen2.5-0.5B's embedding rows; such a head is 23% of 0.5b's FLOPs/token at block 2048, 51% of 125m's
MFU_TARGET = 0.40  # for 0.5b on an H100 (the target)
MEMORY_BAND = (0.90, 1.10)  # predicted / measured peak: within +-10%
MEMORY_TERMS = ("parameters", "gradients", "optimizer_states", "activations", "logits", "overhead")  # plan.json memory_gb
GPU_MATMUL = (8192, 20, 10)  # (n, timings, products per timing): one bf16 8192^3 product is 1.1 TFLOP, ~1.5 ms on an H100
CPU_MATMUL = (1024, 10)  # (n, timings) for the smoke run's fp32 peak: under a second on 2 cores


# ------------------------------------------------------------------------- the corpus's tokenizer


def make_tokenizer(corpus: Path, vocab_size: int, out: Path) -> dict:
    """tokenizer/train.py's byte-level BPE on the corpus; its size as trained and as the model's rows."""
    from trainers.tokenizer import main as train_tokenizer
    from trainers.models import load_tokenizer, padded_vocab_size

    stats = train_tokenizer(["--train_files", str(corpus), "--vocab_size", str(vocab_size), "--output_dir", str(out)])
    tokenizer = load_tokenizer(str(out), False, "--tokenizer_name_or_path")
    return {"requested": vocab_size, "tokens": len(tokenizer), "rows": padded_vocab_size(tokenizer), "seconds": stats["seconds"]}


# ------------------------------------------------------------------------------- one training run


def pretrain_command(preset: str, corpus: Path, tokenizer_dir: Path, work: Path, block_size: int, steps: int, logging: int,
                     precision: str, out: Path, batch: list[str], save_final: bool = False) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), "--train_files", str(corpus),
            "--tokenizer_name_or_path", str(tokenizer_dir), "--model_preset", preset, "--block_size", str(block_size),
            *batch, "--precision", precision, "--max_steps", str(steps), "--logging_steps", str(logging),
            "--output_dir", str(out), "--resume", "never", "--save_final" if save_final else "--no-save_final", "--save_steps", "0",
            "--validation_split_ratio", "0", "--data_cache_dir", str(work / "blocks")]


def run_pretrain(preset: str, corpus: Path, tokenizer_dir: Path, work: Path, block_size: int, steps: int, warmup: int,
                 precision: str, save_final: bool = False) -> Path:
    """`python launch/pretrain.py` with the planner's micro batch, logging every `warmup` steps; its output dir
    (with final/ when `save_final`: the model the FlashAttention check loads)."""
    out = work / f"run_{preset}"
    run_quietly(pretrain_command(preset, corpus, tokenizer_dir, work, block_size, steps, warmup, precision, out,
                                 ["--per_device_train_batch_size", "auto"], save_final))
    return out


# ------------------------------------------------------- the planner's micro batch against the largest


SEARCH_STEP = 0.10  # micro batches tried above the plan: +10% each (at least +1), so "largest" is within 10%
SEARCH_LIMIT = 2.0  # ... up to twice the planned one
PLANNED_SHARE_TARGET = 0.90  # the planned micro batch >= 90% of the largest that runs


def largest_running_micro(planned: int, runs, limit: float = SEARCH_LIMIT) -> tuple[int, list[str]]:
    """(the largest micro batch >= `planned` for which `runs(micro)` -> (ok, out_of_memory, tail)
    succeeded, what was tried), stepping up 10% at a time from `planned` until one runs out of memory
    or `limit` x planned. A failure other than out-of-memory stops the search with its error."""
    largest, tried, micro = planned, [], planned
    while micro <= limit * planned:
        ok, out_of_memory, tail = runs(micro)
        tried.append(f"{micro}: {'ran' if ok else 'out of memory' if out_of_memory else 'failed'}")
        if not ok:
            if not out_of_memory:
                raise RuntimeError(f"micro batch {micro} failed for another reason than memory: {tail}")
            break
        largest = micro
        micro += max(1, int(micro * SEARCH_STEP))
    return largest, tried


def search_micro(preset: str, run: dict, corpus: Path, tokenizer_dir: Path, work: Path, block_size: int, precision: str,
                 limit: float) -> dict:
    """Real 2-step runs of the planned setup (strategy, checkpointing) at larger micro batches."""
    from launch.plan import OOM_MARKERS

    strategy = ["--deepspeed", "none"] if not run["strategy"].startswith("deepspeed") else ["--zero_stage", run["strategy"][14]]
    ckpt = "--gradient_checkpointing" if run["gradient_checkpointing"] else "--no-gradient_checkpointing"

    def runs(micro: int) -> tuple[bool, bool, str]:
        out = work / f"search_{preset}_{micro}"
        batch = ["--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", "1", ckpt, *strategy]
        proc = subprocess.run(pretrain_command(preset, corpus, tokenizer_dir, work, block_size, 2, 1, precision, out, batch),
                              capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        tail = next((line for line in reversed(text.splitlines()) if line.strip()), "no output").strip()[:300]
        return proc.returncode == 0, any(marker in text for marker in OOM_MARKERS), tail

    largest, tried = largest_running_micro(run["micro_batch"], runs, limit)
    return {"largest_micro": largest, "tried": tried, "planned_share": round(run["micro_batch"] / largest, 3)}


# ------------------------------------------------- packed SFT under FlashAttention against SDPA


def per_sample_logit_error(flash_model, sdpa_model, rows: list[list[dict]], layout: str, device) -> float:
    """The largest |logit difference|, over every token of every sample, between the samples run as
    one micro batch of `rows` in `layout` under `flash_model` and each sample run alone under
    `sdpa_model`, relative to the largest |logit|. The flat layout must give rounding only; the
    packed [B, L] layout (what trainrig did before) lets a row's samples attend to each other."""
    import torch

    from trainers.data.collate import collate_rows, model_inputs

    batch = collate_rows(rows, pad_id=0, layout=layout)
    with torch.no_grad():
        if layout == "flat":
            logits = flash_model(**model_inputs(batch, device)).logits[0]
            starts, at = [], 0
            for sample in (s for row in rows for s in row):
                starts.append((at, sample))
                at += len(sample["input_ids"])
            pieces = [(logits[a:a + len(s["input_ids"])], s) for a, s in starts]
        else:
            logits = flash_model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)).logits
            pieces = []
            for r, row in enumerate(rows):
                at = 0
                for s in row:
                    pieces.append((logits[r, at:at + len(s["input_ids"])], s))
                    at += len(s["input_ids"])
        worst, scale = 0.0, 0.0
        for got, sample in pieces:
            alone = sdpa_model(input_ids=torch.tensor([sample["input_ids"]], device=device)).logits[0]
            worst = max(worst, float((got.float() - alone.float()).abs().max()))
            scale = max(scale, float(alone.float().abs().max()))
    return worst / max(scale, 1e-12)


FLASH_TOLERANCE = 0.02  # relative logit error of bf16 kernels that agree (~1e-3 expected); leaking shows ~0.1-1
FLASH_MICROS = (1, 2, 8)


def flash_check(model_dir: Path, tokenizer_dir: Path, work: Path, on_gpu: bool) -> dict:
    """Packed SFT rows of the demo's chat data, at micro 1, 2 and 8, through FlashAttention in the
    flat layout trainrig builds, against each sample alone through SDPA (bf16, the model of the
    first run); and the old [B, L] layout for contrast. Skipped, with the reason, where flash-attn
    does not run (trainers/attention.py's probe)."""
    import torch

    from trainers.data.synthetic import make_chat
    from trainers.attention import flash_attn_problem
    from trainers.data.chat import ChatSettings, prepare_chat
    from trainers.data.packing import RowDataset, pack_rows
    from trainers.models import load_tokenizer

    if not on_gpu:
        return {"skipped": "needs a CUDA GPU (the CPU tests check the flat layout with fake kernels)"}
    device = torch.device("cuda", 0)
    problem = flash_attn_problem(device)
    if problem:
        return {"skipped": problem}
    from transformers import AutoModelForCausalLM

    make_chat(work / "chat", seed=7, n_train=400)
    tokenizer = load_tokenizer(str(tokenizer_dir), False, "--tokenizer_name_or_path")
    samples = prepare_chat([str(work / "chat" / "sft.jsonl")], "--train_files", tokenizer, ChatSettings(512), "auto", False,
                           str(work / "chat_cache"), build=True)
    packed = [row for row in pack_rows(samples.lengths, 512, seed=0) if len(row) >= 2]
    table = RowDataset(samples, [[int(i) for i in row] for row in packed])
    models = {attn: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn).to(device).eval()
              for attn in ("flash_attention_2", "sdpa")}
    result = {"rows": len(table), "samples_per_row": round(sum(map(len, packed)) / max(len(packed), 1), 2), "errors": {}}
    for micro in FLASH_MICROS:
        rows = [table[r] for r in range(micro)]
        result["errors"][str(micro)] = {layout: per_sample_logit_error(models["flash_attention_2"], models["sdpa"], rows, layout, device)
                                       for layout in ("flat", "packed")}
    result["flat_ok"] = all(e["flat"] <= FLASH_TOLERANCE for e in result["errors"].values())
    return result


def steady_tokens_per_s(records: list[dict]) -> tuple[float, int]:
    """(tokens/s, tokens timed) over every logging window but the first (the warmup: kernel selection,
    the allocator growing). Each line holds the running `tokens` and its window's `tokens_per_sec`
    (time inside training steps only), so a window's seconds are its tokens over that rate."""
    lines = [r for r in records if "tokens_per_sec" in r]
    windows = [(b["tokens"] - a["tokens"], b["tokens_per_sec"]) for a, b in zip(lines, lines[1:])]
    tokens = sum(n for n, _ in windows)
    return tokens / sum(n / rate for n, rate in windows), tokens


def memory_vs_plan(plan: dict, records: list[dict]) -> dict:
    """The planner's whole estimate against what the run held at its peak. On a GPU: the device
    memory in use as the driver counts it (metrics.jsonl `device_used_gb`: the CUDA context, library
    workspaces and all the caching allocator reserved), so the overhead term, an assumed 1 GiB, is
    compared and not subtracted; the overhead measured is that less `max_memory_allocated`, and the
    other terms are compared with `max_memory_allocated` beside. On CPU the peak RSS, as bench_memory.py's
    `measure_memory` does."""
    terms = plan["memory_gb"]
    allocated = max(r["peak_memory_gb"] for r in records if "peak_memory_gb" in r)
    out = {"terms": terms, "predicted_gb": round(terms["total"], 3)}
    used = [r["device_used_gb"] for r in records if "device_used_gb" in r]
    if plan["hardware"]["device"] != "cpu" and used:
        measured = max(used)
        out.update(measured_gb=round(measured, 3), allocated_gb=round(allocated, 3),
                   overhead_measured_gb=round(measured - allocated, 3),
                   allocated_ratio=round((terms["total"] - terms["overhead"]) / allocated, 3))
    else:
        measured = allocated
        out["measured_gb"] = round(measured, 3)
    out["ratio"] = round(terms["total"] / measured, 3)
    return out


def measure_run(preset: str, out: Path, tokenizer_dir: Path, block_size: int) -> dict:
    """Everything the report needs from one finished run's plan.json, resolved config and metrics."""
    import yaml

    from trainers.tracking import read_metrics

    plan = json.loads((out / "plan.json").read_text())
    config = yaml.safe_load((out / "resolved_config.yaml").read_text())
    records = read_metrics(out / "metrics.jsonl")
    tok_s, timed = steady_tokens_per_s(records)
    flops = flops_per_token(preset, tokenizer_dir, block_size)
    return {"preset": preset, "device": plan["hardware"]["device"], "block_size": block_size,
            "micro_batch": plan["micro_batch_size"], "accumulation": plan["gradient_accumulation_steps"],
            "strategy": plan["strategy"]["name"], "gradient_checkpointing": config["gradient_checkpointing"],
            "precision": plan["precision"], "attn_implementation": plan["attn_implementation"], "attn_reason": plan["attn_reason"],
            "loss_reason": plan.get("loss_reason"), "plan_notes": plan.get("plan_notes", []),
            "steps": records[-1]["step"], "timed_tokens": timed, "tok_s": tok_s, "flops_per_token": flops,
            "model_flops": tok_s * flops["per_token"], **memory_vs_plan(plan, records)}


# ------------------------------------------------------------------------------- QLoRA SFT runs

# A model of a shipped shape with random weights, saved where launch/sft.py loads it (a lent GPU machine
# reaches no hub). Made in a child process, so this one holds no CUDA context while the runs plan for the
# GPU's memory; on the GPU when it has room for the bf16 weights twice over, else on the CPU.
RANDOM_MODEL = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config
shape, tokenizer_dir, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
config = Qwen2Config(**{"vocab_size": -(-len(tokenizer) // 64) * 64, **json.loads(Path(shape).read_text())})
config.vocab_size = max(config.vocab_size, len(tokenizer))
torch.manual_seed(0)
with torch.device("meta"):
    size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) * 2
device = "cuda" if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 2 * size else "cpu"
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(json.dumps({"parameters": size // 2, "made_on": device}))
"""


def run_qlora(shape: str, corpus: Path, tokenizer_dir: Path, work: Path, max_len: int, steps: int, warmup: int,
              precision: str) -> dict:
    """QLoRA SFT of a `shape` model (configs/models/<shape>.json, random weights) as a user runs it:
    `launch/sft.py --lora_r 16 --load_in_4bit --per_device_train_batch_size auto` (the planner decides
    micro batch and checkpointing), `--max_seq_length max_len`, packed chat rows; its tokens/s and its
    memory against the plan, as the pretraining runs'. The model directory is removed afterwards (14B
    is 30 GB of disk)."""
    import shutil

    from trainers.models import load_tokenizer
    from trainers.tracking import read_metrics

    model_dir, out, chat = work / f"qlora_model_{shape}", work / f"qlora_{shape}", work / "qlora_chat.jsonl"
    if not chat.is_file():
        make_chat_set(chat, corpus, load_tokenizer(str(tokenizer_dir), False, "--tokenizer_name_or_path"), 2000, max_len, seed=5)
    proc = subprocess.run([sys.executable, "-c", RANDOM_MODEL, str(REPO / "configs" / "models" / f"{shape}.json"), str(tokenizer_dir),
                           str(model_dir)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"making the {shape} model failed:\n{proc.stderr[-3000:]}")
    made = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        run_quietly([sys.executable, str(REPO / "launch" / "sft.py"), "--train_files", str(chat), "--model_name_or_path", str(model_dir),
                     "--max_seq_length", str(max_len), "--lora_r", "16", "--load_in_4bit", "--no-lora_train_chat_tokens",
                     "--per_device_train_batch_size", "auto", "--precision", precision, "--max_steps", str(steps),
                     "--logging_steps", str(warmup), "--output_dir", str(out), "--resume", "never", "--no-save_final",
                     "--validation_split_ratio", "0", "--data_cache_dir", str(work / "chat_cache")])
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    plan = json.loads((out / "plan.json").read_text())
    records = read_metrics(out / "metrics.jsonl")
    tok_s, timed = steady_tokens_per_s(records)
    return {"shape": shape, "parameters": made["parameters"], "device": plan["hardware"]["device"], "max_seq_length": max_len,
            "micro_batch": plan["micro_batch_size"], "strategy": plan["strategy"]["name"], "base_bits": plan["base_bits"],
            "precision": plan["precision"], "steps": records[-1]["step"], "timed_tokens": timed, "tok_s": tok_s,
            **memory_vs_plan(plan, records)}


# ------------------------------------------------------------------------------ the device's peak


def cuda_matmul_peak_flops(n: int, timings: int, per_timing: int) -> float:
    """The GPU's dense bf16 matmul rate: the best of `timings` CUDA-event timings of `per_timing`
    n x n products (2 n^3 FLOPs each, cuBLAS, fp32 accumulate as the training's), after a warm-up
    that lets cuBLAS pick its kernel and the clocks rise."""
    import torch

    a, b, c = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(per_timing):
        torch.matmul(a, b, out=c)
    best = math.inf
    for _ in range(timings):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_timing):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / per_timing)  # elapsed_time is in ms
    del a, b, c
    torch.cuda.empty_cache()
    return 2 * n**3 / best


def measure_peak(on_gpu: bool) -> dict:
    if on_gpu:
        n, timings, per_timing = GPU_MATMUL
        return {"flops": cuda_matmul_peak_flops(n, timings, per_timing), "dtype": "bf16", "n": n, "timings": timings,
                "per_timing": per_timing}
    n, timings = CPU_MATMUL  # the smoke run trains in fp32: bench/run.py's CPU peak
    return {"flops": matmul_peak_flops(n, timings), "dtype": "fp32", "n": n, "timings": timings, "per_timing": 1}


def device_info(on_gpu: bool) -> dict:
    """The GPU and the software under it (driver from nvidia-smi; CUDA as torch was built for it)."""
    import importlib.metadata

    import torch

    try:
        flash = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash = None
    if not on_gpu:
        return {"name": "cpu", "driver": None, "cuda": None, "torch": torch.__version__, "flash_attn": flash}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
        driver = query.stdout.split("\n", 1)[0].strip() or "unknown (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown (no nvidia-smi)"
    return {"name": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "flash_attn": flash}


# ------------------------------------------------------------------------------------ the bench


def bench_gpu(presets: list[str], block_size: int, steps: int, warmup: int, vocab_size: int, documents: int, work: Path,
              on_gpu: bool, search_limit: float = SEARCH_LIMIT, qlora: tuple[str, ...] = (), qlora_steps: int = 6) -> dict:
    """Corpus, tokenizer, one run per preset and the search above its micro batch, then, in this
    process (which held no CUDA context while the runs planned for the GPU's memory), the
    FlashAttention check, the peak and the device. A run that fails (out of memory: the plan promised
    too much) is recorded with its error, and the others still run."""
    from trainers.data.synthetic import make_zipf_corpus

    corpus = work / "corpus.jsonl"
    corpus_stats = make_zipf_corpus(corpus, documents)
    tokenizer = make_tokenizer(corpus, vocab_size, work / "tokenizer")
    precision = "bf16" if on_gpu else "fp32"
    runs = []
    for i, preset in enumerate(presets):
        try:
            out = run_pretrain(preset, corpus, work / "tokenizer", work, block_size, steps, warmup, precision, save_final=i == 0)
            run = measure_run(preset, out, work / "tokenizer", block_size)
            run["search"] = search_micro(preset, run, corpus, work / "tokenizer", work, block_size, precision, search_limit)
            runs.append(run)
        except RuntimeError as err:
            print(f"(e) {preset}: {err}", file=sys.stderr, flush=True)
            last = next((line for line in reversed(str(err).splitlines()) if line.strip()), str(err))
            runs.append({"preset": preset, "block_size": block_size, "error": last.strip()[:300]})
    qlora_runs = []
    for shape in qlora:
        try:
            # chat rows of the pretraining block size, at least 128 tokens (a smoke run's blocks are shorter than a conversation)
            qlora_runs.append(run_qlora(shape, corpus, work / "tokenizer", work, max(block_size, 128), qlora_steps, max(1, qlora_steps // 3),
                                        precision))
        except RuntimeError as err:
            print(f"(e) QLoRA {shape}: {err}", file=sys.stderr, flush=True)
            last = next((line for line in reversed(str(err).splitlines()) if line.strip()), str(err))
            qlora_runs.append({"shape": shape, "error": last.strip()[:300]})
    first = work / f"run_{presets[0]}" / "final"
    flash = flash_check(first, work / "tokenizer", work, on_gpu) if first.is_dir() else {"skipped": f"the {presets[0]} run failed"}
    peak = measure_peak(on_gpu)
    device = device_info(on_gpu)
    spec = spec_flops(device["name"]) if on_gpu else None
    for r in runs:
        if "error" not in r:
            r["mfu"] = r["model_flops"] / peak["flops"]
            r["mfu_spec"] = r["model_flops"] / spec if spec else None
    return {"device": device, "peak": {**peak, "spec_flops": spec}, "corpus": corpus_stats, "tokenizer": tokenizer, "steps": steps,
            "warmup": warmup, "block_size": block_size, "runs": runs, "flash": flash, "qlora": qlora_runs}


def spec_flops(device_name: str) -> float | None:
    """The sheet's dense bf16 rate for the GPU (launch/planner/hardware.py's table), None for one it does not know."""
    from launch.planner.hardware import _known_spec

    known = _known_spec(device_name)
    return known.bf16_tflops * 1e12 if known and known.bf16_tflops else None


# ---------------------------------------------------------------------------------- the report


def preset_label(preset: str) -> str:
    return preset.upper() if preset[:1].isdigit() else preset  # 0.5b -> 0.5B, tiny stays tiny


def mfu_verdict(run: dict, device: str) -> str:
    if "H100" not in device or run["preset"] != "0.5b":
        return ""  # the target is for 0.5b on an H100 only
    return "**met**" if run.get("mfu", 0.0) >= MFU_TARGET else "**NOT met**"


def memory_verdict(run: dict) -> str:
    low, high = MEMORY_BAND
    return "**met**" if "ratio" in run and low <= run["ratio"] <= high else "**NOT met**"


def share_verdict(run: dict) -> str:
    search = run.get("search")
    return "**met**" if search and search["planned_share"] >= PLANNED_SHARE_TARGET else "**NOT met**"


def flash_lines(flash: dict | None) -> list[str]:
    """The FlashAttention check's paragraph."""
    if not flash:
        return []
    if "skipped" in flash:
        return [f"FlashAttention check (packed SFT rows through flash-attn vs each sample alone through SDPA): skipped: {flash['skipped']}."]
    cells = "; ".join(f"micro {m}: flat {e['flat']:.2e}, old [B, L] rows {e['packed']:.2e}" for m, e in flash["errors"].items())
    verdict = "**met**" if flash["flat_ok"] else "**NOT met**"
    return [f"FlashAttention check: packed SFT rows of the demo's chat data ({flash['samples_per_row']} samples per row) through "
            f"flash-attn in the flat layout trainrig builds, each sample's logits against the sample alone through SDPA, bf16, "
            f"largest |difference| over the largest |logit|: {cells}. Target flat <= {FLASH_TOLERANCE}: {verdict}. (The old "
            f"layout at micro >= 2 is shown for contrast: there a row's samples see each other.)"]


def render_gpu(result: dict) -> list[str]:
    """Markdown for RESULTS.md's section (e), from results/gpu.json (`save_result`'s payload)."""
    dev, peak = result["device"], result["peak"]
    on_gpu = dev["name"] != "cpu"
    runs = result["runs"]
    precision = next((r["precision"] for r in runs if "precision" in r), peak["dtype"])
    lines = [f"## (e) GPU: {precision} pretraining, {' and '.join(preset_label(r['preset']) for r in runs)}", ""]
    if not on_gpu:
        lines += ["Smoke run on CPU (`bench/gpu.py --device cpu`): it exercises the pipeline; these are not GPU figures.", ""]
    spec = "MFU vs spec peak | " if on_gpu else ""
    lines += [f"| device | model | micro x block (accumulation) | strategy | attention | tokens/s | model TFLOP/s | "
              f"MFU vs measured peak (target >= {MFU_TARGET:.0%} for 0.5B on H100) | {spec}planned / largest micro that runs "
              f"(target >= {PLANNED_SHARE_TARGET:.0%}) | predicted (GiB) | measured (GiB) | "
              f"predicted / measured (target {MEMORY_BAND[0]:.2f}-{MEMORY_BAND[1]:.2f}) |",
              "|---|---|---|---|---|---:|---:|---:|" + ("---:|" if on_gpu else "") + "---:|---:|---:|---:|"]
    for r in runs:
        name = preset_label(r["preset"])
        if "error" in r:
            lines.append(f"| {dev['name']} | {name} | failed: {r['error'].replace('|', '/')} | | | | | |{' |' if on_gpu else ''} | | | **NOT met** |")
            continue
        ckpt = " + checkpointing" if r["gradient_checkpointing"] else ""
        mfu = f"{r['mfu']:.1%} {mfu_verdict(r, dev['name'])}".strip()
        spec_cell = (f"{r['mfu_spec']:.1%} | " if r.get("mfu_spec") else "sheet unknown | ") if on_gpu else ""
        search = r.get("search")
        share = (f"{r['micro_batch']} / {search['largest_micro']} = {search['planned_share']:.0%} {share_verdict(r)}" if search else "not searched")
        lines.append(f"| {r['device']} | {name} | {r['micro_batch']} x {r['block_size']} ({r['accumulation']}) | {r['strategy']}{ckpt} "
                     f"| {r['attn_implementation']} | {r['tok_s']:,.0f} | {r['model_flops'] / 1e12:,.1f} | {mfu} | {spec_cell}{share} "
                     f"| {r['predicted_gb']:.2f} | {r['measured_gb']:.2f} | {r['ratio']:.3f} {memory_verdict(r)} |")
    lines += ["", *_target_lines(result), "", *_method_lines(result, on_gpu, precision)]
    flash = flash_lines(result.get("flash"))
    if flash:
        lines += ["", *flash]
    if result.get("qlora"):
        lines += ["", *qlora_lines(result["qlora"])]
    return lines


def qlora_lines(runs: list[dict]) -> list[str]:
    """The QLoRA SFT runs: the planner's micro batch, tokens/s and its memory estimate against the run."""
    lines = ["QLoRA SFT (`launch/sft.py --lora_r 16 --load_in_4bit --per_device_train_batch_size auto`, a random-weight model of "
             "the shipped shape, packed chat rows):", "",
             f"| model | micro x tokens | strategy | tokens/s | predicted (GiB) | measured (GiB) | predicted / measured "
             f"(target {MEMORY_BAND[0]:.2f}-{MEMORY_BAND[1]:.2f}) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error'].replace('|', '/')} | | | | | **NOT met** |")
            continue
        lines.append(f"| {r['shape']} ({r['parameters'] / 1e9:.1f}B) | {r['micro_batch']} x {r['max_seq_length']} | {r['strategy']} | "
                     f"{r['tok_s']:,.0f} | {r['predicted_gb']:.2f} | {r['measured_gb']:.2f} | {r['ratio']:.3f} {memory_verdict(r)} |")
    return lines


def _target_lines(result: dict) -> list[str]:
    dev, runs = result["device"]["name"], result["runs"]
    half = next((r for r in runs if r["preset"] == "0.5b"), None)
    if half is None:
        mfu = "not evaluated (no 0.5b run)."
    elif "H100" not in dev:
        mfu = f"not evaluated (the target is for an H100; this is {dev})."
    elif "error" in half:
        mfu = "**NOT met** (the 0.5b run failed)."
    else:
        mfu = f"{mfu_verdict(half, dev)} ({half['mfu']:.1%})."
    memory = "; ".join(f"{preset_label(r['preset'])} {memory_verdict(r)}"
                       + (f" ({r['ratio']:.3f})" if "ratio" in r else " (failed)") for r in runs)
    terms = "; ".join(f"{preset_label(r['preset'])} " + " / ".join(f"{r['terms'][k]:.2f}" for k in MEMORY_TERMS)
                      for r in runs if "terms" in r)
    share = "; ".join(f"{preset_label(r['preset'])} {share_verdict(r)} (tried {', '.join(r['search']['tried'])})"
                      for r in runs if r.get("search"))
    overhead = "; ".join(f"{preset_label(r['preset'])} {r['overhead_measured_gb']:.2f} GiB measured for {r['terms']['overhead']:.2f} "
                         f"assumed (the other terms {r['terms']['total'] - r['terms']['overhead']:.2f} GiB predicted for "
                         f"{r['allocated_gb']:.2f} allocated, {r['allocated_ratio']:.3f})"
                         for r in runs if "overhead_measured_gb" in r)
    lines = [f"Target MFU >= {MFU_TARGET:.0%} for 0.5B on H100: {mfu} "
             f"Target memory prediction within +-{MEMORY_BAND[1] - 1:.0%}: {memory}.",
             f"Target planned micro batch >= {PLANNED_SHARE_TARGET:.0%} of the largest that runs: {share or 'not searched'}.",
             "", f"The estimates term by term, GiB ({' / '.join(MEMORY_TERMS)}): {terms or 'no run finished'}."]
    if overhead:
        lines.append(f"Overhead (device memory in use less `max_memory_allocated`: CUDA context, workspaces, the allocator's "
                     f"reserve): {overhead}.")
    return lines


def _method_lines(result: dict, on_gpu: bool, precision: str) -> list[str]:
    dev, peak, tok, corpus = result["device"], result["peak"], result["tokenizer"], result["corpus"]
    done = [r for r in result["runs"] if "error" not in r]
    attention = "; ".join(sorted({f"{r['attn_implementation']} ({r['attn_reason']})" for r in done})) or "no run finished"
    flops = "; ".join(f"{preset_label(r['preset'])} {r['flops_per_token']['per_token'] / 1e9:,.2f} GFLOP (6 x "
                      f"{r['flops_per_token']['matmul_weights'] / 1e6:,.1f}M matmul weights + "
                      f"{r['flops_per_token']['attention'] / 1e9:,.2f} GFLOP attention)" for r in done)
    notes = sorted({n for r in done for n in r["plan_notes"]} | {r["loss_reason"] for r in done if r.get("loss_reason")})
    products = f"{peak['per_timing']} {peak['n']}x{peak['n']} products" if peak["per_timing"] > 1 else f"one {peak['n']}x{peak['n']} product"
    head = ("as many as Qwen2.5-0.5B's, so the LM head costs what Qwen's does" if tok["rows"] == QWEN_VOCAB_ROWS else
            f"where Qwen2.5-0.5B has {QWEN_VOCAB_ROWS:,}, so the LM head is not Qwen's size")
    if on_gpu:
        software = (f"Driver {dev['driver']}, CUDA {dev['cuda']} (torch's build), torch {dev['torch']}, flash-attn "
                    f"{dev['flash_attn'] or 'not installed'}.")
        memory = ("Predicted is the whole plan.json estimate, its assumed overhead term included; measured is the "
                  "largest device memory in use during the run as the driver counts it (metrics.jsonl `device_used_gb`, "
                  "`torch.cuda.mem_get_info`: context, workspaces and the caching allocator's reserve included). MFU vs "
                  f"spec peak uses the sheet's dense bf16 rate, {peak['spec_flops'] / 1e12:,.0f} TFLOP/s." if peak.get("spec_flops") else
                  "Predicted is the whole plan.json estimate, its assumed overhead term included; measured is the "
                  "largest device memory in use during the run as the driver counts it (metrics.jsonl `device_used_gb`).")
    else:
        software = f"torch {dev['torch']}."
        memory = ("Predicted is the whole plan.json estimate; measured is the run's `peak_memory_gb`, the process's "
                  "peak RSS (which holds the libraries the estimate's overhead term stands for).")
    return [f"Each model is `launch/pretrain.py` in its own process: `--model_preset`, `--block_size {result['block_size']}`, "
            f"`--precision {precision}`, `--per_device_train_batch_size auto` (the planner sized the micro batch and chose "
            f"strategy and checkpointing for this device), {result['steps']} steps, the trainer's defaults otherwise. "
            f"Tokens/s is the run's own (metrics.jsonl: predicted tokens, block - 1 per sequence, over time inside training "
            f"steps) over the logging windows after the first, the warmup ({result['warmup']} step{'s' if result['warmup'] != 1 else ''}): their tokens over "
            f"their seconds. MFU is model FLOPs/token x tokens/s over the measured {peak['dtype']} matmul peak, "
            f"{peak['flops'] / 1e12:,.1f} TFLOP/s (best of {peak['timings']} timings of {products} on the same device). "
            f"Model FLOPs/token follow bench/run.py's PaLM convention (6 per matmul weight, LM head included, + 12 x "
            f"layers x hidden x block; checkpointing's recompute not counted): {flops}. {memory}",
            "",
            f"Data: {corpus['documents']:,} synthetic documents ({corpus['words']:,} words, {corpus['bytes'] / 1e6:,.1f} MB) "
            f"of Zipf-distributed pseudo-words from a {corpus['lexicon']:,}-word lexicon, made by bench/gpu.py; tokenizer: "
            f"tokenizer/train.py's byte-level BPE trained on it to {tok['tokens']:,} tokens (asked {tok['requested']:,}), "
            f"{tok['rows']:,} embedding rows, {head}. Attention: {attention}. {software}"
            + ("" if not notes else " Notes in the runs' plan.json: " + "; ".join(notes) + ".")]
