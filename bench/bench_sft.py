"""(c) SFT on a length-skewed chat set: `launch/sft.py` packed and `--no-packing` vs. TRL's
`SFTTrainer` (bench/trl_sft.py) and pad-to-max (Qwen's classic `preprocess` + a bare PyTorch loop,
a child of bench/run.py's internal --bare_sft mode), at equal steps and at equal trained tokens
with one held-out evaluator; and the section's rendering for RESULTS.md."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO, make_chat_set, make_sft_model, run_quietly


SFT_LR = 1e-3  # all three loops; high enough that the loss moves in a few dozen steps from a barely trained model
# The equal-token budget T, as a share of the chat set's trained tokens: a third (51k of 154k at the
# defaults) is more than any loop trains in the timed steps (packing: ~40k in 68), so every timed run
# is the start of its run to T, and it takes the padded loops ~340 steps (~45 s for pad-to-max).
SFT_TOKEN_SHARE = 1 / 3
# Each run stops at the first step that reaches T, so it overshoots by less than one step's tokens
# (at most micro x max_len = 1,024, 2% of T at the defaults); a loop further off is flagged.
SFT_TOKEN_TOLERANCE = 0.03
SFT_HELDOUT_SEED = 6  # the held-out conversations' make_chat_set seed; the training set's is 5


def trainrig_sft(chat, model_dir, cache_dir, max_len, micro, steps, warmup, loss_steps, lr, seed, out, packing: bool,
                 run_steps: int = 0, extra: list[str] = ()) -> dict:
    """`python launch/sft.py` as a user runs it, in its own process, logging every `warmup` steps. Its
    metrics lines carry running totals (`trained_tokens`, `tokens`) and wall time (`elapsed_s`); the
    rates are the deltas between the line at step `warmup` and the one at step `steps`, so the warmup
    steps are excluded.
    The loss is the mean over the last `loss_steps` of those steps (a multiple of `warmup`, dividing `steps`).
    With run_steps > steps the run goes on to run_steps after the timed ones (an equal-token run);
    steps_taken, tokens_reached (trained tokens since step 0) and model (its final/) are the whole run's.
    `extra`: more flags (section (f)'s LoRA and base); peak_gb is the run's peak_memory_gb, predicted_gb
    its plan.json estimate of it."""
    assert steps % warmup == 0 and loss_steps % warmup == 0 and loss_steps <= steps - warmup
    argv = ["--train_files", str(chat), "--model_name_or_path", str(model_dir), "--max_seq_length", str(max_len),
            "--per_device_train_batch_size", str(micro), "--max_steps", str(max(steps, run_steps)), "--logging_steps", str(warmup),
            "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--seed", str(seed),
            "--output_dir", str(out), "--resume", "never", "--data_cache_dir", str(cache_dir),
            "--validation_split_ratio", "0", "--packing" if packing else "--no-packing", *extra]
    run_quietly([sys.executable, str(REPO / "launch" / "sft.py"), *argv])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "trained_tokens" in r]
    first, last = (next(r for r in timed if r["step"] == at) for at in (warmup, steps))
    seconds = last["elapsed_s"] - first["elapsed_s"]
    tail = [r["loss"] for r in timed if steps - loss_steps < r["step"] <= steps]  # equal windows: the mean of their means
    plan = json.loads((out / "plan.json").read_text())
    return {"trained_tok_s": (last["trained_tokens"] - first["trained_tokens"]) / seconds,
            "tok_s": (last["tokens"] - first["tokens"]) / seconds, "loss": sum(tail) / len(tail), "batch_fill": plan["batch_fill"],
            "trained_tokens": last["trained_tokens"] - first["trained_tokens"], "steps_taken": timed[-1]["step"],
            "tokens_reached": timed[-1]["trained_tokens"], "model": str(out / "final"),
            "peak_gb": max(r.get("peak_memory_gb", 0.0) for r in records), "predicted_gb": plan["memory_gb"]["total"]}


def trainrig_steps_to(samples, max_len, micro, seed, packing: bool, budget: int, at_least: int) -> int:
    """The first step (>= at_least) at which `launch/sft.py` has trained `budget` tokens, found by
    replaying its data order on one process from trainrig's own pieces as trainers/sft.py builds
    them (make_rows, row_sampler, micro batches with drop_last, epoch after epoch). A row's
    trained tokens are its samples' labels after each one's first (collate_rows ignores that one). The
    run's own metrics.jsonl then says what it trained, so a replay out of step shows as a miss of T."""
    from itertools import count

    import numpy as np

    from trainers.data.collate import trained_tokens
    from trainers.sft import make_rows, row_sampler

    rows = make_rows(samples, np.arange(len(samples)), max_len, packing, seed)
    per_sample = np.array([trained_tokens(samples[i]["labels"]) for i in range(len(samples))])
    per_row = np.array([per_sample[row].sum() for row in rows.rows])
    sampler = row_sampler(rows, samples.lengths, packing, micro, 1, 0, seed)  # accumulation 1: the global batch is the micro batch
    done_steps, done_tokens = 0, 0
    for epoch in count():
        sampler.set_position(epoch, 0)
        order = np.fromiter(sampler, dtype=np.int64)
        per_step = per_row[order[:len(order) // micro * micro]].reshape(-1, micro).sum(axis=1)
        reached = done_tokens + np.cumsum(per_step)
        step = done_steps + 1 + np.arange(len(per_step))
        hits = np.flatnonzero((reached >= budget) & (step >= at_least))
        if len(hits):
            return int(step[hits[0]])
        done_steps, done_tokens = int(step[-1]), int(reached[-1])


def pad_to_max_preprocess(conversations: list[list[dict]], tokenizer, max_len: int) -> dict:
    """The classic Qwen fine-tuning `preprocess` (Qwen's finetune.py), for `messages` records: each
    turn tokenized piece by piece as `<|im_start|>role\\n content <|im_end|>\\n`, labels -100 on
    system and user turns, on the assistant header and on the padding, then every sample padded to
    max_len (and cut there) into one tensor; attention_mask = input_ids != pad. Unlike the original,
    the assistant's `<|im_start|>` and the "\\n" after `<|im_end|>` are not trained, matching trainrig."""
    import torch

    ignore = -100
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nl = tokenizer("\n", add_special_tokens=False).input_ids
    input_ids, targets = [], []
    for messages in conversations:
        input_id, target = [], []
        for message in messages:
            header = [im_start] + tokenizer(message["role"], add_special_tokens=False).input_ids + nl
            body = tokenizer(message["content"], add_special_tokens=False).input_ids
            input_id += header + body + [im_end] + nl
            if message["role"] == "assistant":
                target += [ignore] * len(header) + body + [im_end] + [ignore] * len(nl)
            else:
                target += [ignore] * (len(header) + len(body) + 1 + len(nl))
        input_ids.append((input_id + [pad_id] * (max_len - len(input_id)))[:max_len])
        targets.append((target + [ignore] * (max_len - len(target)))[:max_len])
    input_ids = torch.tensor(input_ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": torch.tensor(targets, dtype=torch.long), "attention_mask": input_ids.ne(pad_id)}


def bare_sft_loop(chat, model_dir, max_len, micro, steps, warmup, loss_steps, lr, seed, token_budget: int = 0,
                  save_dir: Path | None = None) -> dict:
    """Pad-to-max SFT as a user writes it by hand: Qwen's preprocess above, a shuffled loader of
    the padded tensors, the same model (fp32, SDPA) and fused AdamW (trainrig's SFT defaults:
    betas 0.9/0.95, no weight decay, constant lr), clip 1.0. Trained tokens are the labels that
    are not -100 after the one-token shift; timed over steps `warmup` to `steps`; the loss is the
    mean of the last `loss_steps` of those steps' losses, as trainrig's is.
    With token_budget, it goes on after `steps` until it has trained that many tokens since step 0
    (an equal-token run); the model is then written to save_dir."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    conversations = [json.loads(line)["messages"] for line in Path(chat).read_text().splitlines()]
    data = pad_to_max_preprocess(conversations, tokenizer, max_len)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    loader = DataLoader(TensorDataset(data["input_ids"], data["labels"], data["attention_mask"]), batch_size=micro,
                        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))

    def batches():
        while True:
            yield from loader

    stream = batches()
    model.train()
    step, reached, start, seconds, trained, real, losses = 0, 0, None, None, 0, 0, []
    while step < steps or reached < token_budget:
        if step == warmup:
            start = time.perf_counter()
        input_ids, labels, attention_mask = next(stream)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        step_trained = int((labels[:, 1:] != -100).sum())
        reached += step_trained
        if warmup <= step < steps:
            trained += step_trained
            real += int(attention_mask.sum())
        if steps - loss_steps <= step < steps:
            losses.append(value)
        step += 1
        if step == steps:
            seconds = time.perf_counter() - start
    if save_dir:
        model.save_pretrained(str(save_dir))
    return {"trained_tok_s": trained / seconds, "tok_s": real / seconds, "loss": sum(losses) / len(losses),
            "non_pad": data["attention_mask"].sum().item() / data["input_ids"].numel(), "trained_tokens": trained,
            "dataset_trained_tokens": int((data["labels"][:, 1:] != -100).sum()), "steps_taken": step,
            "tokens_reached": reached, "model": str(save_dir) if save_dir else None}


def bare_sft_in_process(*args) -> dict:
    """The pad-to-max loop in its own process, like every other training run here."""
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--bare_sft", json.dumps([str(a) for a in args])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the pad-to-max loop exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def heldout_examples(heldout: Path, train_chat: Path, tokenizer, max_len: int) -> list[tuple]:
    """The held-out conversations as unpadded (input_ids, labels) pairs, built once so that every
    model is scored on the very same tokens: the pad-to-max preprocess's labels (each assistant
    content and its `<|im_end|>`, what every loop trains; the SFT smoke test checks them against
    trainrig's), cut to each conversation's tokens. None of them may be in the training set."""
    lines = Path(heldout).read_text().splitlines()
    shared = set(lines) & set(Path(train_chat).read_text().splitlines())
    if shared:
        raise ValueError(f"{len(shared)} held-out conversations are also in the training set {train_chat}")
    data = pad_to_max_preprocess([json.loads(line)["messages"] for line in lines], tokenizer, max_len)
    return [(ids[mask], labels[mask]) for ids, labels, mask in zip(data["input_ids"], data["labels"], data["attention_mask"])]


def heldout_loss(model_dir, examples: list[tuple]) -> float:
    """Section (c)'s one evaluator: a saved model's mean cross-entropy over every trained token of
    the held-out examples (summed, then divided by their count: a conversation weighs by its
    tokens, as in training), one conversation per forward (no padding), fp32, SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for input_ids, labels in examples:
            logits = model(input_ids=input_ids[None], use_cache=False).logits[0, :-1]
            total += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


def chat_samples(chat, tokenizer, cache_dir, max_len):
    """trainrig's encoded samples of the chat set (its prepare_chat with launch/sft.py's defaults),
    built into the cache the runs use, or read from it."""
    from trainers.data.chat import ChatSettings, prepare_chat

    return prepare_chat([str(chat)], "--train_files", tokenizer, ChatSettings(max_len), "auto", False, str(cache_dir), build=True)


def sft_data_stats(chat, tokenizer, cache_dir, max_len, seed) -> dict:
    """What trainrig's SFT data preparation makes of the chat set (its own prepare_chat and
    make_rows, in-process, on the cache the runs use): rows, samples per packed row, counts."""
    import numpy as np

    from trainers.sft import make_rows

    samples = chat_samples(chat, tokenizer, cache_dir, max_len)
    rows = make_rows(samples, np.arange(len(samples)), max_len, True, seed)
    return {"rows": len(rows), "rows_used": float(rows.row_lengths().sum() / (len(rows) * max_len)),
            "samples_per_row": len(samples) / len(rows), "kept": samples.meta["kept"], "read": samples.meta["read"],
            "truncated": samples.meta["truncated"], "dataset_trained_tokens": samples.meta["trained_tokens"]}


def bench_sft(corpus, tokenizer_dir, workdir, preset="tiny", max_len=512, micro=2, steps=0, warmup=4, loss_steps=16,
              samples=2000, repeats=3, seed=0, trl_variants=None, token_share=SFT_TOKEN_SHARE, heldout=200) -> dict:
    """(c): trainrig SFT, packed and length-grouped, vs. pad-to-max in a bare loop and TRL's
    SFTTrainer (bench/trl_sft.py; `trl_variants`, default ("defaults", "packing") when TRL imports,
    () otherwise, and the result says why): the same chat set, model, micro batch (rows), steps,
    optimizer and lr; medians of `repeats`, all loops interleaved.

    By default (steps=0) the timed window, steps - warmup, is exactly one of `--no-packing`'s
    length-group chunks (trainrig sorts each chunk of LENGTH_GROUP micro batches longest first), so
    that loop is timed on the whole spread of lengths, not only on a chunk's longest batches.

    Equal data: every loop also trains T = `token_share` of the set's trained tokens, and its model
    is scored on `heldout` conversations made like the set but not in it (sft_equal_tokens). The
    first repeat's runs go on after their timed steps until they reach T (the loss is seeded, so one
    run per loop); the pad-to-max loop's run to T is in this process (its child takes only the timed
    run's arguments), the same code and seed as its timed runs."""
    from trainers.models import load_tokenizer
    from trainers.sft import LENGTH_GROUP

    if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, for trl_sft.py when this module is imported
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trl_sft import trl_available, trl_sft_in_process

    trl_skipped = None
    if trl_variants is None:
        trl_variants = ("defaults", "packing") if trl_available() else ()
        if not trl_variants:
            trl_skipped = "TRL is not installed (`pip install -e \".[dev]\"`, which `make bench` and `make test` do)"
    steps = steps or warmup + LENGTH_GROUP
    corpus, tokenizer_dir, workdir = (Path(p).resolve() for p in (corpus, tokenizer_dir, workdir))  # children run in REPO
    cache = workdir / "sft_cache"
    model_dir = make_sft_model(corpus, tokenizer_dir, workdir / f"sft_base_{preset}", preset, cache)
    # the tokenizer every loop uses: launch/sft.py's default, the model directory's (see load_tokenizer)
    tokenizer = load_tokenizer(str(model_dir), False, "--model_name_or_path")
    chat = workdir / "sft_chat.jsonl"
    chat_stats = make_chat_set(chat, corpus, tokenizer, samples, max_len, seed=5)
    trainrig_samples = chat_samples(chat, tokenizer, cache, max_len)
    budget = round(token_share * trainrig_samples.meta["trained_tokens"])
    run_steps = {name: trainrig_steps_to(trainrig_samples, max_len, micro, seed, name == "packed", budget, steps)
                 for name in ("packed", "grouped")}
    runs: dict[str, list[dict]] = {"packed": [], "grouped": [], "pad_to_max": [], **{f"trl_{v}": [] for v in trl_variants}}
    for i in range(repeats):
        to_budget = i == 0  # the first repeat's runs go on to T
        runs["pad_to_max"].append(bare_sft_in_process(chat, model_dir, max_len, micro, steps, warmup, loss_steps, SFT_LR, seed))
        for name in ("packed", "grouped"):
            runs[name].append(trainrig_sft(chat, model_dir, cache, max_len, micro, steps, warmup, loss_steps, SFT_LR, seed,
                                           workdir / f"sft_{name}_{i}", packing=name == "packed",
                                           run_steps=run_steps[name] if to_budget else 0))
        for variant in trl_variants:
            runs[f"trl_{variant}"].append(trl_sft_in_process(
                chat, model_dir, max_len, micro, steps, warmup, loss_steps, SFT_LR, seed, variant,
                budget if to_budget else 0, workdir / f"sft_trl_{variant}_model" if to_budget else ""))
    to_budget_runs = {name: rs[0] for name, rs in runs.items() if name != "pad_to_max"}
    to_budget_runs["pad_to_max"] = bare_sft_loop(chat, model_dir, max_len, micro, steps, warmup, loss_steps, SFT_LR, seed,
                                                 budget, workdir / "sft_pad_to_max_model")
    heldout_chat = workdir / "sft_heldout.jsonl"
    make_chat_set(heldout_chat, corpus, tokenizer, heldout, max_len, seed=SFT_HELDOUT_SEED)
    examples = heldout_examples(heldout_chat, chat, tokenizer, max_len)
    data = sft_data_stats(chat, tokenizer, cache, max_len, seed)
    result = {"preset": preset, "max_seq_length": max_len, "micro_batch": micro, "steps": steps, "warmup": warmup,
              "loss_steps": loss_steps, "length_group": LENGTH_GROUP, "lr": SFT_LR, "repeats": repeats, "chat": chat_stats,
              "kept": data["kept"], "truncated": data["truncated"]}
    for name, rs in runs.items():
        result[name] = {"trained_tok_s": statistics.median(r["trained_tok_s"] for r in rs),
                        "tok_s": statistics.median(r["tok_s"] for r in rs),
                        "loss": statistics.median(r["loss"] for r in rs),
                        "trained_tokens": statistics.median(r["trained_tokens"] for r in rs),  # in the timed steps
                        "all": [round(r["trained_tok_s"]) for r in rs]}
    result["packed"].update(non_pad=runs["packed"][0]["batch_fill"], rows_used=data["rows_used"],
                            samples_per_row=data["samples_per_row"])
    result["grouped"].update(non_pad=runs["grouped"][0]["batch_fill"], samples_per_row=1.0)
    result["pad_to_max"].update(non_pad=runs["pad_to_max"][0]["non_pad"], samples_per_row=1.0)
    result["trained_labels"] = {"trainrig": data["dataset_trained_tokens"],
                                "pad_to_max": runs["pad_to_max"][0]["dataset_trained_tokens"]}
    result["ratio"] = result["packed"]["trained_tok_s"] / result["pad_to_max"]["trained_tok_s"]
    result["grouped_ratio"] = result["grouped"]["trained_tok_s"] / result["pad_to_max"]["trained_tok_s"]
    result["targets"] = {"non_pad": result["packed"]["non_pad"] >= 0.95, "speedup": result["ratio"] >= 2.0}
    result["trl_variants"], result["trl_skipped"] = list(trl_variants), trl_skipped
    for variant in trl_variants:
        first = runs[f"trl_{variant}"][0]
        result[f"trl_{variant}"].update(non_pad=first["non_pad"], samples_per_row=first["samples_per_row"], trl=first["trl"],
                                        assistant_only_loss=first["assistant_only_loss"])
        result["trained_labels"][f"trl_{variant}"] = first["dataset_trained_tokens"]
        result[f"trl_{variant}_ratio"] = result["packed"]["trained_tok_s"] / result[f"trl_{variant}"]["trained_tok_s"]
    if "defaults" in trl_variants:
        result["trl_ratio"] = result["trl_defaults_ratio"]  # trainrig packed / SFTTrainer defaults
        result["targets"]["trl_speedup"] = result["trl_ratio"] >= 1.5
    result["equal_tokens"] = {"share": token_share, **sft_equal_tokens(to_budget_runs, model_dir, examples, budget)}
    return result


def sft_equal_tokens(to_budget: dict[str, dict], base_model: Path, examples: list[tuple], budget: int) -> dict:
    """Section (c) at equal data: per loop, its run to T (optimizer steps, trained tokens since step 0)
    and the held-out loss of the model it saved, all scored by heldout_loss; the base model's
    held-out loss (where every loop started) beside them. `within`: every loop reached T within
    SFT_TOKEN_TOLERANCE."""
    loops = {name: {"steps_taken": run["steps_taken"], "tokens_reached": run["tokens_reached"],
                    "heldout_loss": heldout_loss(run["model"], examples)} for name, run in to_budget.items()}
    worst = max(abs(loop["tokens_reached"] / budget - 1) for loop in loops.values())
    return {"budget": budget, "loops": loops, "worst_off": worst, "tolerance": SFT_TOKEN_TOLERANCE,
            "within": worst <= SFT_TOKEN_TOLERANCE, "base_loss": heldout_loss(base_model, examples),
            "heldout_conversations": len(examples),
            "heldout_trained_tokens": sum(int((labels[1:] != -100).sum()) for _, labels in examples)}


def render_sft(r: dict) -> list[str]:
    c, L = r["chat"], r["max_seq_length"]
    met = {k: "met" if v else "NOT met" for k, v in r["targets"].items()}
    labels = {"packed": "trainrig `launch/sft.py` (default: best-fit packing, padding-free)",
              "grouped": "trainrig `launch/sft.py --no-packing` (length-grouped batches, padded to their longest)",
              "pad_to_max": f"pad-to-max: Qwen's classic `preprocess` + bare PyTorch loop (every sample padded to {L})"}
    trl_labels = {"defaults": "TRL `SFTTrainer`, its defaults (no packing: samples padded to the longest in the batch)",
                  "packing": "TRL `SFTTrainer`, `packing=True` (BFD rows of {L}, padding-free: each micro batch flattened)",
                  "padding_free": "TRL `SFTTrainer`, `padding_free=True` without packing (micro batch flattened)",
                  "all_tokens": "TRL `SFTTrainer`, its defaults, loss on every token (stock template)"}
    trl_variants = [v for v in r.get("trl_variants", []) if f"trl_{v}" in r]
    labels.update({f"trl_{v}": trl_labels.get(v, f"TRL `SFTTrainer` {v}").format(L=L) for v in trl_variants})
    loops = "all " + {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}.get(len(labels), str(len(labels)))
    timed = r["steps"] - r["warmup"]
    timing_note = (f"The {timed} timed steps are as many as one of `--no-packing`'s length-group chunks ({r['length_group']} "
                   "micro batches, sorted longest first), so it is timed on all lengths, not on a chunk's longest batches."
                   if timed == r["length_group"] else
                   f"The {timed} timed steps are not one whole `--no-packing` length-group chunk ({r['length_group']} micro "
                   "batches, sorted longest first), so its figure leans to the lengths those steps drew.")
    lines = [
        f"## (c) SFT on length-skewed chat data, {r['preset']} model, fp32, fused AdamW (median of {r['repeats']})",
        "",
        f"{c['samples']:,} `messages` records ({c['multi_turn']:,} multi-turn), ChatML lengths log-normal in [16, {L}] tokens: "
        f"mean {c['mean_tokens']:.0f}, median {c['median_tokens']:.0f}, max {c['max_tokens']} ({r['kept']:,} kept, "
        f"{r['truncated']} truncated by trainrig). Same model, micro batch {r['micro_batch']} rows of up to {L} tokens, "
        f"{r['steps']} steps (the first {r['warmup']} excluded from timing), constant lr {r['lr']:g}, clip 1.0, for {loops}.",
        "",
        "| loop | non-pad tokens per batch | samples per row | trained tokens/s | non-pad tokens/s | vs pad-to-max | "
        f"trained tokens in the {timed} timed steps | loss, mean of the last {r['loss_steps']} timed steps | runs, trained tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = r["pad_to_max"]["trained_tok_s"]
    for key, label in labels.items():
        x = r[key]
        trained = f"{x['trained_tokens']:,.0f}" if "trained_tokens" in x else "-"
        lines.append(f"| {label} | {x['non_pad']:.1%} | {x['samples_per_row']:.2f} | {x['trained_tok_s']:,.0f} | {x['tok_s']:,.0f} | "
                     f"**{x['trained_tok_s'] / base:.2f}x** | {trained} | {x['loss']:.3f} | {x['all']} |")
    lines += [
        "",
        f"Target non-pad >= 95% with packing: **{met['non_pad']}** ({r['packed']['non_pad']:.1%}). "
        f"Target >= 2x pad-to-max's trained tokens/s: **{met['speedup']}** ({r['ratio']:.2f}x; without packing "
        f"{r['grouped_ratio']:.2f}x).",
        "",
        *_render_sft_trl(r, trl_variants),
        f"Non-pad fraction: for trainrig, plan.json's `batch_fill`, the non-pad share of all positions of the micro "
        f"batches its loader builds in the first epoch (rows padded to the longest in their batch; the packed rows "
        f"themselves use {r['packed']['rows_used']:.1%} of {L} tokens). Pad-to-max, mean length / {L}. "
        f"Trained tokens/s counts labels that are not -100 after the one-token shift; trainrig's rates are the deltas of its "
        f"metrics.jsonl running totals (`trained_tokens`, `tokens`, `elapsed_s`) between step {r['warmup']} and step {r['steps']}, "
        f"the bare loop is timed over the same steps. {timing_note} Each timed run "
        f"is its own process, {loops} interleaved. Trained labels over the whole set (assistant content and its "
        f"`<|im_end|>` in each): trainrig {r['trained_labels']['trainrig']:,}, the pad-to-max preprocess "
        f"{r['trained_labels']['pad_to_max']:,}"
        + "".join(f", TRL {v} {r['trained_labels'][f'trl_{v}']:,}" for v in trl_variants if f"trl_{v}" in r["trained_labels"])
        + ".",
        "",
        *_sft_token_parity(r, labels, loops),
    ]
    return lines


def _sft_token_parity(r: dict, labels: dict, loops: str) -> list[str]:
    """The lines of section (c) on the fairness of the losses: the equal-step counts, then the
    held-out loss of every loop at equal trained tokens T and what still differs."""
    counts = {k: r[k]["trained_tokens"] for k in labels}
    low, high = min(counts, key=counts.get), max(counts, key=counts.get)
    short = {"packed": "trainrig packed", "grouped": "trainrig --no-packing", "pad_to_max": "pad-to-max"}
    name = {k: short.get(k, k.replace("trl_", "TRL ")) for k in labels}
    spr = r["packed"]["samples_per_row"]
    equal_steps = (f"Fairness of the losses. The first table's loss column is at equal steps, not equal data: every loop takes "
                   f"{r['steps']} optimizer steps of {r['micro_batch']} rows, but a packed row holds {spr:.1f} samples, so in "
                   f"the timed steps the loops trained from {counts[low]:,.0f} ({name[low]}) to {counts[high]:,.0f} "
                   f"({name[high]}) tokens, {counts[high] / max(counts[low], 1):.1f}x apart; compare that column only between "
                   "loops with similar counts. ")
    e = r.get("equal_tokens")
    if e is None:
        return [equal_steps + "The held-out loss at equal trained tokens is not measured: results/sft.json predates it; "
                "rerun `bench/run.py --only sft`."]
    T, runs = e["budget"], e["loops"]
    lines = [f"### Held-out loss at equal trained tokens: T = {T:,} ({e['share']:.0%} of the set's trained tokens)", "",
             "| loop | optimizer steps | trained tokens | vs T | held-out loss |", "|---|---:|---:|---:|---:|"]
    for key, label in labels.items():
        x = runs[key]
        lines.append(f"| {label} | {x['steps_taken']:,} | {x['tokens_reached']:,} | {x['tokens_reached'] / T - 1:+.1%} "
                     f"| **{x['heldout_loss']:.3f}** |")
    lines.append(f"| the base model, before SFT | 0 | 0 | - | {e['base_loss']:.3f} |")
    reached = (f"every loop reached T within {e['worst_off']:.1%}" if e["within"] else
               f"**NOT every loop reached T within {e['tolerance']:.0%}** (the worst is {e['worst_off']:.1%} off): "
               "those losses are not at equal data")
    steps = {packed: [runs[k]["steps_taken"] for k in labels if (r[k]["samples_per_row"] > 1) == packed] for packed in (True, False)}
    unequal_steps = ""
    if steps[True] and steps[False]:
        unequal_steps = (f"With the same micro batch and lr, equal data is unequal steps: the packed loops reach T in "
                         f"{min(steps[True]):,}-{max(steps[True]):,} optimizer steps, the padded ones in "
                         f"{min(steps[False]):,}-{max(steps[False]):,}, ~{statistics.mean(steps[False]) / statistics.mean(steps[True]):.1f}x "
                         "as many updates of fewer tokens each; so equal tokens is not equal optimisation, and the held-out "
                         "losses reflect the number of updates as well as the data; what the table rules out is a loop winning "
                         "by training on more (or less) data. ")
    lines += ["", equal_steps
              + f"This table is at equal data: the first repeat's runs go on after their timed steps and stop at the first "
              "step by which they have trained T tokens since step 0 (`launch/sft.py` with the `--max_steps` that a replay of its "
              "own data order gives, checked against its metrics.jsonl; the bare loop and TRL stop themselves; the pad-to-max "
              f"loop's run to T is an in-process run of its code and seed), and {reached}. " + unequal_steps
              + f"They also see different samples in different orders (`--no-packing` in length-sorted chunks, so a run that "
              "stops mid-chunk has trained that chunk's longest samples). The held-out "
              f"loss is one evaluator's (`heldout_loss`) for every saved model: the mean cross-entropy over the "
              f"{e['heldout_trained_tokens']:,} trained tokens (assistant content and its `<|im_end|>`, the labels every loop "
              f"trains) of {e['heldout_conversations']:,} conversations made like the training set with another seed, none of "
              f"them in it. The model is a preset pretrained for one step (a near-random start), so the losses show that "
              f"{loops} loops train, not what SFT achieves."]
    return lines


def _render_sft_trl(r: dict, trl_variants: list[str]) -> list[str]:
    """The TRL SFTTrainer lines of section (c): the target, or why the rows are missing, and its settings."""
    if not trl_variants:
        why = (r.get("trl_skipped") or "not asked for (`bench_sft(trl_variants=())`)" if "trl_variants" in r else
               "not measured: results/sft.json predates them; rerun `bench/run.py --only sft`")
        return [f"TRL `SFTTrainer` rows skipped: {why}.", ""]
    lines = []
    if "trl_ratio" in r:
        met = "met" if r["targets"]["trl_speedup"] else "NOT met"
        others = "".join(f"; vs SFTTrainer {v}: {r[f'trl_{v}_ratio']:.2f}x" for v in trl_variants if v != "defaults")
        lines.append(f"Target >= 1.5x TRL `SFTTrainer` (defaults)'s trained tokens/s: **{met}** ({r['trl_ratio']:.2f}x{others}).")
    else:
        lines.append("No SFTTrainer-defaults run, so the >= 1.5x target is not evaluated"
                     + "".join(f"; trainrig packed vs SFTTrainer {v}: {r[f'trl_{v}_ratio']:.2f}x" for v in trl_variants) + ".")
    version = r[f"trl_{trl_variants[0]}"].get("trl", "?")
    assistant_only = all(r[f"trl_{v}"].get("assistant_only_loss", True) for v in trl_variants)
    lines += ["", f"TRL {version} (`bench/trl_sft.py`, each run its own process): the same model directory, fp32, SDPA, "
              "micro batch, steps, lr (constant, no warmup), AdamW betas 0.9/0.95 eps 1e-8 no weight decay (Trainer's fused "
              "AdamW), clip 1.0 and seed; TRL's gradient-checkpointing default (on) turned off, as neither trainrig (for this "
              "model) nor the bare loop checkpoints; no eval, checkpoints or trackers; all else TRL's defaults (its chat-template "
              "tokenisation, collator, shuffled loader, fused LM head, per-step entropy/accuracy metrics). "
              + ("Loss on assistant tokens only, as the others: `assistant_only_loss=True` with `chat_template_path` set to the "
                 "model's ChatML plus `{% generation %}` markers around each assistant content and its `<|im_end|>` (the "
                 "model's own template has none, and TRL cannot patch it), rendering the same text; TRL's trained labels "
                 "above match trainrig's. "
                 if assistant_only else
                 "Some TRL runs train on every token (the model's template has no `{% generation %}` markers); their trained "
                 "tokens/s count only the assistant tokens, the work the other loops do, and their loss is over all tokens. ")
              + "Timed by a TrainerCallback from the end of step "
              f"{r['warmup']} to the end of step {r['steps']} (data loading and the Trainer's per-step work included); its "
              "non-pad share is that of the batches of those steps. "
              + ("`packing=True` (best-fit decreasing) forces padding-free: each micro batch becomes one flattened row with "
                 "`position_ids` restarting per sample and no attention mask; with SDPA on CPU, transformers rebuilds a "
                 "block-diagonal causal mask from those `position_ids`, so samples stay separate but attention is dense over "
                 "the whole flattened micro batch (no varlen kernel without FlashAttention). "
                 if "packing" in trl_variants else "")]
    return [*lines[:-1], lines[-1].rstrip(), ""]
