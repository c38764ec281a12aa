"""Calibration-set uploads: size-limited, validated (txt, jsonl, parquet; `text` or `messages` rows) by the
engine's reader (awqforge.textfiles), stored per tenant."""

from __future__ import annotations

import hashlib
import os
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
    """Number of texts a job will read (the engine's own reader counts them); ServiceError(422) saying what is
    wrong, naming the file only by its format (the server's path is not shown)."""
    from awqforge.errors import InputError
    from awqforge.textfiles import count_texts

    try:
        return count_texts(path, fmt=fmt, name=f"{fmt} upload")
    except InputError as exc:
        raise ServiceError(422, str(exc)) from None


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
