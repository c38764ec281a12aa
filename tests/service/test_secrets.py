"""No submitted token survives anywhere outward, for every way a job ends.

The secret fields are found by walking JobSpec for the SECRET marker (not by a list of names); each job of
the test gives every one of them its own token. After the jobs have ended (succeeded and published, failed,
cancelled while queued, cancelled while running, reaped after its worker died), none of the tokens is in:
the API's views (job, list, logs, events, layers, artifacts, artifact files), the job's files under the
service's home (artifact folders, the published hub folder, uploads, work folders, the worker's log), the
Postgres rows of every table, the Redis commands seen while the jobs ran (Celery message bodies decoded),
the API's and the worker's metrics and the test process's log records (the API runs in it).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from datetime import timedelta

import pytest

from .conftest import REDIS_URL, wait_for_status

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")


def _set(body: dict, path: tuple[str, ...], value: str) -> None:
    """Put `value` at `path` of a request body (the body nests source and publish as the spec does)."""
    node = body
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _tokens(ending: str) -> dict[tuple[str, ...], str]:
    from awqforge.spec import secret_fields

    return {path: f"hf_{ending}_{'_'.join(path)}_{uuid.uuid4().hex}" for path in secret_fields()}


def test_secret_fields_are_found_by_their_marker_and_public_spec_drops_them():
    from awqforge.spec import JobSpec, public_spec, secret_fields

    paths = secret_fields()
    assert ("source", "token") in paths and ("publish", "token") in paths
    data = {"model": "org/name", "publish": {"repo_id": "org/out"}}
    tokens = _tokens("unit")
    for path, value in tokens.items():
        _set(data, path, value)
    spec = JobSpec.model_validate(data)
    for view in (public_spec(spec), public_spec(spec.model_dump(mode="json"))):
        text = json.dumps(view)
        assert not any(t in text for t in tokens.values()), text
        assert view["publish"]["repo_id"] == "org/out" and "token" not in view["source"]
    # the stored view is enough to rebuild the spec (the worker adds the tokens from their columns)
    assert JobSpec.model_validate(public_spec(spec)).source.token is None


class _RedisTap:
    """Every command Redis executes while the test runs (MONITOR), Celery message bodies decoded."""

    def __init__(self) -> None:
        import redis

        self.lines: list[str] = []
        self._conn = redis.Redis.from_url(REDIS_URL)
        self._mon = self._conn.monitor()
        self._mon.__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for cmd in self._mon.listen():
                self.lines.append(cmd.get("command", ""))
        except Exception:  # the connection closed: done
            pass

    def stop(self) -> str:
        try:
            self._mon.connection.disconnect()
        except Exception:
            pass
        self._thread.join(timeout=5)
        out = []
        for line in list(self.lines):
            out.append(line)
            for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", line):  # Celery's base64 message bodies
                try:
                    out.append(base64.b64decode(run, validate=True).decode(errors="replace"))
                except ValueError:
                    continue
        return "\n".join(out)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _tree_bytes(root) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def _db_text(session) -> tuple[str, list]:
    """Every row of every table of the service's database as JSON text, and the token columns of the jobs."""
    from sqlalchemy import text

    tables = session.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
    rows = []
    for table in tables:
        rows += [
            json.dumps(r, default=str)
            for r in session.execute(text(f'SELECT row_to_json(t) FROM "{table}" t')).scalars()
        ]
    cols = session.execute(text("SELECT id, status, source_token_enc, publish_token_enc FROM jobs")).all()
    return "\n".join(rows), cols


