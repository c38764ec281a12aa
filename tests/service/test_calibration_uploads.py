"""Calibration uploads are read by the engine's own reader: a `messages` upload (jsonl or parquet) is accepted
and counted, and at job time rendered with the model's chat template (a model without one fails the job with
that reason)."""

from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.conftest import wait_for_status

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
CHATS = [
    [
        {"role": "user", "content": f"Question {i}: what does activation aware scaling protect?"},
        {"role": "assistant", "content": "It protects the salient channels of each linear layer. " * 3},
    ]
    for i in range(40)
]


def _with_chat_template(model_dir):
    dest = model_dir.parent / "chat-llama"  # beside it, under the allowed roots
    if not dest.exists():
        shutil.copytree(model_dir, dest)
        cfg_path = dest / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = TEMPLATE
        cfg_path.write_text(json.dumps(cfg))
    return dest


def test_messages_uploads_are_accepted_and_rendered_at_job_time(service, make_key):
    jsonl = "".join(json.dumps({"messages": c}) + "\n" for c in CHATS).encode()
    buf = io.BytesIO()
    pq.write_table(pa.table({"messages": CHATS}), buf)
    with service.client(make_key()) as c:
        up = c.post("/v1/calibration-sets", files={"file": ("chats.jsonl", jsonl)})
        assert up.status_code == 201 and up.json()["n_records"] == len(CHATS), up.text
        pqr = c.post("/v1/calibration-sets", files={"file": ("chats.parquet", buf.getvalue())})
        assert pqr.status_code == 201 and pqr.json()["n_records"] == len(CHATS), pqr.text
        bad = c.post(
            "/v1/calibration-sets", files={"file": ("bad.jsonl", b'{"messages": [{"content": "x"}]}\n')}
        )
        assert bad.status_code == 422 and "role" in bad.json()["detail"], bad.text
        # txt uploads split on the engine's blank-line rule (a line of spaces is blank too)
        txt = c.post("/v1/calibration-sets", files={"file": ("a.txt", b"one\n  \ntwo\n\nthree\n")})
        assert txt.json()["n_records"] == 3

        cal = {"upload_id": up.json()["id"], "n_samples": 4, "seq_len": 32}
        chat_model = str(_with_chat_template(service.model_dir))
        ok = c.post(
            "/v1/jobs", json=service.job_body(model=chat_model, calibration=cal, eval={"enabled": False})
        )
        no_template = c.post("/v1/jobs", json=service.job_body(calibration=cal, eval={"enabled": False}))
        assert ok.status_code == 202 and no_template.status_code == 202, (ok.text, no_template.text)
        done = wait_for_status(c, ok.json()["id"], TERMINAL, timeout=300)
        assert done["status"] == "succeeded", done
        assert done["metrics"]["calibration_samples"] == 4
        failed = wait_for_status(c, no_template.json()["id"], TERMINAL, timeout=300)
        assert failed["status"] == "failed" and "chat template" in failed["error"], failed
