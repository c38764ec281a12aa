"""Calibration sources, token blocks, evaluation windows and model resolution (no network needed)."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from awqforge.awq.capture import for_rows
from awqforge.calibration import (
    BUNDLED_CALIBRATION_TEXT,
    BUNDLED_EVAL_TEXT,
    MIN_CALIBRATION_TOKENS,
    HubDatasetSource,
    _in_split,
    build_calibration,
    dataset_files,
    generate_self_samples,
    iter_source_texts,
    load_calibration,
    parse_hf_source,
    per_sample_blocks,
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


@pytest.mark.parametrize("packing", ["concat", "per_sample"])
def test_too_little_text_below_the_floor_is_refused_with_the_floor(doc_files, tiny_tokenizer, packing):
    special = packing == "per_sample"  # each text a document: with the tokenizer's BOS, if it adds one
    found = sum(len(tiny_tokenizer(d, add_special_tokens=special)["input_ids"]) for d in DOCS)
    with pytest.raises(InputError) as info:
        load_calibration(
            CalibrationSpec(source=f"file:{doc_files['txt']}", n_samples=128, seq_len=512, packing=packing),
            tiny_tokenizer,
        )
    msg = str(info.value)
    assert f"{found} tokens found" in msg and f"at least {MIN_CALIBRATION_TOKENS} needed" in msg
    assert "or all the job asks for when it asks for fewer" in msg
    # a small job needs all it asked for (concat), or a quarter of it (per_sample: texts shorter than seq_len)
    small = CalibrationSpec(source=f"file:{doc_files['txt']}", n_samples=4, seq_len=16, packing=packing)
    if packing == "concat":
        with pytest.raises(InputError, match=f"{found} tokens found, at least 64 needed"):
            load_calibration(small, tiny_tokenizer)
    else:
        assert build_calibration(small, tiny_tokenizer).n_samples == 3  # 3 texts, 16 >= 64 // 4 tokens


def paragraphs(n: int) -> list[str]:
    """The first n paragraphs of the bundled calibration text that are at least 200 characters long."""
    docs = [p.strip() for p in BUNDLED_CALIBRATION_TEXT.read_text().split("\n\n") if len(p.strip()) >= 200]
    return docs[:n]


@pytest.fixture
def short_jsonl(tmp_path):
    """32 paragraphs as a jsonl of `text` lines, as a new user would bring (the issue's case)."""
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in paragraphs(32)))
    return path


def test_short_source_is_used_as_far_as_it_goes_concat(short_jsonl, tiny_tokenizer):
    total = sum(len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in paragraphs(32))
    assert MIN_CALIBRATION_TOKENS <= total < 32 * 512  # the premise: less than asked, more than the floor
    cal = build_calibration(
        CalibrationSpec(source=f"file:{short_jsonl}", n_samples=32, seq_len=512), tiny_tokenizer
    )
    assert cal.input_ids.shape == (total // 512, 512) and cal.attention_mask is None
    summary = cal.summary()
    assert summary["samples"] == total // 512 and summary["tokens"] == (total // 512) * 512
    assert summary["requested_samples"] == 32 and summary["requested_tokens"] == 32 * 512
    assert summary["shortfall"] and f"{total} tokens" in cal.warning and "16384 asked" in cal.warning
    # enough text: no warning, exactly what was asked
    full = build_calibration(
        CalibrationSpec(source=f"file:{short_jsonl}", n_samples=4, seq_len=128), tiny_tokenizer
    )
    assert full.input_ids.shape == (4, 128) and full.warning is None and not full.summary()["shortfall"]


def test_per_sample_packing_one_text_per_sequence(short_jsonl, tiny_tokenizer):
    docs = paragraphs(32)
    cal = build_calibration(
        CalibrationSpec(source=f"file:{short_jsonl}", n_samples=32, seq_len=96, packing="per_sample"),
        tiny_tokenizer,
    )
    rows = [tiny_tokenizer(d)["input_ids"][:96] for d in docs]
    assert cal.packing == "per_sample" and cal.warning is None
    assert cal.input_ids.shape == (32, max(len(r) for r in rows))
    lengths = cal.attention_mask.sum(1) if cal.attention_mask is not None else torch.full((32,), 96)
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)  # longest first: row 0 has no padding
    assert sorted(lengths.tolist()) == sorted(len(r) for r in rows)
    assert cal.n_tokens == sum(len(r) for r in rows)
    for row, n in zip(cal.input_ids, lengths.tolist(), strict=True):
        assert tuple(row[:n].tolist()) in {tuple(r) for r in rows}  # each row is one text, truncated
        assert (row[n:] == tiny_tokenizer.pad_token_id).all()

    # seq_len longer than every text: rows keep their own length, padding is masked and counted
    long = build_calibration(
        CalibrationSpec(source=f"file:{short_jsonl}", n_samples=32, seq_len=4096, packing="per_sample"),
        tiny_tokenizer,
    )
    full_rows = [tiny_tokenizer(d)["input_ids"] for d in docs]
    assert long.input_ids.shape == (32, max(len(r) for r in full_rows))
    assert long.attention_mask is not None and long.attention_mask[0].all()
    assert long.summary()["pad_tokens"] == int((long.attention_mask == 0).sum()) > 0
    assert int(long.attention_mask.sum()) == long.n_tokens == sum(len(r) for r in full_rows)

    # fewer texts than samples: all of them, with a warning
    more = build_calibration(
        CalibrationSpec(source=f"file:{short_jsonl}", n_samples=40, seq_len=512, packing="per_sample"),
        tiny_tokenizer,
    )
    assert more.n_samples == 32 and "32 texts" in more.warning and more.summary()["requested_samples"] == 40


