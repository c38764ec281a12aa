"""Calibration-set uploads: size-limited, validated (txt, jsonl, parquet), stored per tenant."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.core.config import settings
from app.models import CalibrationSet, new_id
from app.services.jobs import ServiceError

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_CHUNK = 1024 * 1024


def tenant_upload_dir(tenant_id: int) -> Path:
    return settings.UPLOAD_DIR / f"tenant-{tenant_id}"


def allowed_roots(tenant_id: int | None = None) -> list[Path]:
    """The folders a job may name local paths in: ALLOWED_LOCAL_ROOTS, the engine's bundled public texts,
    and (for the worker, which turns upload:<id> into a path) the tenant's own upload folder."""
    from awqforge.resolve import BUNDLED_DATA_DIR  # pure Python: no torch

    roots = [*settings.ALLOWED_LOCAL_ROOTS, BUNDLED_DATA_DIR]
    if tenant_id is not None:
        roots.append(tenant_upload_dir(tenant_id))
    return roots


def _safe_filename(filename: str) -> str:
    """The base name, without control characters or anything the database cannot hold, at most 300 characters."""
    name = os.path.basename(filename or "").encode("utf-8", "replace").decode("utf-8")
    return "".join(c for c in name if c.isprintable())[:300]


def _validate(path: Path, fmt: str) -> int:
    """Number of usable text records; raises ServiceError(422) saying what is wrong."""
    if fmt == "txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ServiceError(422, f"txt upload is not UTF-8 text (byte {exc.start})") from exc
        # The engine reads a .txt as documents separated by blank lines.
        n = sum(1 for doc in re.split(r"\n\s*\n", text) if doc.strip())
    elif fmt == "jsonl":
        n = 0
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ServiceError(
                        422, f"jsonl line {lineno} is not UTF-8 text (byte {exc.start})"
                    ) from exc
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ServiceError(422, f"jsonl line {lineno} is not valid JSON") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ServiceError(422, f'jsonl line {lineno} needs a string field "text"')
                n += bool(obj["text"].strip())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
        except Exception as exc:
            raise ServiceError(422, "not a readable parquet file") from exc
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise ServiceError(422, 'parquet upload needs a string column "text"')
        # Count what the engine will read: rows whose text is neither null nor blank.
        n = 0
        try:
            for batch in pf.iter_batches(columns=["text"], batch_size=4096):
                n += sum(1 for t in batch.column(0).to_pylist() if t and t.strip())
        except Exception as exc:
            raise ServiceError(422, 'the parquet "text" column cannot be read') from exc
    if n == 0:
        raise ServiceError(422, "the upload holds no text")
    return n


def store_upload(session: Session, *, tenant_id: int, filename: str, stream: BinaryIO) -> CalibrationSet:
    name = _safe_filename(filename)
    ext = Path(name).suffix.lower()
    if ext not in FORMATS:
        raise ServiceError(422, f"unsupported file type {ext or '(none)'!r}: upload .txt, .jsonl or .parquet")
    cal_id = new_id("cal")
    folder = tenant_upload_dir(tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{cal_id}{ext}"
    partial = dest.with_suffix(ext + ".part")
    digest, size = hashlib.sha256(), 0
    try:
        with partial.open("wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > settings.MAX_UPLOAD_BYTES:
                    raise ServiceError(413, f"upload exceeds the limit of {settings.MAX_UPLOAD_BYTES} bytes")
                digest.update(chunk)
                out.write(chunk)
        n = _validate(partial, FORMATS[ext])
        partial.rename(dest)
    finally:
        partial.unlink(missing_ok=True)
    row = CalibrationSet(
        id=cal_id,
        tenant_id=tenant_id,
        filename=name,
        format=FORMATS[ext],
        path=str(dest),
        size_bytes=size,
        n_records=n,
        sha256=digest.hexdigest(),
    )
    session.add(row)
    session.commit()
    return row
