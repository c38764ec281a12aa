"""One parser per kind of input a user may write: durations and timestamps, list cursors, ids, byte sizes and
local paths. Each has its limits, so that no value reaches the database or arithmetic unchecked; each raises
ParseError (an InputError naming the field) with a reason the user can act on.

Pure Python: the API process imports it (no torch).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from awqforge.errors import InputError


class ParseError(InputError):
    """A value that does not parse, or lies outside its limits; `field` names what the user wrote."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# -- durations and timestamps --

_DURATION = re.compile(r"^(\d+)([smhdw])$", re.ASCII)
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_DURATION = timedelta(days=100 * 366)  # a look-back longer than a century is a typo
# The range every timestamp is kept in once it is UTC: Python's calendar (years 1 to 9999) less a day at
# each end, so that an offset or a day's arithmetic never leaves it, and Postgres' timestamptz holds it.
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc)
_MAX_TIME_TEXT = 64


def parse_duration(text: str, *, field: str = "duration") -> timedelta:
    """'90s', '30m', '24h', '7d', '2w' -> timedelta, at most MAX_DURATION."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ParseError(field, f"{text[:40]!r} is not a duration such as 30m, 24h, 7d or 2w")
    too_long = ParseError(field, f"at most {MAX_DURATION.days} days")
    if len(m.group(1)) > 12:  # int() of thousands of digits is refused by Python, and slow before that
        raise too_long
    try:
        d = timedelta(**{_DURATION_UNITS[m.group(2)]: int(m.group(1))})
    except OverflowError:
        raise too_long from None
    if d > MAX_DURATION:
        raise too_long
    return d


def parse_timestamp(text: str, *, field: str = "time") -> datetime:
    """An ISO 8601 time (UTC when it names no offset) -> an aware UTC datetime between EARLIEST and LATEST."""
    raw = text.strip()
    if len(raw) > _MAX_TIME_TEXT:
        raise ParseError(field, f"at most {_MAX_TIME_TEXT} characters")
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ParseError(field, "not an ISO 8601 time such as 2025-01-31T12:00:00Z") from None
    return clamp_utc(t, field=field)


def clamp_utc(t: datetime, *, field: str) -> datetime:
    """`t` in UTC (naive: taken as UTC); refused when it lies outside EARLIEST..LATEST."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    try:
        utc = t.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+14:00 is in year 0 in UTC
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ParseError(field, f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)")
    return utc


def parse_since(text: str | None, *, now: datetime, default: timedelta, field: str = "since") -> datetime:
    """A start time written as a duration back from `now` ('7d') or as an ISO 8601 time; None: now - default."""
    if not text or not text.strip():
        return now - default
    if _DURATION.match(text.strip()):
        back = parse_duration(text, field=field)
        try:
            start = now - back
        except OverflowError:  # before year 1
            start = datetime.min
        return clamp_utc(start, field=field)
    try:
        return parse_timestamp(text, field=field)
    except ParseError as exc:
        if "ISO 8601" in exc.reason:
            raise ParseError(field, "give an ISO 8601 time or a duration such as 30m, 24h, 7d, 2w") from None
        raise


# -- ids and list cursors --

# Ids this service hands out (job_..., cal_..., art_...).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN, re.ASCII)
MAX_CURSOR = 200


