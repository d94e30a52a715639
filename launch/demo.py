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


QUESTIONS = {
    "town": ["Where does {name} live?", "In which town does {name} live?", "Which town is home to {name}?"],
    "job": ["What does {name} work as?", "What is the job of {name}?", "What does {name} do for a living?"],
    "colour": ["What is the favourite colour of {name}?", "Which colour does {name} like best?"],
}
SYSTEM_PROMPT = "Answer with the fact."
HELD_OUT_FRACTION = 0.25  # people whose facts are only in the corpus, never in the SFT data


def answer_sentence(person: dict, attribute: str) -> str:
    """The answer, in the corpus's own words, so SFT teaches the format and recall comes from pretraining."""
    return fact_sentences(person)[("town", "job", "colour").index(attribute)]


def qa_pair(rng: random.Random, person: dict) -> tuple[str, str]:
    attribute = rng.choice(sorted(QUESTIONS))
    return rng.choice(QUESTIONS[attribute]).format(name=person["name"]), answer_sentence(person, attribute)


def sum_pair(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def make_chat(out_dir: Path, seed: int, n_train: int = 2000) -> dict:
    """SFT conversations about 3/4 of the world's people (1-3 question/answer turns, a system
    prompt in a third of them) -> sft.jsonl; one question per fact of the other quarter ->
    heldout.jsonl, whose answers the model can only know from pretraining."""
    rng = random.Random(seed + 2)
    people = make_world(seed)
    split = int(len(people) * (1 - HELD_OUT_FRACTION))
    seen, held_out = people[:split], people[split:]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sft.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(n_train):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 1 / 3 else []
            for _ in range(rng.choice([1, 1, 2, 3])):
                question, answer = sum_pair(rng) if rng.random() < 0.2 else qa_pair(rng, rng.choice(seen))
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    with open(out_dir / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for person in held_out:
            for attribute in sorted(QUESTIONS):
                question = rng.choice(QUESTIONS[attribute]).format(name=person["name"])
                fh.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer_sentence(person, attribute)}]}) + "\n")
    return {"train": n_train, "held_out": len(held_out) * len(QUESTIONS), "people_seen": len(seen)}


@dataclass
class DemoArgs:
    output_dir: str = opt("outputs/demo", "Where the demo writes its data, tokenizer, run and report.")
    seed: int = opt(1234, "Seed for the synthetic data and the training run.")
    max_steps: int = opt(300, "Pretraining steps (300 take about 2 minutes on 2 CPU cores).")
    sft_steps: int = opt(150, "LoRA SFT steps on the embedded chat data.")
    model_preset: str = opt("tiny", "Model shape from configs/models/.")


@dataclass
class DemoConfig:
    """The embedded end-to-end demo: synthetic corpus and chat data -> tokenizer -> pretraining -> LoRA SFT -> answers."""

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


def chat_answers(model_dir: Path, questions: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers of a chat model, generation stopped at <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=im_end,
                                       pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_demo(args: DemoArgs) -> dict:
    from launch import pretrain as pretrain_entry
    from launch import sft as sft_entry
    from tokenizer import train as tokenizer_entry

    out = Path(args.output_dir)
    timings = {}
    start = time.perf_counter()
    corpus = out / "data" / "corpus.jsonl"
    make_corpus(corpus, args.seed)
    chat = make_chat(out / "data", args.seed)
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

    t = time.perf_counter()
    sft_dir = out / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft_summary = sft_entry.main([
        "--train_files", str(out / "data" / "sft.jsonl"), "--model_name_or_path", str(run_dir / "final"),
        "--lora_r", "16", "--lora_alpha", "32", "--merge_lora", "--max_seq_length", "128",
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "10",
        "--max_steps", str(args.sft_steps), "--logging_steps", "25", "--seed", str(args.seed),
        "--output_dir", str(sft_dir), "--resume", "never", "--data_cache_dir", str(out / "cache"),
    ])
    timings["sft_s"] = time.perf_counter() - t

    people = make_world(args.seed)
    prompts = [f"{people[0]['name']} lives in", f"{people[1]['name']} works as a", "12 plus 7 is"]
    samples = sample_text(run_dir / "final", prompts)
    expected = [people[0]["town"], people[1]["job"], "19"]
    held_out = people[int(len(people) * (1 - HELD_OUT_FRACTION)):]
    questions = [(f"Where does {people[2]['name']} live?", answer_sentence(people[2], "town")),
                 ("What is 12 plus 7?", "12 plus 7 is 19."),
                 (f"Where does {held_out[0]['name']} live?", answer_sentence(held_out[0], "town")),
                 (f"What is the job of {held_out[1]['name']}?", answer_sentence(held_out[1], "job"))]
    answers = chat_answers(sft_dir / "final" / "merged", [q for q, _ in questions])
    report = {
        "pretrain": summary, "sft": sft_summary, "chat_data": chat, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples": [{"prompt": p, "continuation": s, "expected_fact": e, "fact_recalled": e in s.split(".")[0]}
                    for p, s, e in zip(prompts, samples, expected)],
        "answers": [{"question": q, "answer": a, "expected": e, "correct": a == e, "held_out": i >= 2}
                    for i, ((q, e), a) in enumerate(zip(questions, answers))],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n=== trainrig demo ===")
    print(f"pretrained {summary['parameters'] / 1e6:.2f}M parameters for {summary['step']} steps in "
          f"{timings['pretrain_s']:.0f} s; final eval loss {summary.get('eval_loss', float('nan')):.3f} "
          f"(perplexity {summary.get('eval_ppl', float('nan')):.2f})")
    for sample in report["samples"]:
        mark = "ok " if sample["fact_recalled"] else "-- "
        print(f"{mark}{sample['prompt']!r} -> {sample['continuation']!r} (fact: {sample['expected_fact']})")
    print(f"LoRA SFT: {sft_summary['trainable_parameters']:,} trained parameters, {sft_summary['step']} steps in "
          f"{timings['sft_s']:.0f} s, {sft_summary['data']['kept']} conversations; loss {sft_summary['loss']:.3f}, "
          f"eval loss {sft_summary.get('eval_loss', float('nan')):.3f}")
    for item in report["answers"]:
        mark = "ok " if item["correct"] else "-- "
        print(f"{mark}{item['question']!r} -> {item['answer']!r} (expected {item['expected']}"
              f"{', held out of the SFT data' if item['held_out'] else ''})")
    print(f"report: {out / 'report.json'}, loss curves: {run_dir / 'loss.png'}, {sft_dir / 'loss.png'}")
    return report
