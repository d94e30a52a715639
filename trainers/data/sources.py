"""Streaming document readers: .txt, .jsonl/.json, .parquet and `datasets` directories.

Nothing here holds a corpus in memory: files are read line by line (text, jsonl) or in record
batches (parquet, Arrow), and documents come out in lists of `batch_size`. Every error names
the file (and line) and the fix, as a UsageError.

In .txt files each non-empty line is one document, as in the `datasets` "text" loader that
HF's run_clm uses.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from trainers.errors import UsageError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def resolve_files(patterns: list[str], flag: str) -> list[Path]:
    """Expand globs; every entry must exist and have a supported format."""
    if not patterns:
        raise UsageError(f"{flag} is empty; pass at least one .txt/.jsonl/.parquet file or a datasets directory")
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise UsageError(f"{flag} {pattern}: no file matches this pattern; check the path")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise UsageError(f"{flag} {path}: no such file or directory; check the path")
            if path.is_dir() and not is_datasets_dir(path):
                raise UsageError(f"{flag} {path}: a directory that is not a saved `datasets` dataset; pass the files inside it (e.g. '{path}/*.jsonl')")
            if path.is_file() and not path.name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES):
                raise UsageError(f"{flag} {path}: unsupported format; use .txt, .jsonl/.json, .parquet or a datasets directory")
            files.append(path)
    return files


def _not_utf8(path: Path, lineno: int, err: UnicodeDecodeError) -> UsageError:
    return UsageError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, err) from None


def _text_documents(path: Path) -> Iterator[str]:
    """Fast path: decode 16 MB chunks at once; a chunk that fails to decode is re-read line by
    line, which names the bad line."""
    with open(path, "rb") as fh:
        line_offset, tail = 0, b""
        while True:
            chunk = fh.read(_CHUNK_BYTES)
            if not chunk and not tail:
                return
            data = tail + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            whole, tail = data[:cut], data[cut:]
            try:
                text = whole.decode("utf-8")
            except UnicodeDecodeError:
                _raise_first_bad_line(path, whole, line_offset)
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            for line in lines:
                line = line.rstrip("\r")
                if line.strip():
                    yield line
            line_offset += whole.count(b"\n")


_CHUNK_BYTES = 16 << 20


def _raise_first_bad_line(path: Path, data: bytes, line_offset: int):
    for lineno, raw in enumerate(data.split(b"\n"), start=line_offset + 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, lineno, err) from None
    raise AssertionError("unreachable: the chunk failed to decode")


def is_json_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip().startswith(b"[")


def read_json_array(path: Path) -> list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a valid JSON array ({err}); fix the file or write one object per line (.jsonl)") from None


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    if is_json_array(path):  # one JSON array rather than JSON lines: parsed whole (use .jsonl for big corpora)
        for i, record in enumerate(read_json_array(path)):
            yield _field(record, text_field, f"{path}[{i}]")
        return
    yield from _jsonl_documents_fast(path, text_field)


def _jsonl_documents_fast(path: Path, text_field: str) -> Iterator[str]:
    """JSON lines through pyarrow's multithreaded C++ reader, streamed in blocks, reading only
    `text_field`. Anything it rejects (bad JSON, a missing or non-string field, bad UTF-8) is
    located by the line-by-line reader, whose message names the line."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([(text_field, pa.string())])
    yielded = 0
    try:
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=_CHUNK_BYTES),
                              parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        for batch in reader:
            column = batch.column(0)
            if column.null_count:
                raise ValueError("a record without the text field")
            for text in column.to_pylist():
                yielded += 1
                yield text
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):
        # the precise reader raises the UsageError naming the line; if it finds nothing wrong
        # (pyarrow is stricter on some inputs), it serves the documents not yet yielded
        for i, text in enumerate(_jsonl_documents_precise(path, text_field)):
            if i >= yielded:
                yield text


def _jsonl_documents_precise(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno}); fix or remove the line") from None
        yield _field(record, text_field, f"{path}:{lineno}")


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = list(record)[:5] if isinstance(record, dict) else type(record).__name__
        raise UsageError(f"{where}: no '{text_field}' field (found {keys}); set --text_field to the field holding the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise UsageError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string; fix the record")
    return text


def _arrow_documents(batches, text_field: str, where: str) -> Iterator[str]:
    import pyarrow as pa

    for batch in batches:
        if text_field not in batch.schema.names:
            raise UsageError(f"{where}: no '{text_field}' column (found {batch.schema.names[:5]}); set --text_field")
        kind = batch.schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"{where}: column '{text_field}' holds {kind}, not text; set --text_field to a string column")
        for text in batch.column(text_field).to_pylist():
            if text is not None:
                yield text


def arrow_batches(path: Path, batch_size: int = 4096):
    """Record batches of a parquet file or a `datasets` directory (its 'train' split if a DatasetDict)."""
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise UsageError(f"{path}: a DatasetDict without a 'train' split (splits: {list(loaded)}); save the split you want on its own")
            loaded = loaded["train"]
        return loaded.data.to_batches(max_chunksize=batch_size)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UsageError(f"{path}: not a readable parquet file ({err}); re-export it") from None
    return parquet.iter_batches(batch_size=batch_size)


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one resolved input, streamed."""
    if path.is_dir() or path.name.endswith(PARQUET_SUFFIXES):
        yield from _arrow_documents(arrow_batches(path), text_field, str(path))
    elif path.name.endswith(JSON_SUFFIXES):
        yield from _json_documents(path, text_field)
    else:
        yield from _text_documents(path)


def iter_document_batches(files: list[Path], text_field: str, batch_size: int) -> Iterator[list[str]]:
    """Documents of all files in order, in lists of at most `batch_size`."""
    batch: list[str] = []
    for path in files:
        for doc in iter_documents(path, text_field):
            if not doc:  # an empty document would add a lone EOS
                continue
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def fingerprint(files: list[Path]) -> list[dict]:
    """What identifies the inputs for the data cache: path, size and mtime of every file
    (a datasets directory counts by its files)."""
    entries = []
    for path in files:
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            stat = member.stat()
            entries.append({"path": str(member.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries
