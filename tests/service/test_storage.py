"""Artifact storage: the S3 backend against a real S3-compatible server (moto's, on loopback), and artifacts
written by a worker on one "machine" (its own AWQFORGE_HOME) read through the API of another."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import tarfile
import uuid

import httpx
import pytest

from .cluster import Cluster, MotoServer, assert_bucket_matches_rows
from .conftest import SERVICE_ENV, wait_for_status
from .tcp_proxy import FailingProxy

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto):
    name = f"awqf-{uuid.uuid4().hex[:10]}"
    moto.client().create_bucket(Bucket=name)
    return name


def test_s3_store_multipart_listing_presigned_urls(moto, bucket, monkeypatch, tmp_path):
    from app.core.config import settings
    from app.services.storage import LocalStore, S3Store, store_for

    for k, v in {**moto.env(bucket), "S3_MULTIPART_THRESHOLD": 5 * 1024**2}.items():
        monkeypatch.setattr(settings, k, v)
    monkeypatch.setattr(settings, "S3_MULTIPART_CHUNKSIZE", 5 * 1024**2)
    art = tmp_path / "awq"
    (art / "sub").mkdir(parents=True)
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB: three parts
    (art / "model.safetensors").write_bytes(big)
    (art / "config.json").write_text('{"a": 1}')
    (art / "sub" / "x.txt").write_text("x")

    store = S3Store()
    loc = store.put(art, key="tenant-7/job_1/awq")
    assert loc == f"s3://{bucket}/awqforge/tenant-7/job_1/awq"  # per-tenant prefix under S3_PREFIX
    assert isinstance(store_for(loc), S3Store) and isinstance(store_for(str(art)), LocalStore)
    files = {f.path: f.size_bytes for f in store.list_files(loc)}
    assert files == {"config.json": 8, "model.safetensors": len(big), "sub/x.txt": 1}
    head = moto.client().head_object(Bucket=bucket, Key="awqforge/tenant-7/job_1/awq/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # uploaded in 3 multipart parts

    url = store.presign(loc, "model.safetensors")
    assert "X-Amz-Signature" in url and "test-secret" not in url
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and hashlib.sha256(r.content).digest() == hashlib.sha256(big).digest()
    assert b"".join(store.stream(loc, "sub/x.txt")) == b"x"
    # signed for the address the API's clients use (compose: the containers' name for the store is not it)
    public = moto.url.replace("127.0.0.1", "localhost")
    monkeypatch.setattr(settings, "S3_PUBLIC_ENDPOINT_URL", public)
    url = S3Store().presign(loc, "config.json")
    assert url.startswith(public + "/") and httpx.get(url, timeout=30).content == b'{"a": 1}'
    # names that try to leave the artifact's prefix are not keys
    for bad in ("../job_2/awq/config.json", "/etc/passwd", ""):
        assert store.head(loc, bad) is None and store.presign(loc, bad) is None
    assert store.head(loc, "missing.json") is None
    store.delete(loc)
    assert store.list_files(loc) == []


def test_settings_need_a_bucket_for_s3():
    from app.core.config import Settings

    with pytest.raises(ValueError, match="S3_BUCKET"):
        Settings(ARTIFACT_STORE="s3")


def test_worker_on_another_machine_writes_to_s3_and_any_api_serves(service, make_key, moto, bucket):
    env = {**moto.env(bucket), "S3_MULTIPART_THRESHOLD": str(5 * 1024**2)}
    cluster = Cluster(SERVICE_ENV, models_root=service.home, api_env=env)
    try:
        cluster.start_worker("remote-cpu", ["cpu"], env=env)  # its own AWQFORGE_HOME: a different machine
        key, other = make_key(), make_key()
        with cluster.client(key) as c:
            r = c.post("/v1/jobs", json=service.job_body(eval={"enabled": False}))
            assert r.status_code == 202, r.text
            job = wait_for_status(c, r.json()["id"], ("succeeded", "failed"), timeout=240)
            assert job["status"] == "succeeded", job
            art = next(a for a in job["artifacts"] if a["format"] == "awq")
            files = {f["path"]: f for f in art["files"]}
            assert "config.json" in files and any(p.endswith(".safetensors") for p in files)
            f = files["config.json"]
            # streamed through the API (which never saw the worker's disk) ...
            body = c.get(f["url"])
            assert body.status_code == 200 and body.json()["quantization_config"]["bits"] == 4
            assert int(body.headers["content-length"]) == f["size_bytes"]
            # ... or handed out as a presigned URL, in the listing or as a redirect
            assert f["download_url"].startswith(moto.url)
            assert httpx.get(f["download_url"], timeout=30).content == body.content
            red = c.get(f["url"], params={"redirect": 1}, follow_redirects=False)
            assert red.status_code == 307 and red.headers["location"].startswith(moto.url)
            assert c.get(f["url"] + ".missing").status_code == 404
            # Range, ETag and If-Range as the local store answers them, from the object store
            n, etag = f["size_bytes"], body.headers["etag"]
            part = c.get(f["url"], headers={"Range": "bytes=3-"})
            assert part.status_code == 206 and part.content == body.content[3:]
            assert part.headers["content-range"] == f"bytes 3-{n - 1}/{n}"
            assert c.get(f["url"], headers={"Range": "bytes=-4"}).content == body.content[-4:]
            assert c.get(f["url"], headers={"Range": "bytes=3-", "If-Range": '"other"'}).status_code == 200
            assert c.get(f["url"], headers={"If-None-Match": etag}).status_code == 304
            past = c.get(f["url"], headers={"Range": f"bytes={n}-"})
            assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{n}"
            bad = c.get(f["url"], headers={"Range": "lines=1-2"})
            assert bad.status_code == 400 and "bytes=first-last" in bad.json()["detail"]
            # the whole artifact as one tar, streamed from the store
            tar = c.get(f"/v1/jobs/{job['id']}/artifacts/{art['id']}.tar")
            assert tar.status_code == 200, tar.text
            assert int(tar.headers["content-length"]) == len(tar.content)
            with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
                members = {m.name: m for m in t.getmembers()}
                assert set(members) == {f"awq/{p}" for p in files}
                for p, meta in files.items():
                    data = t.extractfile(members[f"awq/{p}"]).read()
                    assert len(data) == meta["size_bytes"]
                    assert data == c.get(meta["url"]).content, p
            assert "test-secret-never-shown" not in c.get(f"/v1/jobs/{job['id']}/artifacts").text
        with cluster.client(other) as c:  # another tenant sees nothing of it
            assert c.get(f["url"]).status_code == 404
        keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert all(k.startswith("awqforge/tenant-") and f"/{job['id']}/" in k for k in keys)
        # the worker's scratch copy is gone, and the API machine never had one
        assert not any((cluster.home("remote-cpu") / "artifacts").rglob("*.safetensors"))
        assert not (cluster.home("api") / "artifacts").exists() or not any(
            (cluster.home("api") / "artifacts").rglob("*.safetensors")
        )
    finally:
        cluster.close()


def _locations(job_id: str) -> dict[str, str]:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import Artifact

    with session_scope() as s:
        return {a.format: a.path for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}


def test_retry_stores_beside_the_recorded_set_and_leaves_no_orphans(service, make_key, moto, bucket):
    """A retry's run stores under a prefix of its own. One whose upload fails part-way (the store's network
    cuts the weights' upload) leaves the recorded set whole and served, and its partial upload goes; one that
    succeeds replaces the set and the replaced run's objects go; DELETE removes the rest. After each step the
    bucket holds exactly what the artifact rows name."""
    s3 = FailingProxy(("127.0.0.1", moto.port))
    env = {**moto.env(bucket), "S3_ENDPOINT_URL": s3.url, "PUBLISH_BACKEND": "local"}
    cluster = Cluster(SERVICE_ENV, models_root=service.home, api_env=env)
    try:
        cluster.start_worker("w", ["cpu"], env=env)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        blocker = cluster.home("w") / "hub" / tenant
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")  # the repo's owner folder cannot be made: the first publish fails
        body = service.job_body(eval={"enabled": False}, publish={"repo_id": f"{tenant}/m", "private": True})
        with cluster.client(make_key(tenant)) as c:
            job_id = c.post("/v1/jobs", json=body).json()["id"]
            job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=240)
            assert job["status"] == "failed" and job["stage"] == "publish", job
            first = _locations(job_id)
            served = {f["url"]: c.get(f["url"]).content for a in job["artifacts"] for f in a["files"]}
            assert_bucket_matches_rows(moto, bucket, [job_id])

            # The store unreachable for reads: 503 with Retry-After, naming neither its address nor the bucket
            s3.fail = re.compile(rb"^(GET|HEAD) ")
            down = c.get(next(iter(served)))
            assert down.status_code == 503 and down.headers["retry-after"], down.text
            assert str(s3.port) not in down.text and bucket not in down.text
            s3.fail = None

            # Retry 1: the weights' upload is cut every time; the files sorted before them went up first.
            s3.fail, seen = re.compile(rb"^PUT /[^ ]*\.safetensors"), len(s3.requests)
            assert c.post(f"/v1/jobs/{job_id}/retry").status_code == 202
            job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=240)
            assert job["status"] == "failed" and "did not take model.safetensors" in job["error"], job
            logs = c.get(f"/v1/jobs/{job_id}/logs").text
            assert str(s3.port) not in job["error"] + logs and bucket not in job["error"] + logs
            puts = [r.decode() for r in s3.requests[seen:] if r.startswith(b"PUT ")]
            assert any(".safetensors" not in p for p in puts), puts  # a partial upload happened ...
            old = ["/" + loc.removeprefix("s3://") + "/" for loc in first.values()]
            assert not [p for p in puts if any(o in p for o in old)], puts  # ... beside the recorded set
            assert _locations(job_id) == first
            assert {u: c.get(u).content for u in served} == served
            assert_bucket_matches_rows(moto, bucket, [job_id])  # ... and it is gone

            # Retry 2: the store and the hub work again; the new set replaces the old one.
            s3.fail = None
            blocker.unlink()
            assert c.post(f"/v1/jobs/{job_id}/retry").status_code == 202
            job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=240)
            assert job["status"] == "succeeded", job
            now = _locations(job_id)
            assert now.keys() == first.keys() and not set(now.values()) & set(first.values())
            assert_bucket_matches_rows(moto, bucket, [job_id])
            assert all(c.get(f["url"]).status_code == 200 for a in job["artifacts"] for f in a["files"])

            assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
            assert_bucket_matches_rows(moto, bucket, [job_id])  # no row: no object
    finally:
        cluster.close()
        s3.close()


def test_worker_killed_mid_upload_leaves_only_the_recorded_objects(service, make_key, moto, bucket):
    """SIGKILL of the worker while the weights' upload is held (the files sorted before them are in the
    bucket): the API's reaper requeues the job, a worker on another machine runs it and records its own set;
    the killed run's partial upload goes, and the bucket holds exactly what the rows name."""
    s3 = FailingProxy(("127.0.0.1", moto.port))
    env = {**moto.env(bucket), "S3_ENDPOINT_URL": s3.url, "HEARTBEAT_STALE_S": "10", "REAPER_INTERVAL_S": "1"}
    cluster = Cluster(SERVICE_ENV, models_root=service.home, api_env=env)
    try:
        cluster.start_worker("w1", ["cpu"], env=env)
        s3.hold = re.compile(rb"^PUT /[^ ]*\.safetensors")
        with cluster.client(make_key()) as c:
            job_id = c.post("/v1/jobs", json=service.job_body(eval={"enabled": False})).json()["id"]
            assert s3.holding.wait(240), "the upload never reached the weights:\n" + cluster.log("w1")[-3000:]
            w1 = cluster.workers.pop("w1")
            os.killpg(w1.pid, signal.SIGKILL)
            w1.wait()
            partial = [r.split()[1].decode() for r in s3.requests if r.startswith(b"PUT ")]
            s3.hold = None
            s3.release.set()
            cluster.start_worker("w2", ["cpu"], env=env)
            job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=240)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
        recorded = ["/" + loc.removeprefix("s3://") + "/" for loc in _locations(job_id).values()]
        killed = [k for k in partial if ".safetensors" not in k]
        overlap = [k for k in killed if any(k.startswith(r) for r in recorded)]
        assert killed and not overlap, (killed, recorded)  # it had uploaded, under a prefix of its own
        assert_bucket_matches_rows(moto, bucket, [job_id])  # the killed run's objects are gone
    finally:
        s3.release.set()
        cluster.close()
        s3.close()