def parse_id(text: str, *, field: str = "id") -> str:
    if not _ID.fullmatch(text):
        raise ParseError(field, "an id is 1 to 64 letters, digits, '_' or '-'")
    return text


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """The opaque position after a row of a list ordered by (created_at, id), newest first."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str, *, field: str = "cursor") -> tuple[datetime, str]:
    """encode_cursor's inverse; anything else (or a time outside the calendar's safe range) is refused."""
    refused = ParseError(field, "not a cursor returned by this API")
    if len(cursor) > MAX_CURSOR:
        raise refused
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode("ascii")).decode().split("|", 1)
        t = datetime.fromisoformat(created)
    except (ValueError, UnicodeError, binascii.Error):
        raise refused from None
    if not _ID.fullmatch(row_id):
        raise refused
    try:
        return clamp_utc(t, field=field), row_id
    except ParseError:
        raise refused from None


# -- byte sizes --

# One rule everywhere: a bare or binary unit (K, M, G, T, KiB, MiB, GiB, TiB) counts in powers of 1024, an
# SI unit written with B (KB, MB, GB, TB) in powers of 1000, as transformers' max_shard_size reads it.
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?b)?|(b))?$", re.I | re.ASCII)
MAX_SIZE = 2**60


def parse_size(value: int | str, *, field: str = "size") -> int:
    """'24GiB', '24G' (both 24 * 2**30), '80GB' (80 * 10**9), '512MiB' or a byte count -> bytes (> 0)."""
    if isinstance(value, bool):
        raise ParseError(field, "a size is a number of bytes or a text such as 24GiB")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value.strip()[:40])
        if not m:
            raise ParseError(field, f"{value[:40]!r} is not a size like 24GiB, 80GB or 512MiB")
        number, prefix, suffix, _ = m.groups()
        base = 1000 if suffix and suffix.lower() == "b" else 1024
        n = int(float(number) * base ** " kmgt".index((prefix or " ").lower()))
    if not 0 < n <= MAX_SIZE:
        raise ParseError(field, f"must be more than 0 and at most {MAX_SIZE} bytes")
    return n


# -- local paths --


def is_local_reference(text: str) -> bool:
    """A local path is written as one (absolute, ./, ../, ~); anything else is a hub id, never looked up."""
    return text.startswith(("/", "./", "../", "~"))


class PathNotAllowed(InputError):
    """A path outside the allowed roots. The message shows neither the path nor whether it exists."""


def _refuse_outside(what: str) -> PathNotAllowed:
    return PathNotAllowed(
        f"{what}: local paths are not allowed here outside the server's allowed folders "
        "(ALLOWED_LOCAL_ROOTS); use a hub id, or an upload for calibration data"
    )


def _lexical(path: Path) -> Path:
    """`path` made absolute with `..` folded, without touching the disk (a symlink loop cannot fail it)."""
    out: list[str] = []
    for part in path.parts[1:]:
        if part == "..":
            if out:
                out.pop()
        elif part not in ("", "."):
            out.append(part)
    return Path(path.anchor, *out)


def resolve_local_path(
    raw: str | Path, roots: Sequence[str | Path] | None, *, what: str = "path", base: Path | None = None
) -> Path:
    """The real path (`~`, `..` and symlinks resolved) of a path a job names, which must lie under one of
    `roots` (None: any path, for the CLI on its own machine). A relative path is taken from `base` (default:
    the working directory). Outside the roots, every path (a missing one, a symlink loop) gets the same
    refusal, which reveals nothing of the server's disk."""
    text = str(raw)
    if "\x00" in text:
        raise InputError(f"{what}: a path must not contain NUL bytes")
    try:
        path = Path(text).expanduser()
        path = (base / path) if base is not None and not path.is_absolute() else path.absolute()
    except (OSError, RuntimeError, ValueError):  # ~user that does not exist
        raise (
            _refuse_outside(what) if roots is not None else InputError(f"{what}: not a usable path")
        ) from None
    real_roots = []
    for root in roots or ():
        try:
            real_roots.append(Path(root).expanduser().resolve())
        except (OSError, RuntimeError):
            continue
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
        # Whether the unusable path lies inside the roots is judged on its text alone: outside them the
        # user gets the generic refusal, inside a reason they can act on.
        if roots is not None and not any(_lexical(path).is_relative_to(r) for r in real_roots):
            raise _refuse_outside(what) from None
        raise InputError(f"{what}: not a usable path ({type(exc).__name__})") from None
    if roots is None or any(real.is_relative_to(r) for r in real_roots):
        return real
    raise _refuse_outside(what)
