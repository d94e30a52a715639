"""Evaluation: exact match and token F1 of greedy answers on question sets, perplexity on text.

Sections, in the order of the training loops where they apply:
config -> runtime -> data -> model -> eval -> save.

Under several ranks the work is split by whole batches: prompts are sorted by length and cut
into batches the same way for any world size, and rank r takes batches r, r + world, ... A batch
is the same tokens with the same padding whichever rank runs it, so the gathered answers equal
one rank's exactly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from trainers.setup import setup_logging
from trainers.step import evaluate_lm
from trainers.config import EvaluateConfig
from trainers.data.chat import ChatRenderer, ChatSettings
from trainers.data.collate import collate_blocks
from trainers.data.evalsets import Question, kind_of, read_questions
from trainers.data.packing import prepare_blocks
from trainers.data.templates import split_reasoning
from trainers.data.sources import resolve_files
from trainers.errors import UsageError, check_output_dir
from trainers.metrics import best_over_references, exact_match, token_f1
from trainers.models import load_for_inference
from trainers.runtime import InferenceRuntime

log = logging.getLogger("trainrig.evaluate")

REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.jsonl"


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the prompts right-aligned, so every answer starts at the
    same position and generation appends to all of them at once."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def batch_plan(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches, longest prompts first (an out-of-memory shows at once), ties by
    index: the same batches for every world size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def prompter(tokenizer, enable_thinking: str = "template") -> ChatRenderer:
    """The chat template's renderer for generation prompts: its shape says which token ends a turn
    and how reasoning is marked; --enable_thinking is checked against the template here."""
    return ChatRenderer(tokenizer, ChatSettings(max_seq_length=1, enable_thinking=enable_thinking))


def generation_prompt(renderer: ChatRenderer, messages: list[dict], tools=None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return renderer.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                                  **kwargs, **renderer.thinking)


def stop_token_ids(renderer: ChatRenderer) -> list[int]:
    """The token that ends an assistant turn in the chat template (<|im_end|> in ChatML), and EOS."""
    tokenizer = renderer.tokenizer
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(renderer.shape.end)}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@torch.no_grad()
def generate_answers(runtime, model, renderer: ChatRenderer, questions: list[Question], batch_size: int, max_new_tokens: int,
                     label: str) -> list[str]:
    """Greedy turns (reasoning included) for `questions`, in their order, on every rank."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    tokenizer = renderer.tokenizer
    prompts = [generation_prompt(renderer, q.messages, q.tools) for q in questions]
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(renderer),
                              pad_token_id=pad_id)  # a fresh config: none of the model's sampling defaults
    mine = batch_plan([len(r) for r in rows], batch_size)[runtime.rank::runtime.world_size]
    bar = tqdm(total=sum(len(b) for b in mine), desc=label, unit="sample", disable=not (runtime.is_main and sys.stderr.isatty()))
    answers = []
    for batch in mine:
        ids, mask = left_padded([rows[i] for i in batch], pad_id)
        out = model.generate(input_ids=ids.to(runtime.device), attention_mask=mask.to(runtime.device), generation_config=config)
        new = out[:, ids.shape[1]:].cpu()
        answers += [(i, tokenizer.decode(row, skip_special_tokens=True).strip()) for i, row in zip(batch, new)]
        bar.update(len(batch))
    bar.close()
    gathered = dict(runtime.gather_objects(answers))
    return [gathered[i] for i in range(len(questions))]


def score(questions: list[Question], turns: list[str], shape) -> list[dict]:
    """EM/F1 of each generated turn's answer; its reasoning, if any, is kept beside it, unscored."""
    scored = []
    for q, turn in zip(questions, turns):
        answer, reasoning = split_reasoning(turn, shape)
        scored.append({"where": q.where, "question": q.messages[-1]["content"], "prediction": answer,
                       **({"reasoning": reasoning} if reasoning else {}), "references": list(q.references),
                       "em": best_over_references(exact_match, answer, list(q.references)),
                       "f1": best_over_references(token_f1, answer, list(q.references))})
    return scored


