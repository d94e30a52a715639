"""Train a byte-level BPE tokenizer with ChatML special tokens and chat template (`tokenizer/train.py`,
`trainrig tokenizer`).

    python tokenizer/train.py --train_files corpus.jsonl --vocab_size 32000 --output_dir tok/

The corpus is streamed into HF `tokenizers` (never held in memory). The output directory loads
with `AutoTokenizer.from_pretrained(dir)`, and `apply_chat_template` renders ChatML:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainers.config import opt, parse_config
from trainers.data.chat import CHATML_TEMPLATE
from trainers.data.sources import iter_document_batches, resolve_files
from trainers.errors import UsageError, check_output_dir, exit_on_usage_error

log = logging.getLogger("trainrig.tokenizer")

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
# Ids 0..3 in this order. Pad is its own token, so no loss mask can confuse padding with a
# real end-of-text (the classic Qwen scripts' ignore-index-equals-pad-id bug cannot arise).
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

@dataclass
class TokenizerArgs:
    train_files: list[str] = opt(None, "Corpus: .txt, .jsonl/.json (a text field), .parquet or a datasets directory; several allowed.", factory=list)
    output_dir: str = opt("outputs/tokenizer", "Where tokenizer.json, tokenizer_config.json and chat_template.jinja go.")
    vocab_size: int = opt(32000, "Vocabulary size including the 256 byte symbols and the special tokens.")
    min_frequency: int = opt(2, "A merge must occur at least this often to be learned.")
    text_field: str = opt("text", "Field holding the text in jsonl/parquet/datasets input.")
    model_max_length: int = opt(32768, "Longest sequence the tokenizer reports as supported (tokenizer_config.json).")


@dataclass
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer with <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|> and a ChatML template."""

    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)


# Qwen2's pre-tokenizer split: digits one by one, runs of newlines kept together. transformers 5
# rebuilds exactly this pipeline (Qwen2Tokenizer: NFC, this split, byte-level) whenever it loads a
# tokenizer from a qwen2 model directory, whatever tokenizer.json says; with any other split a
# model's final/ would tokenize unlike the data it was trained on.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_bpe_tokenizer():
    """An untrained byte-level BPE `tokenizers.Tokenizer`, the pipeline of Qwen2's tokenizer (NFC,
    Qwen2 split, byte-level; no post-processor, so offsets cover whole tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap_for_transformers(tok, model_max_length: int):
    """The fast tokenizer `AutoTokenizer` will load, with roles of the special tokens and the template."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END], model_max_length=model_max_length,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def train_tokenizer(args: TokenizerArgs) -> dict:
    """Stream the corpus through the BPE trainer and save; returns the stats it logs."""
    from tokenizers import pre_tokenizers, trainers

    files = resolve_files(args.train_files, "--train_files")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UsageError(f"--vocab_size {args.vocab_size} is too small: 256 byte symbols + {len(SPECIAL_TOKENS)} special tokens need at least {256 + len(SPECIAL_TOKENS) + 1}")
    out = Path(args.output_dir)
    check_output_dir(out)  # before minutes of training, not after

    stats = {"documents": 0, "bytes": 0}

    def stream():
        for batch in iter_document_batches(files, args.text_field, batch_size=1000):
            stats["documents"] += len(batch)
            stats["bytes"] += sum(len(doc.encode("utf-8")) for doc in batch)
            yield batch

    tok = build_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=args.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    start = time.perf_counter()
    tok.train_from_iterator(stream(), trainer=trainer)
    seconds = time.perf_counter() - start
    if stats["documents"] == 0:
        raise UsageError(f"--train_files {' '.join(map(str, files))}: no text found (empty files?); pass a non-empty corpus")

    stats.update(vocab_size=tok.get_vocab_size(), seconds=round(seconds, 3),
                 mb_per_s=round(stats["bytes"] / 1e6 / max(seconds, 1e-9), 3))
    # saved aside, then each file renamed into place (never a half-written file in --output_dir,
    # and nothing else in that directory is touched); the stats file goes last
    partial = out / f".partial-{os.getpid()}"
    wrap_for_transformers(tok, args.model_max_length).save_pretrained(str(partial))
    (partial / "trainrig_tokenizer.json").write_text(json.dumps({**stats, "files": [str(f) for f in files]}, indent=2))
    for name in sorted(os.listdir(partial), key=lambda n: n == "trainrig_tokenizer.json"):
        os.replace(partial / name, out / name)
    shutil.rmtree(partial)
    log.info("trained BPE on %d documents, %.2f MB in %.1f s: %.2f MB/s; vocab %d -> %s",
             stats["documents"], stats["bytes"] / 1e6, seconds, stats["mb_per_s"], stats["vocab_size"], out)
    return stats


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    cfg = parse_config(TokenizerTrainConfig, argv, prog="tokenizer/train.py")
    return train_tokenizer(cfg.tokenizer)
