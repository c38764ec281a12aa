"""Prometheus at /metrics (API) and on the worker's own port, scraped from the real processes, and the
metrics API (/v1/metrics/summary, /v1/jobs/{id}/metrics) scoped to the caller's tenant."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for_status

pytestmark = pytest.mark.services


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def finished_jobs(service):
    """Tenant A runs two jobs on the cpu queue (the second waits in the broker behind the first)."""
    from app.core.db import session_scope
    from app.services.keys import create_api_key

    with session_scope() as s:
        key = create_api_key(s, tenant_name="metrics-a").secret
        other = create_api_key(s, tenant_name="metrics-b").secret
    import threading

    from worker.celery_app import celery_app

    # Celery task events (what Flower shows), received from the broker like Flower does.
    events: list[str] = []
    conn = celery_app.connection()
    receiver = celery_app.events.Receiver(conn, handlers={"*": lambda e: events.append(e["type"])})
    listener = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None), daemon=True)
    listener.start()
    api = f"{service.url}/metrics"
    before_api, before_worker = scrape(api), scrape(service.worker_metrics_url)
    with service.client(key) as c:
        bodies = [service.job_body(), service.job_body(eval={"enabled": False})]  # the 2nd: no perplexity
        ids = [c.post("/v1/jobs", json=b).json()["id"] for b in bodies]
        seen_depth = seen_running = 0.0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = scrape(api)
            seen_depth = max(seen_depth, value(now, "awqforge_queue_depth", queue="cpu"))
            seen_running = max(seen_running, value(now, "awqforge_jobs_running", queue="cpu"))
            if all(c.get(f"/v1/jobs/{i}").json()["status"] != "queued" for i in ids[1:]) and seen_depth:
                break
            time.sleep(0.3)
        jobs = [wait_for_status(c, i, ("succeeded", "failed", "cancelled"), timeout=240) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    deadline = time.monotonic() + 10
    while events.count("task-succeeded") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    # a worker sends a heartbeat event every 2 s: tiny jobs on a quiet machine can finish between two
    deadline = time.monotonic() + 10
    while "worker-heartbeat" not in events and time.monotonic() < deadline:
        time.sleep(0.2)
    receiver.should_stop = True
    return dict(
        events=list(events),
        key=key,
        other=other,
        jobs=jobs,
        before_api=before_api,
        before_worker=before_worker,
        seen_depth=seen_depth,
        seen_running=seen_running,
    )


def test_api_metrics_from_postgres_and_the_broker(service, finished_jobs):
    r = httpx.get(f"{service.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after, before = scrape(f"{service.url}/metrics"), finished_jobs["before_api"]
    d = lambda name, **lb: value(after, name, **lb) - value(before, name, **lb)  # noqa: E731
    assert d("awqforge_jobs_submitted_total") >= 2
    assert d("awqforge_jobs_finished_total", status="succeeded") >= 2
    assert finished_jobs["seen_running"] >= 1  # a gauge that went up while the first job ran
    assert finished_jobs["seen_depth"] >= 1  # the second job waited in the Redis queue
    assert value(after, "awqforge_broker_up") == 1
    assert {"cpu", "gpu-24g", "gpu-80g"} <= {
        dict(k[1]).get("queue") for k in after if k[0] == "awqforge_queue_depth"
    }
    # The worker's heartbeat row: one live worker on each queue it consumes, seen seconds ago.
    assert value(after, "awqforge_workers", queue="cpu") >= 1
    ages = [v for (n, lb), v in after.items() if n == "awqforge_worker_last_seen_age_seconds"]
    assert ages and min(ages) < 4
    # Bounded label sets: no job, model or tenant ids anywhere.
    text = r.text
    for j in finished_jobs["jobs"]:
        assert j["id"] not in text and j["model"] not in text
    assert "metrics-a" not in text


def test_celery_task_events_for_flower(finished_jobs):
    ev = finished_jobs["events"]
    assert (
        ev.count("task-received") >= 2 and ev.count("task-started") >= 2 and ev.count("task-succeeded") >= 2
    )
    assert "worker-heartbeat" in ev  # what Flower uses to show workers online


def test_worker_serves_its_own_metrics(service, finished_jobs):
    after, before = scrape(service.worker_metrics_url), finished_jobs["before_worker"]
    d = lambda name, **lb: value(after, name, **lb) - value(before, name, **lb)  # noqa: E731
    assert d("awqforge_worker_jobs_total", queue="cpu", status="succeeded") >= 2
    assert d("awqforge_worker_job_duration_seconds_count", queue="cpu", status="succeeded") >= 2
    buckets = {dict(k[1])["le"] for k in after if k[0] == "awqforge_worker_job_duration_seconds_bucket"}
    assert "43200.0" in buckets and "+Inf" in buckets  # buckets up to hours
    assert d("awqforge_worker_stage_duration_seconds_count", stage="quantize") >= 2
    assert value(after, "awqforge_worker_heartbeats_total") >= 1
    assert time.time() - value(after, "awqforge_worker_last_heartbeat_timestamp_seconds") < 5
    assert "awqforge_worker_publish_failures_total" in {k[0] for k in after}
    assert all(finished_jobs["jobs"][0]["id"] not in str(k) for k in after)


def test_metrics_summary_is_per_tenant(service, finished_jobs):
    with service.client(finished_jobs["key"]) as c:
        s = c.get("/v1/metrics/summary", params={"since": "1h"}).json()
        assert s["jobs_by_status"]["succeeded"] == 2 and s["jobs_by_status"]["failed"] == 0
        assert s["queue_depth"]["cpu"] == {"queued": 0, "running": 0}
        assert s["stage_durations"]["quantize"]["n"] == 2 and s["stage_durations"]["quantize"]["p95_s"] > 0
        assert s["duration_by_size_class"]["<1GiB"]["n"] == 2
        ms = [j["metrics"] for j in finished_jobs["jobs"]]
        pct = 100 * (ms[0]["quant_perplexity"] - ms[0]["fp_perplexity"]) / ms[0]["fp_perplexity"]
        assert s["perplexity_change"]["pct"] == pytest.approx([pct]) and ms[1]["quant_perplexity"] is None
        assert s["bytes_saved"] == sum(m["size_before_bytes"] - m["size_after_bytes"] for m in ms)
        assert s["gpu_hours"] == 0 and s["cpu_hours"] == pytest.approx(sum(m["total_s"] for m in ms) / 3600)
        assert (
            c.get("/v1/metrics/summary", params={"since": "2099-01-01T00:00:00Z"}).json()["jobs_by_status"][
                "succeeded"
            ]
            == 0
        )
        bad = c.get("/v1/metrics/summary", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "since"
    with service.client(finished_jobs["other"]) as c:
        s = c.get("/v1/metrics/summary").json()
        assert sum(s["jobs_by_status"].values()) == 0 and s["bytes_saved"] == 0
        assert c.get(f"/v1/jobs/{finished_jobs['jobs'][0]['id']}/metrics").status_code == 404
    with service.client(None) as c:
        assert c.get("/v1/metrics/summary").status_code == 401


def test_job_metrics_detail(service, finished_jobs):
    job = finished_jobs["jobs"][0]
    with service.client(finished_jobs["key"]) as c:
        m = c.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert m["status"] == "succeeded" and m["peak_rss_bytes"] > 0 and m["total_s"] > 0
    assert m["total_s"] >= sum(m["stage_timings_s"].values()) * 0.9
    assert {"resolve", "calibrate", "quantize", "evaluate", "package"} <= set(m["stage_timings_s"])
    assert m["quant_perplexity"] == pytest.approx(job["metrics"]["quant_perplexity"])
    assert len(m["layers"]) == 14  # 2 blocks x 7 linears
    assert all(r["mse_quant"] is not None for r in m["layers"])
    assert any(r["clip_ratio"] is not None for r in m["layers"])
    assert any(r["scale_ratio"] is not None for r in m["layers"])


def test_grafana_dashboard_uses_exposed_metrics(service, finished_jobs):
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "awqforge.json").read_text())
    used = {
        name
        for p in dash["panels"]
        for t in p["targets"]
        for name in re.findall(r"awqforge_[a-z_]+", t["expr"])
    }
    exposed = {k[0] for k in scrape(f"{service.url}/metrics")} | {
        k[0] for k in scrape(service.worker_metrics_url)
    }
    assert used and used <= exposed, used - exposed


def test_prometheus_metrics_follow_the_configured_queue_classes(service, monkeypatch):
    """A deployment's own classes (gpu-48g) are the ones /metrics reports, not the default three."""
    from app.core.config import settings
    from app.metrics import render_metrics

    monkeypatch.setattr(settings, "QUEUE_CLASSES", "cpu=64GiB,gpu-48g=48GiB")
    body = render_metrics()[0].decode()
    for family in ("awqforge_jobs_queued", "awqforge_jobs_running", "awqforge_workers"):
        queues = set(re.findall(rf'^{family}{{queue="([^"]+)"}}', body, re.M))
        assert queues == {"cpu", "gpu-48g"}, (family, queues)
