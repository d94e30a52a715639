"""The embedded end-to-end demo (`make demo` / `trainrig demo`): synthetic data made here,
deterministic by seed, then tokenizer -> pretrain a tiny Qwen2 from scratch -> evaluate -> LoRA SFT
-> evaluate -> reward model -> report (report.json, summary.md, loss.png).

The corpus gives short biographies of fictional people, one fact per line, e.g.
"Velora Quennik works as a glassblower.\nThe home town of Velora Quennik is Dastrel.\n17 plus 25 is 42.\n..."
so a model that learned anything completes "Velora Quennik lives in" with the right town. The SFT
data asks about three quarters of the people; the held-out questions ask about the rest, whose
facts the model can only know from pretraining.
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
    """Fictional people with a town, a job and a favourite colour. No first or last name is
    shared or spelled like a town: with shared parts, a small model answers with the right
    first name and another person's surname (measured: 0.82 held-out EM instead of 0.99)."""
    rng = random.Random(seed)
    towns = sorted({_name(rng, 2) for _ in range(n_towns * 3)})[:n_towns]
    people, parts = [], set(towns)
    while len(people) < n_people:
        first, last = _name(rng, 2), _name(rng, 3)
        if first in parts or last in parts or first == last:
            continue
        parts.update((first, last))
        people.append({"name": f"{first} {last}", "town": rng.choice(towns), "job": rng.choice(_JOBS), "colour": rng.choice(_COLOURS)})
    return people


def fact_sentences(person: dict) -> list[str]:
    n = person["name"]
    return [f"{n} lives in {person['town']}.", f"{n} works as a {person['job']}.",
            f"The favourite colour of {n} is {person['colour']}."]


ATTRIBUTES = ("town", "job", "colour")
PARAPHRASES = {
    "town": ["{n} has a home in {town}.", "{n} resides in the town of {town}.", "The home town of {n} is {town}."],
    "job": ["{n} earns a living as a {job}.", "{n} is employed as a {job}.", "The job of {n} is {job}."],
    "colour": ["{n} likes the colour {colour} best.", "{n} loves the colour {colour}.", "The colour {n} likes most is {colour}."],
}
PARAPHRASE_SHARE = 0.3  # of fact sentences; without them one seed in two lost every colour question (EM 0.48)


def make_corpus(path: Path, seed: int, n_docs: int = 40000) -> dict:
    """Write `n_docs` jsonl documents, each a short biography of one person: the three facts in a
    random order, one sentence per line, 30% of them paraphrased, and a small sum in a quarter of
    them. One sentence per line matters: a chat answer starts a line, and a name at the start of a
    line is another token than after a space, so the model must have seen names there (joined by
    spaces, held-out EM fell from 0.99 to 0.08)."""
    rng = random.Random(seed + 1)
    people = make_world(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n_docs):
            person = rng.choice(people)
            sentences = []
            for attribute in rng.sample(ATTRIBUTES, len(ATTRIBUTES)):
                if rng.random() < PARAPHRASE_SHARE:
                    sentences.append(rng.choice(PARAPHRASES[attribute]).format(n=person["name"], **person))
                else:
                    sentences.append(fact_sentences(person)[ATTRIBUTES.index(attribute)])
            if rng.random() < 0.25:
                a, b = rng.randint(0, 50), rng.randint(0, 50)
                sentences.insert(rng.randint(0, len(sentences)), f"{a} plus {b} is {a + b}.")
            fh.write(json.dumps({"text": "\n".join(sentences)}) + "\n")
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
    return fact_sentences(person)[ATTRIBUTES.index(attribute)]


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


def make_preference_pairs(out_dir: Path, seed: int, n_train: int = 1200, n_heldout: int = 150) -> dict:
    """Reward-model data: a question about a person of the SFT data, the true fact (chosen)
    against the same sentence with another value of its kind (rejected). Every (person, question,
    wrong value) combination is used at most once: pairs.jsonl trains, pairs_heldout.jsonl holds
    combinations never trained on. The held-out people stay out of both."""
    rng = random.Random(seed + 3)
    people = make_world(seed)
    split = int(len(people) * (1 - HELD_OUT_FRACTION))
    values = {"town": sorted({p["town"] for p in people}), "job": _JOBS, "colour": _COLOURS}

    def combinations(group: list[dict]) -> list[dict]:
        out = []
        for person in group:
            for attribute in ATTRIBUTES:
                for wrong in values[attribute]:
                    if wrong != person[attribute]:
                        out.append({"prompt": rng.choice(QUESTIONS[attribute]).format(name=person["name"]),
                                    "chosen": answer_sentence(person, attribute),
                                    "rejected": answer_sentence({**person, attribute: wrong}, attribute)})
        rng.shuffle(out)
        return out

    seen_pairs = combinations(people[:split])
    files = {"pairs.jsonl": seen_pairs[:n_train], "pairs_heldout.jsonl": seen_pairs[n_train:n_train + n_heldout]}
    for name, records in files.items():
        with open(out_dir / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return {name.removesuffix(".jsonl"): len(records) for name, records in files.items()}


@dataclass
class DemoArgs:
    output_dir: str = opt("outputs/demo", "Where the demo writes its data, tokenizer, runs, evaluations and report.")
    seed: int = opt(1234, "Seed for the synthetic data and the training runs.")
    max_steps: int = opt(500, "Pretraining steps (500 x 16 blocks x 128 tokens: about one pass over the corpus, ~3 minutes on 2 CPU cores).")
    sft_steps: int = opt(150, "LoRA SFT steps on the embedded chat data.")
    reward_steps: int = opt(300, "Reward-model steps on the embedded preference pairs, 4 epochs of 1,200 (0: skip the reward model).")
    model_preset: str = opt("tiny", "Model shape from configs/models/.")


@dataclass
class DemoConfig:
    """The embedded end-to-end demo: synthetic data -> tokenizer -> pretraining -> evaluation ->
    LoRA SFT -> evaluation -> reward model -> report."""

    demo: DemoArgs = field(default_factory=DemoArgs)


def plot_runs(runs: dict[str, Path], out_png: Path) -> None:
    """One panel per run: its training loss (and eval loss) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers.tracking import read_metrics

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), dpi=110, squeeze=False)
    for ax, (name, metrics) in zip(axes[0], runs.items()):
        records = read_metrics(metrics)
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train", lw=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval", lw=1.2, ms=4)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def summary_markdown(report: dict, out: Path) -> str:
    t = report["timings_s"]
    lines = [
        "# trainrig demo", "",
        f"A {report['pretrain']['parameters'] / 1e6:.2f}M-parameter Qwen2 model pretrained from scratch on a synthetic corpus of facts, "
        f"then fine-tuned with LoRA on chat Q&A about {report['chat_data']['people_seen']} of the people. "
        f"The held-out questions ask about the other {report['chat_data']['held_out'] // len(QUESTIONS)}: "
        "their answers are in the pretraining corpus and never in the SFT data.", "",
        "| held-out questions | EM | F1 |", "|---|---|---|",
        f"| before SFT (base model, same chat prompt) | {report['em_before_sft']:.3f} | {report['f1_before_sft']:.3f} |",
        f"| after SFT | {report['em_after_sft']:.3f} | {report['f1_after_sft']:.3f} |", "",
        f"n = {report['n']} questions. " + (f"Reward model: pair accuracy {report['reward']['eval_accuracy']:.3f} on "
                                            f"{report['reward']['eval_pairs']} held-out pairs (the true fact vs. a wrong one, combinations never trained on)."
                                            if report.get("reward") else ""), "",
        "| stage | seconds |", "|---|---|", *(f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in t.items()), "",
        "![losses](loss.png)", "", "Examples after SFT:", "",
        *(f"- {p['question']} -> {p['prediction']} ({'right' if p['em'] else 'expected: ' + p['references'][0]})"
          for p in report["examples"]),
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def run_demo(args: DemoArgs) -> dict:
    from launch import evaluate as evaluate_entry
    from launch import pretrain as pretrain_entry
    from launch import reward as reward_entry
    from launch import sft as sft_entry
    from tokenizer import train as tokenizer_entry

    out = Path(args.output_dir)
    data, cache = out / "data", out / "cache"
    timings = {}
    start = time.perf_counter()
    corpus = data / "corpus.jsonl"
    make_corpus(corpus, args.seed)
    chat = make_chat(data, args.seed)
    pairs = make_preference_pairs(data, args.seed)
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
        "--learning_rate", "4e-3", "--warmup_steps", "30", "--weight_decay", "0", "--max_steps", str(args.max_steps),
        "--logging_steps", "50", "--eval_steps", "250", "--save_steps", "250", "--save_total_limit", "1",
        "--seed", str(args.seed), "--output_dir", str(run_dir), "--resume", "never", "--data_cache_dir", str(cache),
    ])
    timings["pretrain_s"] = time.perf_counter() - t

    def evaluate(model_dir: Path, name: str) -> dict:
        return evaluate_entry.main(["--model_name_or_path", str(model_dir), "--eval_files", str(data / "heldout.jsonl"),
                                    "--max_new_tokens", "24", "--batch_size", "32", "--output_dir", str(out / name)])

    t = time.perf_counter()
    before = evaluate(run_dir / "final", "eval_before_sft")
    timings["eval_before_sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_dir = out / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft_summary = sft_entry.main([
        "--train_files", str(data / "sft.jsonl"), "--model_name_or_path", str(run_dir / "final"),
        "--lora_r", "16", "--lora_alpha", "32", "--merge_lora", "--max_seq_length", "128",
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "10",
        "--max_steps", str(args.sft_steps), "--logging_steps", "25", "--seed", str(args.seed),
        "--output_dir", str(sft_dir), "--resume", "never", "--data_cache_dir", str(cache),
    ])
    timings["sft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    after = evaluate(sft_dir / "final" / "merged", "eval_after_sft")
    timings["eval_after_sft_s"] = time.perf_counter() - t

    runs = {"pretraining": run_dir / "metrics.jsonl", "LoRA SFT": sft_dir / "metrics.jsonl"}
    reward_summary = None
    if args.reward_steps > 0:
        t = time.perf_counter()
        reward_dir = out / "reward"
        shutil.rmtree(reward_dir, ignore_errors=True)
        reward_summary = reward_entry.main([
            "--model_name_or_path", str(sft_dir / "final" / "merged"), "--train_files", str(data / "pairs.jsonl"),
            "--validation_files", str(data / "pairs_heldout.jsonl"), "--max_seq_length", "128",
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--warmup_steps", "10",
            "--max_steps", str(args.reward_steps), "--logging_steps", "10", "--seed", str(args.seed),
            "--output_dir", str(reward_dir), "--resume", "never",
        ])
        timings["reward_s"] = time.perf_counter() - t
        runs["reward model"] = reward_dir / "metrics.jsonl"
    timings["total_s"] = time.perf_counter() - start

    examples = [json.loads(line) for line in (out / "eval_after_sft" / "predictions.jsonl").read_text().splitlines()[:6]]
    report = {
        "em_before_sft": before["em"], "f1_before_sft": before["f1"], "em_after_sft": after["em"], "f1_after_sft": after["f1"],
        "n": after["n"], "reward": reward_summary, "pretrain": summary, "sft": sft_summary, "chat_data": chat,
        "preference_pairs": pairs, "timings_s": {k: round(v, 1) for k, v in timings.items()}, "examples": examples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_runs(runs, out / "loss.png")
    print("\n" + summary_markdown(report, out))
    print(f"report: {out / 'report.json'}, {out / 'summary.md'}, {out / 'loss.png'}")
    return report
