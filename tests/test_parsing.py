"""The one parser per input kind (awqforge.parsing) at its edges: calendar ends, time-zone offsets, overflow,
symlink loops. Each refusal is a ParseError/InputError with a reason, never an OverflowError or a 500."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

from awqforge.errors import InputError
from awqforge.parsing import (
    EARLIEST,
    LATEST,
    MAX_DURATION,
    ParseError,
    PathNotAllowed,
    decode_cursor,
    encode_cursor,
    is_local_reference,
    parse_duration,
    parse_id,
    parse_since,
    parse_size,
    parse_timestamp,
    resolve_local_path,
)

NOW = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
WEEK = timedelta(days=7)


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("7d", WEEK),
        ("2w", 2 * WEEK),
        ("0d", timedelta(0)),
        (f"{MAX_DURATION.days}d", MAX_DURATION),
    ],
)
def test_durations_within_the_limit(text, delta):
    assert parse_duration(text) == delta
    assert parse_since(text, now=NOW, default=WEEK) == NOW - delta


@pytest.mark.parametrize(
    "text",
    [
        "999999999d",
        "1000000w",
        "99999999999999h",
        "9" * 5000 + "h",
        f"{MAX_DURATION.days + 1}d",
        "999999999999s",
    ],
)
def test_durations_past_the_limit_are_refused(text):
    with pytest.raises(ParseError) as err:
        parse_since(text, now=NOW, default=WEEK)
    assert err.value.field == "since" and "at most" in err.value.reason


@pytest.mark.parametrize("text", ["7", "d", "-7d", "7 d x", "٧d", "7y", "1e3d"])
def test_malformed_durations(text):
    with pytest.raises(ParseError, match="duration"):
        parse_since(text, now=NOW, default=WEEK)


def test_since_default_and_timestamps():
    assert parse_since(None, now=NOW, default=WEEK) == NOW - WEEK
    assert parse_since("  ", now=NOW, default=WEEK) == NOW - WEEK
    assert parse_since("2025-01-01T00:00:00+02:00", now=NOW, default=WEEK) == datetime(
        2024, 12, 31, 22, tzinfo=timezone.utc
    )
    t = parse_timestamp("2025-06-01T12:00:00Z")
    assert t == datetime(2025, 6, 1, 12, tzinfo=timezone.utc) and t.utcoffset() == timedelta(0)
    assert parse_timestamp("2025-06-01") == datetime(2025, 6, 1, tzinfo=timezone.utc)  # naive: UTC


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC
        "0001-01-01T00:00:00",
        "0001-01-01T09:00:00-14:00",  # a valid UTC time, but within a day of the calendar's start
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "9999-12-31T00:00:00Z",
    ],
)
def test_timestamps_at_the_calendar_ends_are_refused(text):
    with pytest.raises(ParseError) as err:
        parse_since(text, now=NOW, default=WEEK)
    assert "between" in err.value.reason


def test_timestamps_just_inside_the_calendar_ends():
    assert parse_timestamp(EARLIEST.isoformat()) == EARLIEST
    assert parse_timestamp(LATEST.isoformat()) == LATEST
    # a duration back from a time near the start of the calendar stays refused, never overflows
    with pytest.raises(ParseError):
        parse_since("2w", now=EARLIEST, default=WEEK)


@pytest.mark.parametrize(
    "text", ["yesterday", "2025-13-01", "2025-01-01T25:00", "x" * 65, "2025-01-01T00:00+25:00"]
)
def test_malformed_timestamps(text):
    with pytest.raises(ParseError):
        parse_since(text, now=NOW, default=WEEK)


def test_cursor_round_trip_and_offsets():
    t = datetime(2025, 3, 1, 10, tzinfo=timezone(timedelta(hours=5)))
    created, row = decode_cursor(encode_cursor(t, "job_abc"))
    assert created == t and created.tzinfo == timezone.utc and row == "job_abc"


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor("0001-01-01T00:00:00+14:00|x"),
        _cursor("9999-12-31T23:59:59-14:00|x"),
        _cursor("2024-01-01T00:00:00+00:00|job\x00"),
        _cursor("2024-01-01T00:00:00+00:00|" + "j" * 65),
        _cursor("2024-01-01T00:00:00+00:00"),
        _cursor("not a date|job_1"),
        "!!!!",
        "x" * 201,
        "é",
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
    ],
)
def test_foreign_cursors_are_refused(cursor):
    with pytest.raises(ParseError) as err:
        decode_cursor(cursor)
    assert err.value.field == "cursor" and err.value.reason == "not a cursor returned by this API"


def test_ids():
    assert parse_id("job_0123-abc") == "job_0123-abc"
    for bad in ("", "a" * 65, "a b", "a/b", "a\x00", "jöb", "..", "job\n"):
        with pytest.raises(ParseError):
            parse_id(bad, field="job_id")


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("24GiB", 24 * 2**30),
        ("24G", 24 * 2**30),
        ("24 gib", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("5MB", 5 * 10**6),
        ("1.5K", 1536),
        ("1TiB", 2**40),
        ("1T", 2**40),
        ("1TB", 10**12),
        ("1234", 1234),
        ("1234B", 1234),
        (5000, 5000),
    ],
)
def test_sizes_binary_unless_si(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "bad", ["", "0", "0GiB", "-1G", "G", "5XB", "1e3", "9" * 40, "2000000000TiB", True, 0, -5]
)
def test_sizes_refused(bad):
    with pytest.raises(ParseError):
        parse_size(bad, field="QUEUE_CLASSES gpu")


def test_settings_and_writer_read_sizes_alike():
    from app.core.config import parse_size as settings_size
    from awqforge.formats import parse_size as writer_size

    for text in ("24G", "24GB", "512MiB"):
        assert settings_size(text) == writer_size(text) == parse_size(text)


def test_local_references():
    assert is_local_reference("/abs") and is_local_reference("./x") and is_local_reference("~/x")
    assert is_local_reference("../x")
    assert (
        not is_local_reference("org/name")
        and not is_local_reference(".hidden")
        and not is_local_reference("x")
    )


def test_symlink_loops(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    out = tmp_path / "outside"
    out.mkdir()
    (out / "a").symlink_to(out / "b")
    (out / "b").symlink_to(out / "a")
    (root / "to-out").symlink_to(out / "a")  # an allowed name that leads into a loop outside
    generic = "local paths are not allowed here"
    # a loop outside the roots: the same refusal as any other outside path (nothing about loops)
    for raw in (out / "a", f"{out}/a/x", f"{root}/../outside/b"):
        with pytest.raises(PathNotAllowed) as err:
            resolve_local_path(raw, [root], what="model")
        assert generic in str(err.value) and "RuntimeError" not in str(err.value)
    # a loop inside the roots: a reason the user can act on
    with pytest.raises(InputError, match="not a usable path") as err:
        resolve_local_path(root / "loop", [root], what="model")
    assert not isinstance(err.value, PathNotAllowed)
    # with no roots (the CLI on its own machine) a loop is still a clear InputError
    with pytest.raises(InputError, match="not a usable path"):
        resolve_local_path(out / "a", None)
