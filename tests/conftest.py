"""Shared fixtures: a small synthetic corpus, a tokenizer trained on it, and launcher helpers.
Everything is built in-process on CPU; nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

# the stages tests/reliability/ runs its core cases for (pytest puts tests/ on sys.path for this file)
from reliability.stages import TRAINING_STAGES, StageRun

# The suite runs on CPU everywhere, also on a GPU box (it asserts fp32 results and CPU ranks)
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory):
    """A private block cache and no trackers phoning home."""
    os.environ["TRAINRIG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # DeepSpeed JIT-builds its CPU comm op once (~90 s); keep the build beside this venv, so another
    # venv with another torch never loads it
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from trainers.data.synthetic import make_corpus

    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    make_corpus(path, seed=7, n_docs=1500)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from trainers.tokenizer import main

    out = tmp_path_factory.mktemp("tok")
    main(["--train_files", str(corpus), "--vocab_size", "600", "--min_frequency", "2", "--output_dir", str(out)])
    return out


def pretrain_args(corpus, tokenizer_dir, output_dir, **overrides) -> list[str]:
    """A tiny, fast pretraining command line; overrides are flag=value (None drops the flag)."""
    flags = {"train_files": str(corpus), "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny",
             "block_size": "32", "per_device_train_batch_size": "4", "max_steps": "6", "logging_steps": "1",
             "learning_rate": "1e-3", "output_dir": str(output_dir), "resume": "never", "seed": "3"}
    flags.update(overrides)
    return _argv(flags)


def read_losses(output_dir: Path) -> dict[int, float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_same_losses(reference: dict[int, float], out: Path, tolerance: float = 1e-5) -> None:
    """The run in `out` logged the steps of `reference` and each step's loss within `tolerance`
    (the multi-rank tests: a missing 1/world or an unsynced rank moves the loss 1e-3 or more)."""
    got = read_losses(out)
    assert sorted(got) == sorted(reference), (got, reference)
    worst = max(abs(got[s] - reference[s]) for s in reference)
    assert worst < tolerance, f"max |loss difference| {worst:.2e}\nsingle {reference}\nmulti  {got}"


def free_port() -> int:
    """A free TCP port for a launcher's rendezvous (each test its own: no clash with a lingering one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; fail the test with its output on error."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{VENV_BIN}:{full_env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# Qwen2.5's template in its plain-chat part: a default system prompt when the conversation has none
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def qwen_style_tokenizer_dir(corpus, tmp_path_factory) -> Path:
    """A second byte-level BPE tokenizer: another vocabulary (trained with CJK, emoji and code),
    GPT-2's pre-split instead of Qwen2's, EOS <|im_end|>, and a template that injects a default
    system prompt, like Qwen2.5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    extra = ["你好，世界！今天天气很好。", "函数 def f(x):\n    return x * 2\n", "😀 🎉 emoji 🚀", "  leading spaces\n\nand newlines"] * 50
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:800]] + extra
    trainer = trainers.BpeTrainer(vocab_size=900, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      extra_special_tokens=specials[1:])
    wrapped.chat_template = QWEN_STYLE_TEMPLATE
    out = tmp_path_factory.mktemp("qwen_style_tok")
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> Path:
    """The demo's chat data (seed 7, the corpus's world): sft.jsonl and heldout.jsonl."""
    from trainers.data.synthetic import make_chat

    out = tmp_path_factory.mktemp("chat")
    make_chat(out, seed=7, n_train=400)
    return out


@pytest.fixture(scope="session")
def sft_model_dir(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny model pretrained for a few steps: the base every SFT test fine-tunes."""
    from launch.pretrain import main

    out = tmp_path_factory.mktemp("base")
    main(pretrain_args(corpus, tokenizer_dir, out, block_size=64, max_steps=20, learning_rate=3e-3))
    return out / "final"


def sft_args(chat_dir, model_dir, output_dir, **overrides) -> list[str]:
    """A tiny, fast SFT command line; overrides are flag=value (None drops the flag)."""
    flags = {"train_files": str(chat_dir / "sft.jsonl"), "model_name_or_path": str(model_dir), "max_seq_length": "128",
             "per_device_train_batch_size": "4", "max_steps": "6", "logging_steps": "1", "learning_rate": "1e-3",
             "output_dir": str(output_dir), "resume": "never", "seed": "3", "validation_split_ratio": "0.05"}
    flags.update(overrides)
    return _argv(flags)


