import json
from itertools import chain

import numpy as np
import pytest
from transformers import AutoTokenizer

from trainers.data.packing import BLOCKS_FILE, encode_joined, encode_per_document, pack_token_stream, prepare_blocks
from trainers.errors import UsageError


def group_texts_reference(examples: dict, block_size: int) -> dict:
    """run_clm's group_texts semantics: concatenate every list of the batch, drop the remainder
    shorter than block_size, cut into block_size chunks, labels = input_ids."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def reference_blocks(corpus, tokenizer, block_size):
    """The HF way: datasets.map(tokenize) then group_texts over the whole stream in one batch."""
    import datasets

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"text": texts})
    tokenized = ds.map(lambda b: {"input_ids": [ids + [tokenizer.eos_token_id] for ids in
                                                tokenizer(b["text"], add_special_tokens=False)["input_ids"]]},
                       batched=True, remove_columns=["text"])
    grouped = tokenized.map(lambda b: group_texts_reference(b, block_size), batched=True, batch_size=len(tokenized))
    return np.array(grouped["input_ids"]), np.array(grouped["labels"])


@pytest.mark.parametrize("tokenize_batch_size", [1000, 7])
def test_blocks_equal_group_texts(corpus, tokenizer_dir, tmp_path, tokenize_batch_size):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = prepare_blocks([str(corpus)], "--train_files", tok, 48, "text", str(tmp_path / f"c{tokenize_batch_size}"),
                          tokenize_batch_size, build=True)
    ref_ids, ref_labels = reference_blocks(corpus, tok, 48)
    got = np.stack([ours[i]["input_ids"] for i in range(len(ours))])
    np.testing.assert_array_equal(got, ref_ids)
    from trainers.data.collate import collate_blocks

    batch = collate_blocks([ours[i] for i in range(4)])
    np.testing.assert_array_equal(batch["labels"].numpy(), ref_labels[:4])
    total = sum(len(tok(json.loads(l)["text"], add_special_tokens=False).input_ids) + 1 for l in corpus.read_text().splitlines())
    assert ours.meta["tail_tokens_dropped"] == total % 48
    assert ours.meta["blocks"] == total // 48


def test_pack_token_stream_carries_remainder():
    blocks, carry = pack_token_stream(np.array([1, 2, 3, 4, 5]), 2, np.zeros(0, dtype=np.int64))
    assert blocks.tolist() == [[1, 2], [3, 4]] and carry.tolist() == [5]
    blocks, carry = pack_token_stream(np.array([6]), 2, carry)
    assert blocks.tolist() == [[5, 6]] and carry.tolist() == []


def test_joined_encoding_equals_per_document(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = ["plain text.", "  leading spaces", "trailing space ", "\nnewline first", "你好，世界", "emoji 🙂🚀 end",
            "mentions <|im_start|>user inside", "x", "code:\n    return 1\n"] * 20
    joined = encode_joined(tok.backend_tokenizer, docs, tok.eos_token)
    np.testing.assert_array_equal(joined, encode_per_document(tok.backend_tokenizer, docs, tok.eos_token_id))


def test_cache_is_reused_and_opens_with_datasets(corpus, tokenizer_dir, tmp_path, caplog):
    import datasets

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    caplog.set_level("INFO")
    first = prepare_blocks([str(corpus)], "--train_files", tok, 32, "text", str(tmp_path), 1000, build=True)
    assert "packed" in caplog.text
    caplog.clear()
    second = prepare_blocks([str(corpus)], "--train_files", tok, 32, "text", str(tmp_path), 1000, build=False)
    assert "packed" not in caplog.text and second.path == first.path
    other = prepare_blocks([str(corpus)], "--train_files", tok, 16, "text", str(tmp_path), 1000, build=True)
    assert other.path != first.path                      # block size is part of the key
    arrow = datasets.Dataset.from_file(str(first.path / BLOCKS_FILE))
    assert arrow.num_rows == len(first) and list(arrow[0]["input_ids"]) == first[0]["input_ids"].tolist()
    assert not list(tmp_path.glob("*.tmp*"))             # no half-built cache left behind


def test_corpus_smaller_than_one_block(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (tmp_path / "small.txt").write_text("just a few words\n")
    with pytest.raises(UsageError, match=r"fewer than one block of --block_size 512; add text or lower --block_size"):
        prepare_blocks([str(tmp_path / "small.txt")], "--train_files", tok, 512, "text", str(tmp_path / "c"), 1000, build=True)
