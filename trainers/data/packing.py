"""Pretraining blocks: tokenize documents, join them with EOS, cut the stream into `block_size` blocks.

Semantics are those of HF run_clm's `group_texts` applied to the whole token stream at once:
concatenate, cut into consecutive `block_size` chunks, `labels = input_ids` (the model shifts).
Two differences, both deliberate:
- run_clm drops the remainder of every `map` batch (up to block_size-1 tokens per 1000
  documents); here the remainder carries over to the next batch, so only the final tail of the
  whole corpus (< block_size tokens) is dropped, and its size is logged and kept in meta.json.
- an EOS token follows every document, so the model learns where documents end.

Blocks are cached as an Arrow stream file (`datasets.Dataset.from_file(path)` opens it) keyed by
the tokenizer, block size, text field and the input files' sizes and mtimes, so a second run and
every rank reuse them. Rank 0 builds; the runtime makes the other ranks wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from itertools import chain
from pathlib import Path

import numpy as np

from trainers.data.sources import fingerprint, iter_document_batches, resolve_files
from trainers.errors import UsageError

log = logging.getLogger("trainrig.data")

PACKING_VERSION = 1  # bump when the block layout changes, so old caches are not reused
BLOCKS_FILE, META_FILE = "blocks.arrow", "meta.json"


# ----------------------------------------------------------------------------- pure logic


def pack_token_stream(tokens: np.ndarray, block_size: int, carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append `tokens` to `carry` and cut off as many whole blocks as possible.

    Returns (blocks of shape [n, block_size], the new carry of < block_size tokens).
    """
    stream = np.concatenate([carry, tokens]) if len(carry) else tokens
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size), stream[n_blocks * block_size:]


def encode_per_document(encoder, docs: list[str], eos_id: int) -> np.ndarray:
    """Reference route: each document encoded on its own, followed by EOS."""
    encodings = encoder.encode_batch_fast(docs, add_special_tokens=False)
    return np.fromiter(chain.from_iterable(chain(e.ids, (eos_id,)) for e in encodings), dtype=np.int64)


DOCS_PER_STRING = 64


