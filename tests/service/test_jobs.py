"""Jobs that really run: HTTP -> Redis -> Celery worker process -> engine -> Postgres -> download."""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from .conftest import wait_for_status

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")


def _sse(client, job_id: str, last_event_id: int | None = None) -> list[tuple[int | None, str, dict]]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
    events, eid, kind = [], None, None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=180) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((eid, kind, json.loads(line[6:])))
                eid = None
    return events


def test_job_end_to_end(service, make_key, db_session):
    from app.models import Artifact, JobMetrics, LayerMetric

    key, other = make_key("acme"), make_key()  # tenant "acme" publishes to its own namespace
    body = service.job_body(
        formats=["awq", "compressed-tensors"],
        publish={"repo_id": "acme/tiny-llama-awq", "private": True, "token": "hf_SECRET_never_shown"},
    )
    with service.client(key) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["Location"] == f"/v1/jobs/{job_id}"
        assert r.json()["status"] in ("queued", "running")
        assert "hf_SECRET" not in r.text

        events = _sse(c, job_id)  # follows until the job ends
        assert events[-1][1] == "end" and events[-1][2]["status"] == "succeeded", events[-5:]
        stages = {e[2]["stage"] for e in events if e[1] == "progress"}
        assert {"quantize"} <= stages
        progress = [e[2]["progress"] for e in events if e[1] == "progress"]
        assert progress == sorted(progress) and progress[-1] <= 1.0
        # Resumable: after a given id only the later events come back.
        mid = events[len(events) // 2][0]
        resumed = _sse(c, job_id, last_event_id=mid)
        assert [e[0] for e in resumed if e[0]] == [e[0] for e in events if e[0] and e[0] > mid]

        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
        m = job["metrics"]
        assert (
            m["fp_perplexity"] > 0
            and m["quant_perplexity"] > 0
            and m["size_after_bytes"] < m["size_before_bytes"]
        )
        # what it really calibrated and evaluated on, beside the other metrics
        assert m["calibration_samples"] > 0 and m["calibration_tokens"] > 0 and m["eval_tokens"] > 0
        assert m["calibration_shortfall"] >= 0
        assert {a["format"] for a in job["artifacts"]} >= {"awq", "compressed-tensors"}
        assert "hf_SECRET" not in json.dumps(job) and "token" not in job["spec"]["publish"]

        # Rows in Postgres, queryable with SQL.
        db_session.expire_all()
        assert db_session.get(JobMetrics, job_id).quant_perplexity == pytest.approx(m["quant_perplexity"])
        n_layers = db_session.scalar(
            select(func.count()).select_from(LayerMetric).where(LayerMetric.job_id == job_id)
        )
        assert n_layers > 0
        assert c.get(f"/v1/jobs/{job_id}/layers").json()["count"] == n_layers
        assert (
            db_session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            >= 2
        )

        # Download through the API, byte for byte.
        arts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        awq = next(a for a in arts if a["format"] == "awq")
        cfg = next(f for f in awq["files"] if f["path"] == "config.json")
        got = c.get(cfg["url"])
        assert got.status_code == 200
        on_disk = db_session.get(Artifact, awq["id"]).path
        assert got.content == (__import__("pathlib").Path(on_disk) / "config.json").read_bytes()
        for evil in ("../../../../etc/passwd", "..%2F..%2Fsecret.key", "%2e%2e/%2e%2e/worker.log"):
            assert c.get(f"/v1/jobs/{job_id}/artifacts/{awq['id']}/files/{evil}").status_code == 404, evil
        # Published to the local hub folder (one sub folder per format).
        hub = service.home / "hub" / "acme" / "tiny-llama-awq"
        assert (hub / "awq" / "config.json").exists() and (hub / "compressed-tensors").is_dir()
        assert awq["published_to"] == "local:acme/tiny-llama-awq/awq"  # the repo, not the server folder

        logs = c.get(f"/v1/jobs/{job_id}/logs").text
        assert "succeeded" in logs and "hf_SECRET" not in logs
    with service.client(other) as c2:
        assert c2.get(cfg["url"]).status_code == 404
    # The token never reaches the database in clear.
    from app.models import Job

    row = db_session.get(Job, job_id)
    assert row.publish_token_enc is None and "hf_SECRET" not in json.dumps(row.spec)

    # Redelivery of a finished job does not run it again.
    from worker.runner import run_job

    assert run_job(job_id, worker_name="redelivery") == "already succeeded"


def test_failure_is_readable_and_retry_works(service, make_key):
    missing = service.home / "models" / "not-yet-there"
    with service.client(make_key()) as c:
        job_id = c.post("/v1/jobs", json=service.job_body(model=str(missing))).json()["id"]
        job = wait_for_status(c, job_id, TERMINAL)
        assert job["status"] == "failed", job
        assert job["error"].startswith("resolve failed:") and "not-yet-there" in job["error"]
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
        shutil.copytree(service.model_dir, missing)
        r = c.post(f"/v1/jobs/{job_id}/retry")
        assert (
            r.status_code == 202 and r.json()["status"] in ("queued", "running") and r.json()["error"] is None
        )
        job = wait_for_status(c, job_id, TERMINAL)
        assert job["status"] == "succeeded", job
        assert c.post(f"/v1/jobs/{job_id}/retry").status_code == 409


def test_cancel_running_and_queued(service, make_key, db_session):
    from app.models import Job

    with service.client(make_key()) as c:
        slow = c.post(
            "/v1/jobs",
            json=service.job_body(
                model=str(service.deep_model_dir),
                calibration={"source": f"file:{service.calib_file}", "n_samples": 8, "seq_len": 64},
            ),
        ).json()["id"]
        deadline = time.monotonic() + 90
        while True:  # wait until it is inside the block loop
            j = c.get(f"/v1/jobs/{slow}").json()
            if j["status"] == "running" and j["stage"] == "quantize":
                break
            assert j["status"] in ("queued", "running") and time.monotonic() < deadline, j
            time.sleep(0.1)
        # One worker, one job at a time: this one waits in the queue.
        queued = c.post("/v1/jobs", json=service.job_body()).json()["id"]
        r = c.post(f"/v1/jobs/{queued}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        r = c.post(f"/v1/jobs/{slow}/cancel")
        assert r.status_code == 202 and r.json()["status"] in ("running", "cancelled")
        job = wait_for_status(c, slow, TERMINAL, timeout=60)
        assert job["status"] == "cancelled", job
        assert job["metrics"] is None and job["artifacts"] == []
        out = db_session.get(Job, slow).output_dir
        assert out and not __import__("os").path.exists(out), "partial output removed"
        # The queued job's message reaches the worker, which leaves it alone.
        time.sleep(2)
        q = c.get(f"/v1/jobs/{queued}").json()
        assert q["status"] == "cancelled" and q["started_at"] is None and q["attempts"] == 0
        # A cancelled job can be retried.
        assert c.post(f"/v1/jobs/{queued}/retry").status_code == 202
        assert wait_for_status(c, queued, TERMINAL)["status"] == "succeeded"


def test_stale_heartbeat_requeues_or_fails(service, make_key):
    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.services.jobs import reap_stale_jobs

    with service.client(make_key()) as c:
        # Calibration from an upload: the worker turns upload:<id> into the stored file for the engine.
        up = c.post(
            "/v1/calibration-sets", files={"file": ("calib.txt", service.calib_file.read_bytes()[:200_000])}
        )
        assert up.status_code == 201, up.text
        body = service.job_body(calibration={"upload_id": up.json()["id"], "n_samples": 4, "seq_len": 32})
        ids = []
        for _ in range(2):
            r = c.post("/v1/jobs", json=body)
            assert (
                r.status_code == 202
                and r.json()["spec"]["calibration"]["source"] == f"upload:{up.json()['id']}"
            )
            ids.append(r.json()["id"])
        for job_id in ids:
            assert wait_for_status(c, job_id, TERMINAL)["status"] == "succeeded"
        # Pretend both died mid-run: one with attempts left, one out of attempts.
        with session_scope() as s:
            for job_id, attempts in zip(ids, (1, 3), strict=True):
                job = s.get(Job, job_id)
                job.status, job.attempts, job.worker = "running", attempts, "dead-worker@host"
                job.heartbeat_at = utcnow() - timedelta(minutes=10)
        with session_scope() as s:
            requeued = reap_stale_jobs(s)
        assert requeued == [ids[0]]
        failed = c.get(f"/v1/jobs/{ids[1]}").json()
        assert failed["status"] == "failed" and "worker lost" in failed["error"]
        again = wait_for_status(c, ids[0], TERMINAL)
        assert again["status"] == "succeeded" and again["attempts"] == 2
