"""The one calibration-text reader (awqforge.textfiles): the upload check counts exactly what a job reads, in
every format, with one blank-line rule; chats are accepted and rendered only where a template is given."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from awqforge.errors import InputError
from awqforge.textfiles import count_texts, iter_file_texts, split_documents

CHATS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}],
    [{"role": "user", "content": "and then?"}],
]


def render(messages):
    return "".join(f"<|{m['role']}|>{m['content']}" for m in messages)


def test_blank_lines_with_white_space_split_documents():
    text = "one\nstill one\n\ntwo\n  \t\nthree\n\n\n\n   \n"
    assert split_documents(text) == ["one\nstill one", "two", "three"]


def _files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n \nthree\n")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in [{"text": "a"}, {"text": "  "}, {"text": None}, {"text": "b"}])
        + "\n"
    )
    chats = tmp_path / "c.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["x", None, "", "y", "z"]}), parquet)
    chat_parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": CHATS}), chat_parquet)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "p"}, {"messages": CHATS[0]}]))
    return {txt: 3, jsonl: 2, chats: 2, parquet: 3, chat_parquet: 2, array: 2}


def test_the_upload_count_is_what_a_job_reads(tmp_path):
    for path, n in _files(tmp_path).items():
        read = list(iter_file_texts(path, render_chat=render))
        assert count_texts(path) == len(read) == n, path
    chats = list(iter_file_texts(tmp_path / "c.jsonl", render_chat=render))
    assert chats == [render(c) for c in CHATS]


def test_chats_need_a_template_at_job_time_only(tmp_path):
    _files(tmp_path)
    with pytest.raises(InputError, match="no chat template"):
        list(iter_file_texts(tmp_path / "c.parquet"))
    assert count_texts(tmp_path / "c.parquet") == 2  # the upload check does not need the model


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"txt": 1}\n', 'needs a string field "text" or a "messages" list'),
        ('{"text": 5}\n', '"text" must be a string'),
        ('{"messages": [{"content": "no role"}]}\n', "a chat must be a list"),
        ('{"messages": "not a list"}\n', '"messages" must be a list'),
        ("[1, 2]\n", "not a JSON object"),
        ("{not json\n", "not valid JSON"),
        ('{"text": ""}\n\n', "holds no text"),
    ],
)
def test_bad_jsonl_is_refused_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "upload.bin"  # the upload check names the format: the suffix does not matter
    path.write_text(content)
    with pytest.raises(InputError, match=reason) as err:
        count_texts(path, fmt="jsonl", name="jsonl upload")
    assert str(tmp_path) not in str(err.value)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"ok\n\n\xff\xfe bad")
    with pytest.raises(InputError, match="not UTF-8"):
        count_texts(path)
    assert list(iter_file_texts(path))[0] == "ok"  # a job reading a public corpus replaces, not fails
    pq_path = tmp_path / "r.parquet"
    pq_path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable parquet"):
        count_texts(pq_path)
    with pytest.raises(InputError, match="needs a string column"):
        pq.write_table(pa.table({"body": ["a"]}), pq_path)
        count_texts(pq_path)
