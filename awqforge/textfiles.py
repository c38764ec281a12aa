"""The one reader of calibration and evaluation text files, used by the engine (awqforge.calibration) and by the
service's upload check (app/services/uploads.py), so that what an upload is accepted as is what a job reads.

Formats (by suffix, or named by the caller):
- .txt: documents separated by blank lines (a line holding only white space counts as blank).
- .jsonl / .json (a JSON array of records) / .jsonl.zst: a record's `text` field (or the named column).
- .parquet: the `text` column (or the named column).
A record without the column but with `messages` (a list of {role, content}) is a chat, handed to
`render_chat` (the model's chat template at job time). Null and blank texts are skipped everywhere.

Pure Python (pyarrow and zstandard on demand): the API process imports it without torch.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from awqforge.errors import InputError

TEXT_FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".jsonl.zst": "jsonl.zst",
}
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
ChatRenderer = Callable[[list], str]


def split_documents(text: str) -> list[str]:
    """A .txt's documents: the parts between blank lines, each non-blank."""
    return [doc for doc in _BLANK_LINE.split(text) if doc.strip()]


def file_format(path: Path) -> str | None:
    """The format a file's name says (the longest matching suffix), or None."""
    name = path.name.lower()
    hits = [suffix for suffix in TEXT_FORMATS if name.endswith(suffix)]
    return TEXT_FORMATS[max(hits, key=len)] if hits else None


def iter_file_texts(
    path: Path,
    column: str = "text",
    *,
    render_chat: ChatRenderer | None = None,
    fmt: str | None = None,
    name: str | None = None,
    strict_utf8: bool = False,
) -> Iterator[str]:
    """Documents of one local file; any problem (missing file or column, bad JSON, a chat without a
    template) is an InputError whose message names the file as `name` (default: its path). `strict_utf8`:
    refuse bytes that are not UTF-8 (an upload) rather than replace them (a large public corpus)."""
    where = name or str(path)
    fmt = fmt or file_format(path)
    if not path.is_file():
        raise InputError(f"text file {where} does not exist")
    if fmt is None:
        raise InputError(
            f"text file {where}: unsupported type; use .txt, .jsonl, .json, .parquet or .jsonl.zst"
        )
    errors = "strict" if strict_utf8 else "replace"
    try:
        if fmt == "txt":
            yield from split_documents(path.read_text(encoding="utf-8", errors=errors))
        elif fmt == "parquet":
            yield from _parquet_texts(path, column, render_chat, where)
        elif fmt == "jsonl.zst":
            yield from _jsonl_texts(_zstd_lines(path, where), column, where, render_chat)
        else:
            with path.open(encoding="utf-8", errors=errors) as fh:
                first = fh.read(1)
                fh.seek(0)
                if fmt == "json" and first == "[":  # a JSON array of records
                    try:
                        records = json.load(fh)
                    except (json.JSONDecodeError, RecursionError) as exc:
                        raise InputError(f"{where} is not valid JSON") from exc
                    yield from _jsonl_texts((json.dumps(r) for r in records), column, where, render_chat)
                else:
                    yield from _jsonl_texts(fh, column, where, render_chat)
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text (byte {exc.start})") from None


def count_texts(path: Path, *, fmt: str | None = None, name: str | None = None) -> int:
    """How many documents a job will read from the file (chats counted, not rendered: the model's chat
    template is applied at job time); InputError when it holds none or cannot be read."""
    n = sum(1 for _ in iter_file_texts(path, render_chat=_unrendered, fmt=fmt, name=name, strict_utf8=True))
    if n == 0:
        raise InputError(f"{name or path} holds no text")
    return n


def _unrendered(messages: list) -> str:
    return "chat"


def _row_text(value, where: str, render_chat: ChatRenderer | None, *, chat: bool = False) -> str | None:
    """A row's text, or its chat (a list of messages; `chat`: the row's `messages`, which must be one)
    rendered through the chat template; None: skip it."""
    if value is None:
        return None
    if chat and not isinstance(value, list):
        raise InputError(f"{where}: \"messages\" must be a list of {{'role', 'content'}} messages")
    if isinstance(value, list):
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value):
            raise InputError(f"{where}: a chat must be a list of {{'role', 'content'}} messages")
        if not value:
            return None
        if render_chat is None:
            raise InputError(
                f"{where} is a chat (a list of messages) but the model's tokenizer has no chat template"
            )
        return render_chat(value)
    if not isinstance(value, str):
        raise InputError(f'{where}: "text" must be a string, or "messages" a list of messages')
    return value if value.strip() else None


def _jsonl_texts(
    lines: Iterable[str], column: str, where: str, render_chat: ChatRenderer | None
) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{where}: line {lineno} is not valid JSON") from exc
        if not isinstance(record, dict):
            raise InputError(f"{where}: line {lineno} is not a JSON object")
        key = column if column in record else ("messages" if "messages" in record else None)
        if key is None:
            raise InputError(
                f'{where}: line {lineno} needs a string field "{column}" or a "messages" list '
                f"(fields: {sorted(record)[:8]})"
            )
        text = _row_text(record[key], f"{where}: line {lineno}", render_chat, chat=key == "messages")
        if text is not None:
            yield text


def _parquet_texts(path: Path, column: str, render_chat: ChatRenderer | None, where: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{where} is not a readable parquet file") from exc
    key = column if column in names else ("messages" if "messages" in names else None)
    if key is None:
        raise InputError(
            f'{where} needs a string column "{column}" or a "messages" column (columns: {names[:8]})'
        )
    batches = pf.iter_batches(columns=[key], batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            raise InputError(f"{where}: the {key!r} column cannot be read") from exc
        for value in batch.column(0).to_pylist():
            text = _row_text(value, f"{where}: column {key!r}", render_chat, chat=key == "messages")
            if text is not None:
                yield text


def _zstd_lines(path: Path, where: str) -> Iterator[str]:
    try:
        import zstandard
    except ImportError as exc:
        raise InputError(f"{where} is zstd-compressed: `pip install zstandard` to read it") from exc
    with path.open("rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        yield from io.TextIOWrapper(reader, encoding="utf-8", errors="replace")
