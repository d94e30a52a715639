"""Synthetic data, deterministic by seed, for the demo, the tests and the benchmarks: nothing is
downloaded. A small world of fictional people gives a text corpus (one fact per line), chat data
asking about them and preference pairs (the true fact against a wrong one).

The corpus gives short biographies, e.g.
"Velora Quennik works as a glassblower.\nThe home town of Velora Quennik is Dastrel.\n17 plus 25 is 42.\n..."
so a model that learned anything completes "Velora Quennik lives in" with the right town. The SFT
data asks about three quarters of the people; the held-out questions ask about the rest, whose
facts the model can only know from pretraining.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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


# ------------------------------------------------------------------------------ a Zipf corpus
# Natural-text-like documents with no facts in them, for a tokenizer the size of Qwen's and a
# corpus of any size (bench/gpu.py, section (e)): not the fact world above.

# Pseudo-words from syllables, so BPE finds sub-word structure as it does in natural text
ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "pr", "sh", "sk", "sl", "sp", "st", "str", "th", "tr"]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rk", "st", "ck", "x"]  # "" thrice: open syllables are common
# A BPE of Qwen's size needs ~150k merges seen at least twice (tokenizer/train.py's --min_frequency 2).
# Zipf(1) draws of ~360 words per document from a lexicon 40x the documents leave ~200k distinct words
# seen twice or more at 10,000 documents (194k measured); the trainer then reaches exactly 151,936 (54 s on 2 cores).
LEXICON_PER_DOCUMENT = 40


def make_lexicon(rng, size: int) -> list[str]:
    """`size` distinct pseudo-words of 1-4 syllables (mostly 2-3, as English words)."""
    syllables = [o + v + c for o in ONSETS for v in NUCLEI for c in CODAS]
    words: dict[str, None] = {}  # insertion-ordered set: the same lexicon for the same seed
    while len(words) < size:
        lengths = rng.choice([1, 2, 3, 4], p=[0.2, 0.4, 0.3, 0.1], size=size)
        parts = rng.integers(len(syllables), size=(size, 4)).tolist()
        for n, picks in zip(lengths.tolist(), parts):
            words.setdefault("".join(syllables[i] for i in picks[:n]), None)
    return list(words)[:size]


def make_zipf_corpus(path: Path, documents: int, seed: int = 0) -> dict:
    """jsonl documents of Zipf-distributed pseudo-words (rank r drawn with probability ~ 1/r, as words
    in natural text): log-normal lengths (median 300 words), sentences of 12 words on average,
    capitalised and full-stopped, a paragraph break after one sentence in 8."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lexicon = make_lexicon(rng, max(1000, LEXICON_PER_DOCUMENT * documents))
    cdf = np.cumsum(1.0 / np.arange(1, len(lexicon) + 1))
    cdf /= cdf[-1]
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, size=documents), 20, 3000).astype(int)
    words = np.searchsorted(cdf, rng.random(int(lengths.sum()))).tolist()
    sentence_ends = (rng.random(len(words)) < 1 / 12).tolist()
    paragraph_ends = (rng.random(len(words)) < 1 / 8).tolist()
    at = 0
    with open(path, "w", encoding="utf-8") as fh:
        for n in lengths.tolist():
            text, capital = [], True
            for i in range(at, at + n):
                word = lexicon[words[i]].capitalize() if capital else lexicon[words[i]]
                capital = sentence_ends[i] or i == at + n - 1
                text.append(word + ("." + ("\n" if paragraph_ends[i] else " ") if capital else " "))
            at += n
            fh.write(json.dumps({"text": "".join(text).strip()}) + "\n")
    return {"documents": documents, "words": len(words), "lexicon": len(lexicon), "bytes": path.stat().st_size}
