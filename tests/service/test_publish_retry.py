"""Publish retries with the artifacts in an object store, against real processes: the API and workers as
processes of their own (each its own AWQFORGE_HOME: another machine), moto's S3 server, the local hub server
(tests/service/hub_server.py) behind the real huggingface_hub client, the API's own reaper loop.

A job whose publish failed keeps only the object store's copy of its artifact set; POST /v1/jobs/{id}/publish
publishes that copy (downloaded and checked against the recorded sha256s) in one commit. A worker killed while
publishing: the reaper sends the job back to the publish task only, and the artifact set stays the same."""

from __future__ import annotations

import hashlib
import os
import signal
import uuid

import pytest

from .cluster import Cluster, MotoServer, assert_bucket_matches_rows
from .conftest import HOME, SERVICE_ENV, wait_for_status
from .hub_server import HubServer

pytestmark = pytest.mark.services

ALICE = "hf_alice_SECRET"
DONE = ("succeeded", "failed", "cancelled")
ENGINE_STAGES = ("resolve", "calibrate", "quantize", "evaluate", "package")


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    server.add_user(ALICE, "alice", orgs=("acme",))
    yield server
    server.stop()


@pytest.fixture
def deployment(service, moto, hub):
    bucket = f"awqf-{uuid.uuid4().hex[:10]}"
    moto.client().create_bucket(Bucket=bucket)
    env = {
        **moto.env(bucket),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(HOME / "hf-home-publish"),
        "PUBLISH_BACKEND": "huggingface",
        "PUBLISH_ATTEMPTS": "2",
        "PUBLISH_BACKOFF_S": "0.1",
        "HEARTBEAT_STALE_S": "10",
        "REAPER_INTERVAL_S": "1",  # the API's reaper + reconciler loop requeues and sends
        # one key on every machine (each has its own AWQFORGE_HOME): the API encrypts the tokens workers read
        "SECRET_KEY": "publish-retry-test-key-" + uuid.uuid4().hex,
    }
    cluster = Cluster(SERVICE_ENV, models_root=service.home, api_env=env)
    try:
        cluster.start_worker("w1", ["cpu"], env=env)
        yield cluster, env, bucket
    finally:
        cluster.close()


def _key(make_key) -> str:
    from app.core.db import session_scope
    from app.services.keys import upsert_tenant

    name = f"t-{uuid.uuid4().hex[:6]}"
    with session_scope() as s:
        upsert_tenant(s, name=name, create=True, namespaces=["acme"])
    return make_key(name)


