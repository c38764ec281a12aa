"""Scale-out: worker processes (each its own "machine") on different queues, one API; jobs go to the class
that fits and has a live worker, classes without one are reported, and workers run jobs side by side."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from .cluster import Cluster
from .conftest import SERVICE_ENV, wait_for_status
from .test_routing import LLAMA_70B

pytestmark = pytest.mark.services


def _interval(job: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"])


def test_jobs_routed_to_live_classes_and_run_in_parallel(service, make_key):
    cfg_only = service.home / "models" / "scaleout-70b-config"
    cfg_only.mkdir(parents=True, exist_ok=True)
    (cfg_only / "config.json").write_text(json.dumps(LLAMA_70B))
    cluster = Cluster(SERVICE_ENV, models_root=service.home)
    try:
        key = make_key(max_queued=10)
        fast = {"eval": {"enabled": False}}
        with cluster.client(key) as c:
            # nobody is alive yet: the job waits, and says so
            r = c.post("/v1/jobs", json=service.job_body(**fast))
            assert r.status_code == 202, r.text
            assert r.json()["queue"] == "cpu" and "no worker is alive" in r.json()["waiting_reason"]
            first = r.json()["id"]

            # a CPU-only deployment: device=auto goes to cpu, where the live worker is
            cluster.start_worker("cpu-1", ["cpu"])
            assert wait_for_status(c, first, ("succeeded", "failed"), timeout=240)["status"] == "succeeded"
            r = c.post("/v1/jobs", json=service.job_body(device="auto", **fast))
            assert r.json()["queue"] == "cpu" and r.json()["waiting_reason"] is None, r.json()
            auto_cpu = r.json()["id"]
            # a job only a large GPU class can hold waits on it, with the reason in its status
            big = c.post("/v1/jobs", json={"model": str(cfg_only), "device": "cuda"})
            assert big.status_code == 202 and big.json()["queue"] == "gpu-80g", big.text
            assert "no live worker consumes queue 'gpu-80g'" in big.json()["waiting_reason"]
            assert "live: cpu" in c.get(f"/v1/jobs/{big.json()['id']}").json()["waiting_reason"]
            assert c.post(f"/v1/jobs/{big.json()['id']}/cancel").status_code in (200, 202)
            assert wait_for_status(c, auto_cpu, ("succeeded", "failed"), timeout=240)["status"] == "succeeded"

            # a GPU-class worker joins: device=auto now goes there, device=cpu stays on cpu, side by side
            cluster.start_worker("gpu24-1", ["gpu-24g"])
            deep = str(service.deep_model_dir)
            on_gpu = c.post("/v1/jobs", json=service.job_body(model=deep, device="auto", **fast)).json()
            on_cpu = c.post("/v1/jobs", json=service.job_body(model=deep, device="cpu", **fast)).json()
            assert (on_gpu["queue"], on_cpu["queue"]) == ("gpu-24g", "cpu")
            done = [
                wait_for_status(c, j["id"], ("succeeded", "failed"), timeout=300) for j in (on_gpu, on_cpu)
            ]
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], done
        from app.core.db import session_scope
        from app.models import Job

        with session_scope() as s:
            workers = [s.get(Job, j["id"]).worker for j in done]
        assert "gpu24-1" in workers[0] and "cpu-1" in workers[1], workers
        (s1, e1), (s2, e2) = _interval(done[0]), _interval(done[1])
        assert s1 < e2 and s2 < e1, (
            f"the two jobs did not overlap: {done[0]['started_at']}..{done[0]['finished_at']} vs {done[1]['started_at']}..{done[1]['finished_at']}"
        )
    finally:
        cluster.close()
