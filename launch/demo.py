"""The embedded end-to-end demo (`make demo` / `trainrig demo`): synthetic data made here,
deterministic by seed, then tokenizer -> pretrain a tiny Qwen2 from scratch -> sample text.

The corpus states facts about fictional people and places and small sums, e.g.
"Velora Quennik lives in Dastrel. Velora Quennik works as a glassblower. 17 plus 25 is 42."
so a model that learned anything completes "Velora Quennik lives in" with the right town.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainers.config import opt

log = logging.getLogger("trainrig.demo")

_SYLLABLES = ["ka", "ve", "lo", "ra", "quen", "dor", "mi", "sal", "tor", "bel", "nix", "ar", "os", "thi", "um", "el", "vy", "drel"]
_JOBS = ["glassblower", "ferryman", "beekeeper", "cartographer", "weaver", "lamplighter", "potter", "clockmaker",
         "herbalist", "shipwright", "baker", "stonemason"]
_COLOURS = ["amber", "teal", "crimson", "ivory", "olive", "violet", "cobalt", "saffron"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def make_world(seed: int, n_people: int = 120, n_towns: int = 16) -> list[dict]:
    """Fictional people with a town, a job and a favourite colour; unique names."""
    rng = random.Random(seed)
    towns = sorted({_name(rng, 2) for _ in range(n_towns * 3)})[:n_towns]
    people, seen = [], set()
    while len(people) < n_people:
        name = f"{_name(rng, 2)} {_name(rng, 3)}"
        if name in seen:
            continue
        seen.add(name)
        people.append({"name": name, "town": rng.choice(towns), "job": rng.choice(_JOBS), "colour": rng.choice(_COLOURS)})
    return people


def fact_sentences(person: dict) -> list[str]:
    n = person["name"]
    return [f"{n} lives in {person['town']}.", f"{n} works as a {person['job']}.",
            f"The favourite colour of {n} is {person['colour']}."]


def make_corpus(path: Path, seed: int, n_docs: int = 6000) -> dict:
    """Write `n_docs` jsonl documents: shuffled facts about the world plus small sums."""
    rng = random.Random(seed + 1)
    people = make_world(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n_docs):
            sentences = []
            for person in rng.sample(people, 2):
                sentences += rng.sample(fact_sentences(person), 2)
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            sentences.append(f"{a} plus {b} is {a + b}.")
            rng.shuffle(sentences)
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return {"documents": n_docs, "people": len(people)}


@dataclass
class DemoArgs:
    output_dir: str = opt("outputs/demo", "Where the demo writes its data, tokenizer, run and report.")
    seed: int = opt(1234, "Seed for the synthetic data and the training run.")
    max_steps: int = opt(300, "Pretraining steps (300 take about 2 minutes on 2 CPU cores).")
    model_preset: str = opt("tiny", "Model shape from configs/models/.")


@dataclass
class DemoConfig:
    """The embedded end-to-end demo: synthetic corpus -> tokenizer -> pretraining -> sample text."""

    demo: DemoArgs = field(default_factory=DemoArgs)


def sample_text(model_dir: Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy continuations from the trained model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def run_demo(args: DemoArgs) -> dict:
    from launch import pretrain as pretrain_entry
    from tokenizer import train as tokenizer_entry

    out = Path(args.output_dir)
    timings = {}
    start = time.perf_counter()
    corpus = out / "data" / "corpus.jsonl"
    make_corpus(corpus, args.seed)
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    tokenizer_entry.main(["--train_files", str(corpus), "--vocab_size", "1024", "--min_frequency", "2",
                          "--output_dir", str(out / "tokenizer")])
    timings["tokenizer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = out / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts fresh every time
    summary = pretrain_entry.main([
        "--train_files", str(corpus), "--tokenizer_name_or_path", str(out / "tokenizer"),
        "--model_preset", args.model_preset, "--block_size", "128", "--per_device_train_batch_size", "16",
        "--learning_rate", "3e-3", "--warmup_steps", "20", "--max_steps", str(args.max_steps),
        "--logging_steps", "20", "--eval_steps", "100", "--save_steps", "200", "--save_total_limit", "1",
        "--seed", str(args.seed), "--output_dir", str(run_dir), "--resume", "never",
        "--data_cache_dir", str(out / "cache"),
    ])
    timings["pretrain_s"] = time.perf_counter() - t

    people = make_world(args.seed)
    prompts = [f"{people[0]['name']} lives in", f"{people[1]['name']} works as a", "12 plus 7 is"]
    samples = sample_text(run_dir / "final", prompts)
    expected = [people[0]["town"], people[1]["job"], "19"]
    report = {
        "pretrain": summary, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples": [{"prompt": p, "continuation": s, "expected_fact": e, "fact_recalled": e in s.split(".")[0]}
                    for p, s, e in zip(prompts, samples, expected)],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n=== trainrig demo ===")
    print(f"pretrained {summary['parameters'] / 1e6:.2f}M parameters for {summary['step']} steps in "
          f"{timings['pretrain_s']:.0f} s; final eval loss {summary.get('eval_loss', float('nan')):.3f} "
          f"(perplexity {summary.get('eval_ppl', float('nan')):.2f})")
    for sample in report["samples"]:
        mark = "ok " if sample["fact_recalled"] else "-- "
        print(f"{mark}{sample['prompt']!r} -> {sample['continuation']!r} (fact: {sample['expected_fact']})")
    print(f"report: {out / 'report.json'}, loss curve: {run_dir / 'loss.png'}")
    return report