def _artifact_set(job_id: str) -> dict[str, tuple[str, str, list]]:
    """id -> (format, location, recorded files) as the database holds them."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import Artifact

    with session_scope() as s:
        return {
            a.id: (a.format, a.path, a.files)
            for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))
        }


def _events(job_id: str) -> list[tuple[str, str | None, str | None]]:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import JobEvent

    with session_scope() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [(e.kind, e.stage, e.message) for e in rows]


def _fail_first_publish(service, hub, c, repo_id: str) -> dict:
    """A job whose publish fails (the hub answers 500 to every commit), then the hub repaired."""
    hub.fail("POST", rf"/api/models/{repo_id}/commit/main$", 500, times=1000)
    body = service.job_body(eval={"enabled": False}, publish={"repo_id": repo_id, "token": ALICE})
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_for_status(c, r.json()["id"], DONE, timeout=300)
    assert job["status"] == "failed" and job["stage"] == "publish", job
    assert "500" in job["error"] and "SECRET" not in job["error"]
    hub.faults.clear()
    return job


def _assert_one_commit_of_the_artifact(moto, hub, repo_id: str, artifacts: dict) -> None:
    """The repo holds its creation commit and exactly one of ours, whose files are the artifact's, byte for byte
    (the object store's bytes and the sha256s the run recorded)."""
    repo = hub.repos[repo_id]
    assert len(repo.commits) == 2, [sorted(f) for _, f in repo.commits]
    files = repo.files_at("main")[1]
    ((fmt, location, recorded),) = [v for v in artifacts.values() if v[0] != "report"]
    assert fmt == "awq" and location.startswith("s3://")
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    assert set(files) - {".gitattributes"} == {f["path"] for f in recorded}
    assert any(f["path"].endswith(".safetensors") for f in recorded)
    for f in recorded:
        stored = moto.client().get_object(Bucket=bucket, Key=f"{prefix}/{f['path']}")["Body"].read()
        assert files[f["path"]] == stored, f["path"]
        assert hashlib.sha256(stored).hexdigest() == f["sha256"] and len(stored) == f["size_bytes"]


def _no_copies_left(cluster, *workers: str) -> None:
    """Neither the worker that made the artifacts nor the one that published them keeps a copy."""
    for name in workers:
        art = cluster.home(name) / "artifacts"
        assert not art.exists() or not any(art.rglob("*.safetensors")), sorted(art.rglob("*"))


def _kill_mid_commit(cluster, env, c, job_id: str, held) -> None:
    """SIGKILL of worker w1 (main process and pool child) while the hub holds its commit; w2 starts on another
    "machine" and takes the job over once the API's reaper sees the stale heartbeat."""
    assert held.arrived.wait(300), "the publish never reached the commit"
    w1 = cluster.workers.pop("w1")
    os.killpg(w1.pid, signal.SIGKILL)
    w1.wait()
    assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    cluster.start_worker("w2", ["cpu"], env=env)


def _assert_only_published_after(events: list, marker: str) -> list[str]:
    """From the last event whose message is `marker` on: nothing but publishing ran (no engine stage, no whole
    run), the job was requeued to publish once and published once. Returns those events' messages."""
    start = max(i for i, (_, _, m) in enumerate(events) if m == marker)
    after = events[start:]
    messages = [m or "" for _, _, m in after]
    assert not [e for e in after if e[1] in ENGINE_STAGES], after
    assert not any(m.startswith("running on") for m in messages), messages
    assert messages.count("worker lost (heartbeat stale): requeued to publish") == 1, messages
    assert any(m.startswith("publishing on w2") and "(attempt 2)" in m for m in messages), messages
    assert messages[-1] == "published" and messages.count("published") == 1, messages
    return messages


def test_publish_retry_reads_the_artifact_set_from_the_object_store(service, make_key, moto, hub, deployment):
    cluster, _, bucket = deployment
    repo_id = f"acme/s3-retry-{uuid.uuid4().hex[:6]}"
    with cluster.client(_key(make_key)) as c:
        job = _fail_first_publish(service, hub, c, repo_id)
        before = _artifact_set(job["id"])
        assert len(hub.repos[repo_id].commits) == 1  # the repo's creation commit, nothing of ours
        _no_copies_left(cluster, "w1")  # the object store holds the only copy

        r = c.post(f"/v1/jobs/{job['id']}/publish", json={"token": ALICE})
        assert r.status_code == 202, r.text
        job = wait_for_status(c, job["id"], DONE, timeout=180)
        assert job["status"] == "succeeded", job
        head = hub.repos[repo_id].refs["main"]
        awq = next(a for a in job["artifacts"] if a["format"] == "awq")
        assert awq["hub_revision"] == head and awq["commit_url"].endswith(head)
        # served through the API as before
        f = next(x for x in awq["files"] if x["path"] == "config.json")
        assert c.get(f["url"]).content == hub.repos[repo_id].files_at("main")[1]["config.json"]
    assert _artifact_set(job["id"]) == before
    _assert_one_commit_of_the_artifact(moto, hub, repo_id, before)
    assert_bucket_matches_rows(moto, bucket, [job["id"]])
    _no_copies_left(cluster, "w1")  # the downloaded copy went after the publish
    scratch = cluster.home("w1") / "artifacts" / ".publish"
    assert not scratch.exists() or list(scratch.iterdir()) == [], list(scratch.rglob("*"))


def test_worker_killed_during_publish_retry_publishes_once_without_rerunning(
    service, make_key, moto, hub, deployment
):
    cluster, env, bucket = deployment
    repo_id = f"acme/s3-kill-{uuid.uuid4().hex[:6]}"
    with cluster.client(_key(make_key)) as c:
        job = _fail_first_publish(service, hub, c, repo_id)
        job_id = job["id"]
        before = _artifact_set(job_id)
        held = hub.hold("POST", rf"/api/models/{repo_id}/commit/main$")
        try:
            r = c.post(f"/v1/jobs/{job_id}/publish", json={"token": ALICE})
            assert r.status_code == 202, r.text
            _kill_mid_commit(cluster, env, c, job_id, held)
        finally:
            held.release.set()  # answered to nobody: the held commit was never applied
        job = wait_for_status(c, job_id, DONE, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["stage"] == "publish" and job["attempts"] == 2, job  # two publish runs, no other
    assert _artifact_set(job_id) == before  # the same artifact set: ids, locations, files and sha256s
    _assert_one_commit_of_the_artifact(moto, hub, repo_id, before)
    assert_bucket_matches_rows(moto, bucket, [job_id])

    messages = _assert_only_published_after(_events(job_id), "publish queued")
    assert any(m.startswith("publishing on w1") and "(attempt 1)" in m for m in messages), messages
    _no_copies_left(cluster, "w2")
    # The killed worker's download stays in that job's scratch folder (a publish of the job there replaces it).
    w1_art = cluster.home("w1") / "artifacts"
    assert [
        p for p in w1_art.rglob("*.safetensors") if not p.is_relative_to(w1_art / ".publish" / job_id)
    ] == []


def test_worker_killed_during_the_first_publish_publishes_the_recorded_set(
    service, make_key, moto, hub, deployment
):
    """Lost while publishing the run's own result: the artifact set is recorded (the stage says publish in the
    same commit), so the requeued job publishes it from the store; quantization is not run again."""
    cluster, env, bucket = deployment
    repo_id = f"acme/s3-first-{uuid.uuid4().hex[:6]}"
    held = hub.hold("POST", rf"/api/models/{repo_id}/commit/main$")
    body = service.job_body(eval={"enabled": False}, publish={"repo_id": repo_id, "token": ALICE})
    with cluster.client(_key(make_key)) as c:
        try:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            _kill_mid_commit(cluster, env, c, job_id, held)
            before = _artifact_set(job_id)
            assert before and all(v[1].startswith("s3://") for v in before.values())
        finally:
            held.release.set()
        job = wait_for_status(c, job_id, DONE, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["stage"] == "publish" and job["attempts"] == 2, job  # the run, then one publish run
        assert "SECRET" not in str(job)
    assert _artifact_set(job_id) == before
    _assert_one_commit_of_the_artifact(moto, hub, repo_id, before)
    assert_bucket_matches_rows(moto, bucket, [job_id])
    events = _events(job_id)
    assert sum(1 for _, _, m in events if (m or "").startswith("running on")) == 1  # one run, never again
    _assert_only_published_after(events, "publishing to " + repo_id)
