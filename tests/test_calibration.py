"""Calibration sources, token blocks, evaluation windows and model resolution (no network needed)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from awqforge.calibration import (
    BUNDLED_CALIBRATION_TEXT,
    BUNDLED_EVAL_TEXT,
    _in_split,
    generate_self_samples,
    iter_source_texts,
    load_calibration,
    read_text,
    token_blocks,
)
from awqforge.errors import HubUnavailable, InputError
from awqforge.evaluate import eval_windows
from awqforge.resolve import resolve_model
from awqforge.spec import CalibrationSpec

DOCS = [
    "The first document talks about software freedom.",
    "A second one, about copying.",
    "Third: warranty.",
]


def expected_ids(tokenizer, docs, n):
    ids = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"]]
    return torch.tensor(ids[:n])


@pytest.fixture
def doc_files(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS) + "\n\n\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": [0, 1, 2]}), parquet)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_file_sources_read_documents(doc_files, kind, tiny_tokenizer):
    assert list(iter_source_texts(f"file:{doc_files[kind]}")) == DOCS
    blocks = load_calibration(
        CalibrationSpec(source=f"file:{doc_files[kind]}", n_samples=2, seq_len=16), tiny_tokenizer
    )
    assert blocks.shape == (2, 16) and blocks.dtype == torch.long
    assert torch.equal(blocks.flatten(), expected_ids(tiny_tokenizer, DOCS, 32))


def test_too_little_text_says_found_and_needed(doc_files, tiny_tokenizer):
    found = len(expected_ids(tiny_tokenizer, DOCS, 10**6))
    with pytest.raises(InputError) as info:
        load_calibration(
            CalibrationSpec(source=f"file:{doc_files['txt']}", n_samples=128, seq_len=512), tiny_tokenizer
        )
    msg = str(info.value)
    assert f"{found} tokens found" in msg and "65536 needed" in msg


def test_bad_files(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_source_texts(f"file:{tmp_path / 'missing.txt'}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(InputError, match="no 'text' field"):
        list(iter_source_texts(f"file:{bad}"))
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported"):
        list(iter_source_texts(f"file:{other}"))


def test_hub_sources_offline_are_clear(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailable, match="pile-val-backup"):
        list(iter_source_texts("pileval"))
    with pytest.raises(HubUnavailable, match="hf:someone/corpus"):
        list(iter_source_texts("hf:someone/corpus:train:text"))


def test_resolve_hub_id_offline_and_missing_paths(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE"):
        resolve_model("someone/some-model")
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_split_matching():
    assert _in_split("data/train-00000-of-00001.parquet", "train")
    assert _in_split("wikitext-2-raw-v1/test-00000-of-00001.parquet", "test")
    assert _in_split("train/part0.jsonl", "train")
    assert _in_split("train.jsonl", "train")
    assert not _in_split("data/validation-0000.parquet", "train")
    assert not _in_split("data/trainer_notes.txt", "train")


def test_bundled_texts_are_disjoint_and_long_enough(tiny_tokenizer):
    assert BUNDLED_CALIBRATION_TEXT.stat().st_size + BUNDLED_EVAL_TEXT.stat().st_size < 200_000
    eval_text = read_text(None)
    assert eval_text == BUNDLED_EVAL_TEXT.read_text()
    calibration_paragraphs = {
        p.strip() for p in BUNDLED_CALIBRATION_TEXT.read_text().split("\n\n") if len(p) > 200
    }
    shared = sum(len(p) for p in eval_text.split("\n\n") if p.strip() in calibration_paragraphs)
    assert shared < 0.02 * len(eval_text)  # different texts (GFDL-1.3 quotes one GPL-3 paragraph)
    blocks = token_blocks(iter_source_texts(f"file:{BUNDLED_CALIBRATION_TEXT}"), tiny_tokenizer, 32, 512)
    assert blocks.shape == (32, 512)


def test_eval_windows_do_not_overlap(tiny_tokenizer):
    text = read_text(None)
    windows = eval_windows(tiny_tokenizer, text, seq_len=64, max_seqs=3)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows.shape == (3, 64)
    assert torch.equal(windows.flatten(), torch.tensor(ids[: 3 * 64]))  # this tokenizer adds no BOS
    with pytest.raises(InputError, match="too short"):
        eval_windows(tiny_tokenizer, "tiny", seq_len=64)


def test_self_generated_samples(tiny_checkpoint, tiny_tokenizer):
    folder = tiny_checkpoint("llama")
    spec = CalibrationSpec(source="self", n_samples=3, seq_len=24)
    a = load_calibration(spec, tiny_tokenizer, folder, seed=1)
    b = generate_self_samples(folder, tiny_tokenizer, 3, 24, seed=1, batch_size=2)
    assert a.shape == (3, 24) and int(a.max()) < 512
    assert torch.equal(a[:2, 0], b[:2, 0])  # same prompt for the first batch
    assert len({tuple(r.tolist()) for r in a}) == 3  # sampled, not greedy copies
    with pytest.raises(InputError, match="model folder"):
        load_calibration(spec, tiny_tokenizer)