CHATS = [
    [{"role": "user", "content": "What is free software?"}, {"role": "assistant", "content": DOCS[0]}],
    [{"role": "user", "content": "And copying?"}, {"role": "assistant", "content": DOCS[1]}],
]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_chat_rows_are_rendered_with_the_chat_template(tmp_path, tiny_tokenizer, kind):
    path = tmp_path / f"chats.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    else:
        pq.write_table(pa.table({"messages": CHATS}), path)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    spec = CalibrationSpec(source=f"file:{path}", n_samples=2, seq_len=16)
    with pytest.raises(InputError, match="no chat template"):
        build_calibration(spec, tokenizer)
    tokenizer.chat_template = TEMPLATE
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in CHATS]
    assert rendered[0].startswith("<|user|>What is free software?</s><|assistant|>")
    cal = build_calibration(spec, tokenizer)
    assert torch.equal(cal.input_ids.flatten(), expected_ids(tokenizer, rendered, 32))
    per = build_calibration(spec.model_copy(update={"packing": "per_sample"}), tokenizer)
    firsts = [tokenizer(r, add_special_tokens=False)["input_ids"][:16] for r in rendered]
    assert sorted(map(tuple, per.input_ids.tolist())) == sorted(map(tuple, firsts))  # one chat per row


def test_hf_source_syntax_revision_and_config():
    assert parse_hf_source("hf:org/name") == HubDatasetSource("org/name")
    assert parse_hf_source("hf:org/name@v1.0:test:content:en") == HubDatasetSource(
        "org/name", "v1.0", "test", "content", "en"
    )
    assert parse_hf_source("hf:org/name@refs/convert/parquet::messages") == HubDatasetSource(
        "org/name", "refs/convert/parquet", "train", "messages"
    )
    assert parse_hf_source("hf:wikitext:::wikitext-2-raw-v1").config == "wikitext-2-raw-v1"
    for bad in ("hf:", "hf:org/name@", "hf:a:b:c:d:e"):
        with pytest.raises(InputError):
            parse_hf_source(bad)
    files = [
        "README.md",
        "wikitext-2-raw-v1/train-00000-of-00001.parquet",
        "wikitext-2-raw-v1/test-00000-of-00001.parquet",
        "wikitext-103-raw-v1/train-00000-of-00002.parquet",
        "wikitext-103-raw-v1/train-00001-of-00002.parquet",
    ]
    assert dataset_files(files, "train", "wikitext-2-raw-v1") == [files[1]]
    assert dataset_files(files, "train", "wikitext-103-raw-v1") == files[3:]
    assert len(dataset_files(files, "train")) == 3 and dataset_files(files, "test", "nope") == []
    # the spec accepts the same syntax (and refuses what cannot be parsed) before any work
    for ok in ("hf:org/name@v1.0:test:content:en", "hf:wikitext:::wikitext-2-raw-v1", "hf:org/n@main"):
        assert CalibrationSpec(source=ok).source == ok
    for bad in ("hf:org/name@", "hf:a:b:c:d:e", "hf:a b"):
        with pytest.raises(ValueError, match="not understood"):
            CalibrationSpec(source=bad)


def test_bad_files(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_source_texts(f"file:{tmp_path / 'missing.txt'}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(InputError, match='needs a string field "text" or a "messages" list'):
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
    with pytest.raises(HubUnavailable, match="hf:someone/corpus"):
        list(iter_source_texts("hf:someone/corpus@v2:train:text:en"))


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


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_per_sample_padding_leaves_real_tokens_exact_through_the_capture(
    family, tiny_checkpoint, tiny_tokenizer
):
    """The production capture (StreamingModel.capture, kwargs recorded from the first, longest row) and the blocks
    run on a padded per_sample batch give every real token the activations it has in its own unpadded run."""
    from awqforge.arch import get_adapter
    from awqforge.streaming import StreamingModel

    resolved = resolve_model(str(tiny_checkpoint(family)))
    stream = StreamingModel.from_resolved(resolved, get_adapter(resolved.config), device=torch.device("cpu"))
    cal = per_sample_blocks(DOCS * 2, tiny_tokenizer, 6, 12)
    assert cal.attention_mask is not None and cal.attention_mask[0].all() and not cal.attention_mask.all()

    def block_outputs(ids, mask):
        stream.load_non_block()
        captured = stream.capture(ids, mask)
        stream.unload_non_block()
        hidden = captured.inputs
        for i in range(stream.n_blocks):
            out = stream.load_block(i)(hidden, **for_rows(captured.layer_kwargs[i], slice(0, len(hidden))))
            hidden = out[0] if isinstance(out, tuple) else out
            stream.free_block(i)
        return hidden

    padded = block_outputs(cal.input_ids, cal.attention_mask)
    for row, mask in zip(cal.input_ids, cal.attention_mask, strict=True):
        n = int(mask.sum())
        alone = block_outputs(row[:n].unsqueeze(0), None)
        torch.testing.assert_close(
            padded[cal.input_ids.tolist().index(row.tolist()), :n], alone[0], rtol=1e-4, atol=1e-5
        )
