"""Artifact storage: the S3 backend against a real S3-compatible server (moto's, on loopback), and artifacts
written by a worker on one "machine" (its own AWQFORGE_HOME) read through the API of another."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid

import httpx
import pytest

from .cluster import Cluster, MotoServer
from .conftest import SERVICE_ENV, wait_for_status

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