def test_no_token_survives_any_ending(service, make_key):
    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.services.jobs import reap_stale_jobs

    tap = _RedisTap()
    records = _Records()
    logging.getLogger().addHandler(records)
    tenant = f"sec-{uuid.uuid4().hex[:6]}"
    key = make_key(tenant)
    tokens: dict[str, dict] = {}
    ids: dict[str, str] = {}

    def submit(c, ending: str, **overrides) -> str:
        body = service.job_body(**overrides)
        body.setdefault("publish", {"repo_id": f"{tenant}/{ending}", "private": True})
        tokens[ending] = _tokens(ending)
        for path, value in tokens[ending].items():
            _set(body, path, value)
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        ids[ending] = r.json()["id"]
        return ids[ending]

    try:
        with service.client(key) as c:
            slow = submit(
                c,
                "cancelled_running",
                model=str(service.deep_model_dir),
                calibration={"source": f"file:{service.calib_file}", "n_samples": 8, "seq_len": 64},
            )
            deadline = time.monotonic() + 120
            while (j := c.get(f"/v1/jobs/{slow}").json())["stage"] != "quantize":
                assert j["status"] in ("queued", "running") and time.monotonic() < deadline, j
                time.sleep(0.1)
            # One worker, one job at a time: these wait in the queue behind it.
            queued = submit(c, "cancelled_queued")
            reaped = submit(c, "reaped")
            assert c.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
            with session_scope() as s:  # its worker died mid-run, out of attempts
                job = s.get(Job, reaped)
                job.status, job.attempts, job.worker = "running", 3, "dead-worker@host"
                job.heartbeat_at = utcnow() - timedelta(minutes=10)
            with session_scope() as s:
                reap_stale_jobs(s)
            submit(c, "failed", model=str(service.home / "models" / "never-there"))
            submit(c, "succeeded")
            assert c.post(f"/v1/jobs/{slow}/cancel").status_code == 202
            ended = {e: wait_for_status(c, i, TERMINAL, 300) for e, i in ids.items()}
            assert {e: j["status"] for e, j in ended.items()} == {
                "cancelled_running": "cancelled",
                "cancelled_queued": "cancelled",
                "reaped": "failed",
                "failed": "failed",
                "succeeded": "succeeded",
            }, ended
            time.sleep(2)  # the queued jobs' messages reach the worker, which leaves them alone

            views: dict[str, str] = {}
            for ending, job_id in ids.items():
                got = [c.get(f"/v1/jobs/{job_id}").text, c.get(f"/v1/jobs/{job_id}/logs").text]
                got.append(c.get(f"/v1/jobs/{job_id}/layers").text)
                got.append(c.get(f"/v1/jobs/{job_id}/artifacts").text)
                with c.stream("GET", f"/v1/jobs/{job_id}/events") as ev:  # ends: the job has ended
                    got.append(ev.read().decode())
                for art in ended[ending]["artifacts"]:
                    for f in art["files"]:
                        got.append(c.get(f["url"]).content.decode(errors="replace"))
                views[ending] = "\n".join(got)
            views["list"] = c.get("/v1/jobs", params={"limit": 100}).text
            views["metrics"] = (
                c.get("/metrics").text + __import__("httpx").get(service.worker_metrics_url).text
            )
            published = [p for p, b in _tree_bytes(service.home / "hub") if f"{tenant}/succeeded" in p]
            assert any(p.endswith("quant_report.json") for p in published), published
            report = next(
                b
                for p, b in _tree_bytes(service.home / "hub")
                if p.endswith("quant_report.json") and f"{tenant}/succeeded" in p
            )
            assert "token" not in json.loads(report)["settings"]["source"]
        with session_scope() as s:
            db_text, token_cols = _db_text(s)
    finally:
        logging.getLogger().removeHandler(records)
        redis_text = tap.stop()

    files = _tree_bytes(service.home)
    ended_rows = [(src, pub) for job_id, _status, src, pub in token_cols if job_id in ids.values()]
    assert len(ended_rows) == len(ids) and all(r == (None, None) for r in ended_rows), ended_rows
    logs = "\n".join(records.lines)
    checked = 0
    for ending, secrets in tokens.items():
        for path, token in secrets.items():
            where = f"{ending}: {'.'.join(path)}"
            for name, view in views.items():
                assert token not in view, f"{where} in the API view of {name}"
            for p, data in files:
                assert token.encode() not in data, f"{where} in {p}"
            assert token not in db_text, f"{where} in Postgres"
            assert token not in redis_text, f"{where} in Redis"
            assert token not in logs, f"{where} in the API's log"
            checked += 1
    assert checked == len(ids) * 2 and redis_text  # the tap saw the traffic