def dataset_names(files: list[Path]) -> list[str]:
    """A name per file for the report: its stem, with the parent's name where stems repeat."""
    stems = [f.stem for f in files]
    return [f"{f.parent.name}/{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]


def evaluate(cfg: EvaluateConfig) -> dict:
    # ------------------------------------------------------------------------ config
    out = Path(cfg.run.output_dir)
    d = cfg.data
    if not d.eval_files:
        raise UsageError("--eval_files is required: question sets (.jsonl chat or QA records) and/or text files")
    files = resolve_files(d.eval_files, "--eval_files")
    kinds = [kind_of(f, d.text_field) for f in files]  # before the model loads: a bad file fails fast
    check_output_dir(out)

    # ----------------------------------------------------------------------- runtime
    runtime = InferenceRuntime(cfg.run.precision, cfg.run.ddp_timeout)
    setup_logging(runtime.is_main)

    # -------------------------------------------------------------------------- data
    question_sets = {f: read_questions(f, d.chat_format, d.max_samples) for f, k in zip(files, kinds) if k == "questions"}

    # ------------------------------------------------------------------------- model
    model, tokenizer = load_for_inference(cfg.model, runtime.device, runtime.dtype, runtime.precision)
    renderer = prompter(tokenizer, d.enable_thinking) if question_sets else None  # the chat template's prompts and stop token
    positions = getattr(model.config, "max_position_embeddings", None)
    if "text" in kinds and positions is not None and d.block_size > positions:
        raise UsageError(f"--block_size {d.block_size} exceeds the model's {positions} positions; use --block_size {positions} or less")
    log.info("evaluating %s%s on %d rank(s), %s", cfg.model.model_name_or_path,
             f" + adapter {cfg.model.adapter_path}" if cfg.model.adapter_path else "", runtime.world_size, runtime.precision)

    # -------------------------------------------------------------------------- eval
    report = {"model": cfg.model.model_name_or_path, "adapter": cfg.model.adapter_path or None, "datasets": {}}
    predictions = []
    for name, path, kind in zip(dataset_names(files), files, kinds):
        start = time.perf_counter()
        if kind == "questions":
            questions = question_sets[path]
            turns = generate_answers(runtime, model, renderer, questions, d.batch_size, d.max_new_tokens, name)
            scored = score(questions, turns, renderer.shape)
            seconds = time.perf_counter() - start
            result = {"kind": "questions", "file": str(path), "n": len(scored),
                      "em": sum(s["em"] for s in scored) / len(scored), "f1": sum(s["f1"] for s in scored) / len(scored),
                      "seconds": round(seconds, 2), "samples_per_sec": round(len(scored) / seconds, 2)}
            predictions += [{"dataset": name, **s} for s in scored]
            log.info("%s: EM %.3f F1 %.3f over %d questions (%.1f samples/s)", name, result["em"], result["f1"], result["n"],
                     result["samples_per_sec"])
        else:
            blocks = runtime.main_first(lambda: prepare_blocks([str(path)], "--eval_files", tokenizer, d.block_size, d.text_field,
                                                               d.data_cache_dir, 1000, build=runtime.is_main))
            result = {"kind": "text", "file": str(path), **evaluate_lm(runtime, model, blocks, d.batch_size, collate_blocks)}
            model.eval()  # evaluate_lm leaves the model in training mode, for the training loop
            result["seconds"] = round(time.perf_counter() - start, 2)
            log.info("%s: loss %.4f perplexity %.2f over %d tokens", name, result["eval_loss"], result["eval_ppl"], result["eval_tokens"])
        report["datasets"][name] = result

    # -------------------------------------------------------------------------- save
    scored_sets = [r for r in report["datasets"].values() if r["kind"] == "questions"]
    n = sum(r["n"] for r in scored_sets)
    report.update(n=n, em=sum(r["em"] * r["n"] for r in scored_sets) / n if n else None,
                  f1=sum(r["f1"] * r["n"] for r in scored_sets) / n if n else None, world_size=runtime.world_size)
    if runtime.is_main:
        with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as fh:
            for record in predictions:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        log.info("report: %s", out / REPORT_FILE)
    runtime.end()
    return report
