"""Stored artifacts are deleted: DELETE /v1/jobs/{id} (awqforge delete JOB) removes a finished job with its
files or objects for its tenant, ARTIFACT_RETENTION_DAYS expires them, and the S3 store deletes exactly one
job's objects (against moto's S3 server on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from .cluster import MotoServer
from .conftest import wait_for_status

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")


def test_s3_store_deletes_one_jobs_objects(monkeypatch, tmp_path):
    from app.core.config import settings
    from app.services.storage import S3Store

    moto = MotoServer()
    try:
        bucket = f"awqf-{uuid.uuid4().hex[:10]}"
        moto.client().create_bucket(Bucket=bucket)
        for k, v in moto.env(bucket).items():
            monkeypatch.setattr(settings, k, v)
        art = tmp_path / "awq"
        art.mkdir()
        (art / "config.json").write_text("{}")
        store = S3Store()
        kept = store.put(art, key="tenant-7/job_10/awq")
        for fmt in ("awq", "compressed-tensors"):
            store.put(art, key=f"tenant-7/job_1/{fmt}")
        assert store.job_location(7, "job_1") == f"s3://{bucket}/awqforge/tenant-7/job_1"
        store.delete(store.job_location(7, "job_1"))
        keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys == ["awqforge/tenant-7/job_10/awq/config.json"]  # job_10 shares a prefix, not a folder
        assert [f.path for f in store.list_files(kept)] == ["config.json"]
    finally:
        moto.stop()


def test_delete_job_and_artifact_retention(service, make_key, db_session):
    from app.core.db import session_scope
    from app.models import Artifact, Job, utcnow
    from app.services import lifecycle

    owner, other = make_key(), make_key()
    body = service.job_body(eval={"enabled": False})
    with service.client(owner) as c:
        ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
        jobs = [wait_for_status(c, i, TERMINAL, 300) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
        with session_scope() as s:
            folders = [Path(a.path) for a in s.query(Artifact).filter(Artifact.job_id.in_(ids))]
            tenant_id = s.get(Job, ids[0]).tenant_id
            live = Job(
                tenant_id=tenant_id,
                model="x/y",
                method="awq",
                bits=4,
                group_size=128,
                spec={},
                queue="cpu",  # no worker serves it
                status="queued",
                progress=0.0,
                attempts=0,
                cancel_requested=False,
            )
            s.add(live)
            s.flush()
            live_id = live.id
        assert folders and all(f.exists() for f in folders)
        with service.client(other) as o:
            assert o.delete(f"/v1/jobs/{ids[0]}").status_code == 404  # another tenant's
        r = c.delete(f"/v1/jobs/{live_id}")
        assert r.status_code == 409 and "cancel it first" in r.text
        assert c.delete(f"/v1/jobs/{ids[0]}").status_code == 204
        assert c.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert c.delete(f"/v1/jobs/{ids[0]}").status_code == 404
        assert not lifecycle.job_output_dir(tenant_id, ids[0]).exists()

        # Retention: the second job ended 10 days ago; with 7 days its artifacts go, the job stays.
        with session_scope() as s:
            s.get(Job, ids[1]).finished_at = utcnow() - timedelta(days=10)
        with session_scope() as s:
            assert lifecycle.expire_artifacts(s, days=30) == []
            assert lifecycle.expire_artifacts(s, days=7) == [ids[1]]
        kept = c.get(f"/v1/jobs/{ids[1]}").json()
        assert kept["status"] == "succeeded" and kept["artifacts"] == [] and kept["metrics"] is not None
        assert "artifacts expired" in c.get(f"/v1/jobs/{ids[1]}/logs").text
        assert not any(f.exists() for f in folders)
        assert c.post(f"/v1/jobs/{ids[1]}/publish").status_code == 409  # nothing left to publish
        # `awqforge delete JOB` (the client command) deletes the job that is left
        run = "import sys; from app.client import delete_command; sys.exit(delete_command(sys.argv[1:]))"
        env = {**os.environ, "AWQFORGE_URL": service.url, "AWQFORGE_API_KEY": owner}
        r = subprocess.run(
            [sys.executable, "-c", run, ids[1]], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 0 and f"{ids[1]}  deleted" in r.stdout, r.stderr
        assert c.get(f"/v1/jobs/{ids[1]}").status_code == 404
        c.post(f"/v1/jobs/{live_id}/cancel")