def encode_joined(encoder, docs: list[str], eos_token: str) -> np.ndarray:
    """Fast route, same tokens: documents joined by the EOS text, 64 per string. The tokenizer
    splits special tokens out before normalising and pre-tokenising, so each document is
    tokenised exactly as on its own, but Python handles 64x fewer token lists (checked against
    `encode_per_document` on the first batch of every build)."""
    strings = [eos_token.join(docs[i:i + DOCS_PER_STRING]) + eos_token for i in range(0, len(docs), DOCS_PER_STRING)]
    encodings = encoder.encode_batch_fast(strings, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


# ------------------------------------------------------------------------------- the cache


def cache_root(explicit: str, kind: str = "blocks") -> Path:
    """--data_cache_dir, else $TRAINRIG_CACHE/<kind>, else ~/.cache/trainrig/<kind>."""
    if explicit:
        return Path(explicit).expanduser() / ("" if kind == "blocks" else kind)
    return Path(os.environ.get("TRAINRIG_CACHE", "~/.cache/trainrig")).expanduser() / kind


def cache_key(tokenizer, block_size: int, files: list[Path], text_field: str) -> str:
    """Hash of everything the blocks depend on."""
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    payload = json.dumps({
        "version": PACKING_VERSION, "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "eos": tokenizer.eos_token_id, "block_size": block_size, "text_field": text_field,
        "files": fingerprint(files),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def build_blocks(files: list[Path], tokenizer, block_size: int, text_field: str, out_dir: Path,
                 batch_size: int = 1000) -> dict:
    """Stream files -> tokens -> blocks into `out_dir` (written under a temporary name, renamed
    when complete, so an interrupted build is never taken for a cache hit). Returns meta."""
    import pyarrow as pa

    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos_token; train one with tokenizer/train.py or set eos_token in its tokenizer_config.json")
    dtype = token_dtype(len(tokenizer))
    value_type = pa.uint16() if dtype == np.uint16 else pa.uint32()
    schema = pa.schema([("input_ids", pa.list_(value_type, block_size))])
    encoder = tokenizer.backend_tokenizer  # Rust; encode_batch spreads a batch over all cores
    eos_id, eos_token = tokenizer.eos_token_id, tokenizer.eos_token
    encode = None
    carry = np.zeros(0, dtype=np.int64)
    n_docs = n_tokens = n_blocks = 0
    start = time.perf_counter()
    with cache_build(out_dir) as tmp_dir:
        with pa.OSFile(str(tmp_dir / BLOCKS_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for docs in iter_document_batches(files, text_field, batch_size):
                if encode is None:  # pick the route once, proving the fast one on real data
                    reference = encode_per_document(encoder, docs, eos_id)
                    if np.array_equal(encode_joined(encoder, docs, eos_token), reference):
                        encode = lambda d: encode_joined(encoder, d, eos_token)  # noqa: E731
                    else:
                        log.warning("this tokenizer tokenises joined documents differently; encoding one by one (slower)")
                        encode = lambda d: encode_per_document(encoder, d, eos_id)  # noqa: E731
                    tokens = reference
                else:
                    tokens = encode(docs)
                n_docs += len(docs)
                n_tokens += len(tokens)
                blocks, carry = pack_token_stream(tokens, block_size, carry)
                if len(blocks):
                    flat = pa.array(blocks.astype(dtype).ravel(), type=value_type)
                    writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, block_size)], schema=schema))
                    n_blocks += len(blocks)
        seconds = time.perf_counter() - start
        meta = {"version": PACKING_VERSION, "block_size": block_size, "blocks": n_blocks, "documents": n_docs,
                "tokens": n_tokens, "tail_tokens_dropped": len(carry), "dtype": np.dtype(dtype).name,
                "files": [str(f) for f in files], "seconds": round(seconds, 3),
                "tokens_per_s": round(n_tokens / max(seconds, 1e-9))}
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


@contextlib.contextmanager
def cache_build(out_dir: Path):
    """A `<key>.tmp<pid>` directory to build a cache entry in: deleted if the build fails, renamed to
    `out_dir` when it completes, so an interrupted build is never taken for a cache hit."""
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    remove_dead_builds(out_dir)
    tmp_dir.mkdir(parents=True)
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if out_dir.exists():  # another build (a job sharing the cache) finished first: same content
        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def remove_dead_builds(out_dir: Path) -> None:
    """Delete `<key>.tmp<pid>` folders whose builder process is gone (killed mid-build). A live
    builder (another run sharing the cache) keeps its folder."""
    for stale in out_dir.parent.glob(out_dir.name + ".tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            shutil.rmtree(stale, ignore_errors=True)


class BlockDataset:
    """Memory-mapped blocks; item i is `{"input_ids": int64 array [block_size], "index": i}`."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        self.meta = json.loads((path / META_FILE).read_text())
        table = pa.ipc.open_stream(pa.memory_map(str(path / BLOCKS_FILE))).read_all()
        column = table.column("input_ids")
        bs = self.meta["block_size"]
        # zero-copy numpy views of each Arrow chunk, concatenated lazily by row lookup
        self._chunks = [c.values.to_numpy(zero_copy_only=True).reshape(-1, bs) for c in column.chunks if len(c)]
        self._offsets = np.cumsum([0] + [len(c) for c in self._chunks])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, row: int) -> dict:
        chunk = int(np.searchsorted(self._offsets, row, side="right") - 1)
        return {"input_ids": self._chunks[chunk][row - self._offsets[chunk]].astype(np.int64), "index": int(row)}


def prepare_blocks(patterns: list[str], flag: str, tokenizer, block_size: int, text_field: str,
                   cache_dir: str, batch_size: int, build: bool) -> BlockDataset:
    """The cached blocks for these inputs; with build=True create them if missing (rank 0),
    else they must exist (other ranks, after rank 0 built them)."""
    files = resolve_files(patterns, flag)
    path = cache_root(cache_dir) / cache_key(tokenizer, block_size, files, text_field)
    if not (path / META_FILE).is_file():
        if not build:
            raise RuntimeError(f"block cache {path} missing after rank 0 built it; is --data_cache_dir on a filesystem all nodes share?")
        meta = build_blocks(files, tokenizer, block_size, text_field, path, batch_size)
        log.info("packed %d documents, %d tokens into %d blocks of %d in %.1f s (%s tokens/s); dropped tail: %d tokens -> %s",
                 meta["documents"], meta["tokens"], meta["blocks"], block_size, meta["seconds"],
                 f"{meta['tokens_per_s']:,}", meta["tail_tokens_dropped"], path)
    meta = json.loads((path / META_FILE).read_text())
    if meta["documents"] == 0:
        raise UsageError(f"{flag} {' '.join(patterns)}: no text found (empty files?); pass a non-empty corpus")
    if meta["blocks"] == 0:
        raise UsageError(f"{flag} {' '.join(patterns)}: {meta['tokens']} tokens, fewer than one block of --block_size {block_size}; "
                         f"add text or lower --block_size (at most {meta['tokens']})")
    return BlockDataset(path)


# ---------------------------------------------------------------------- SFT rows (padding-free)


def pack_rows(lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of at most `capacity` tokens.

    Samples go longest first (ties in a seeded random order) into the row whose free space fits
    them most tightly, else a new row. Deterministic for a seed, so every rank and every resume
    builds the same rows. On log-normal chat lengths this fills > 95% of every row.
    """
    import bisect

    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens exceeds the row capacity {capacity}")
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order.tolist():
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows


class RowDataset:
    """Rows of samples (packed) or one sample per row; item r is the list of its sample dicts."""

    def __init__(self, samples, rows: list[list[int]]):
        self.samples, self.rows = samples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> list[dict]:
        return [self.samples[i] for i in self.rows[r]]

    def row_lengths(self) -> np.ndarray:
        return np.array([sum(int(self.samples.lengths[i]) for i in row) for row in self.rows], dtype=np.int64)