def toy_pairs(path, n: int, seed: int) -> Path:
    """Preference pairs whose answers are marked by their words: the chosen one says it is right,
    the rejected one wrong (a toy set a reward model learns in a few dozen steps)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        records.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}, certainly right.",
                        "rejected": f"{a} plus {b} is {a + b + rng.randint(1, 9)}, surely wrong."})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return Path(path)


@pytest.fixture(scope="session")
def preference_pairs(tmp_path_factory) -> Path:
    """200 toy preference pairs (pairs.jsonl) for the reward model."""
    return toy_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 200, seed=0)


def reward_args(pairs_file, model_dir, output_dir, **overrides) -> list[str]:
    """A tiny, fast reward-model command line; overrides are flag=value (None drops the flag)."""
    flags = {"train_files": str(pairs_file), "model_name_or_path": str(model_dir), "max_seq_length": "64",
             "per_device_train_batch_size": "4", "max_steps": "6", "logging_steps": "1", "learning_rate": "1e-3",
             "output_dir": str(output_dir), "resume": "never", "seed": "3", "validation_split_ratio": "0.05"}
    flags.update(overrides)
    return _argv(flags)


def dpo_args(pairs_file, model_dir, output_dir, **overrides) -> list[str]:
    """A tiny, fast DPO command line; overrides are flag=value (None drops the flag)."""
    flags = {"train_files": str(pairs_file), "model_name_or_path": str(model_dir), "max_seq_length": "64",
             "per_device_train_batch_size": "4", "max_steps": "6", "logging_steps": "1", "learning_rate": "1e-3",
             "output_dir": str(output_dir), "resume": "never", "seed": "3", "validation_split_ratio": "0.05",
             "data_cache_dir": str(Path(output_dir).parent / "reference-cache")}
    flags.update(overrides)
    return _argv(flags)


# ------------------------------------------------------------------------ every training stage

# stage -> (entry script, the session fixtures its command line is built from, that builder,
#           the training file among those fixtures, fail_fast flags)
_STAGE_SPECS = {
    "pretrain": ("launch/pretrain.py", ("corpus", "tokenizer_dir"), pretrain_args, lambda corpus, tok: corpus, {}),
    "sft": ("launch/sft.py", ("chat_dir", "sft_model_dir"), sft_args, lambda chat, model: chat / "sft.jsonl", {"strict": True}),
    "reward": ("launch/reward.py", ("preference_pairs", "sft_model_dir"), reward_args, lambda pairs, model: pairs, {}),
    "dpo": ("launch/dpo.py", ("preference_pairs", "sft_model_dir"), dpo_args, lambda pairs, model: pairs, {}),
}


@pytest.fixture(scope="session")
def stage_run(request) -> Callable[[str], StageRun]:
    """stage_run(stage) -> StageRun. A stage's fixtures are built only when a test asks for it
    (pretraining alone needs no chat data or base model)."""
    import importlib

    assert set(_STAGE_SPECS) == set(TRAINING_STAGES), "every stage in TRAINING_STAGES needs an entry in _STAGE_SPECS"

    def build(stage: str) -> StageRun:
        script, fixture_names, builder, train_file, fail_fast = _STAGE_SPECS[stage]
        inputs = [request.getfixturevalue(name) for name in fixture_names]
        main = importlib.import_module(script.removesuffix(".py").replace("/", ".")).main
        return StageRun(script, lambda output_dir, **overrides: builder(*inputs, output_dir, **overrides), main,
                        Path(train_file(*inputs)), dict(fail_fast))

    return build


@pytest.fixture(scope="session")
def reference_losses(stage_run, tmp_path_factory) -> Callable[..., dict[int, float]]:
    """reference_losses(stage, **overrides) -> {step: loss} of an uninterrupted in-process run,
    computed once per stage and overrides for the whole session (--save_steps changes no loss)."""
    cache: dict = {}

    def losses(stage: str, **overrides) -> dict[int, float]:
        key = (stage, tuple(sorted((k, str(v)) for k, v in overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"uninterrupted_{stage}")
            stage_run(stage).main(stage_run(stage).args(out, **overrides))
            cache[key] = read_losses(out)
        return dict(cache[key])

    return losses


def _argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv
