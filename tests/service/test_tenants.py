"""Tenants and the local hub, through the real API, Celery worker and Postgres: namespaces checked at submit,
repos owned by their first publisher, tokens deleted when a job ends, downloads with Range/ETag and tar."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from .conftest import wait_for_status

pytestmark = pytest.mark.services


def _fields(resp) -> dict[str, str]:
    assert resp.status_code == 422, resp.text
    return {e["field"]: e["reason"] for e in resp.json()["detail"]}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


NO_EVAL = {"enabled": False}  # these tests are about the hub and downloads, not perplexity


def _tenant(name: str, *, namespaces: list[str] | None = None, service_token: bool = False) -> None:
    from app.core.db import session_scope
    from app.services.keys import upsert_tenant

    with session_scope() as s:
        upsert_tenant(s, name=name, create=True, namespaces=namespaces, allow_service_token=service_token)


def test_publish_namespace_is_checked_at_submit(service, make_key):
    team = _name("team")
    key = make_key(team)  # `keys create` made the tenant: it may publish to its own name only
    with service.client(key) as c:
        f = _fields(c.post("/v1/jobs", json=service.job_body(publish={"repo_id": "someone-else/m"})))
        assert "namespace 'someone-else' is not one this tenant may publish to" in f["publish.repo_id"]
        assert team in f["publish.repo_id"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(publish={"repo_id": "./a/b"})))
        assert "not a path" in f["publish.repo_id"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(source={"token": "x" * 600})))
        assert "512" in f["source.token"]
        r = c.post("/v1/jobs", json=service.job_body(publish={"repo_id": f"{team}/m"}))
        assert r.status_code == 202, r.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_tenants_cli_sets_namespaces_and_the_service_token_flag(service, make_key):
    name = _name("cli")
    run = [sys.executable, "-m", "awqforge", "tenants"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*run, *args], capture_output=True, text=True, timeout=60)

    out = cli("create", name, "--namespace", "org-one", "--namespace", "org-two")
    assert out.returncode == 0, out.stderr
    assert "namespaces=org-one,org-two service_token=no" in out.stdout
    assert cli("create", name).returncode == 1  # exists
    assert "org/x" in cli("update", name, "--namespace", "org/x").stderr  # owner part only
    out = cli("update", name, "--allow-service-token")
    assert out.returncode == 0 and "namespaces=org-one,org-two service_token=yes" in out.stdout
    listed = cli("list").stdout
    assert f"{name}\tnamespaces=org-one,org-two\tservice_token=yes" in listed

    key = make_key(name)  # a key for the existing tenant keeps its settings
    with service.client(key) as c:
        _fields(c.post("/v1/jobs", json=service.job_body(publish={"repo_id": f"{name}/m"})))
        r = c.post("/v1/jobs", json=service.job_body(publish={"repo_id": "org-two/m"}))
        assert r.status_code == 202, r.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")


def _repo_files(repo: Path) -> dict[str, bytes]:
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


def test_local_hub_repo_belongs_to_the_first_tenant(service, make_key, db_session):
    from app.models import Job

    shared = _name("shared")
    a, b = _name("a"), _name("b")
    _tenant(a, namespaces=[shared])
    _tenant(b, namespaces=[shared])
    key_a, key_b = make_key(a), make_key(b)
    repo_id = f"{shared}/tiny-awq"
    with service.client(key_a) as ca:
        r = ca.post(
            "/v1/jobs",
            json=service.job_body(eval=NO_EVAL, publish={"repo_id": repo_id, "token": "hf_A_SECRET"}),
        )
        job_a = wait_for_status(ca, r.json()["id"], ("succeeded", "failed"), timeout=400)
        assert job_a["status"] == "succeeded", job_a
        art = job_a["artifacts"][0]
        assert art["hub_revision"] and art["published_to"] == f"local:{repo_id}"
    repo = service.home / "hub" / shared / "tiny-awq"
    before = _repo_files(repo)
    assert "config.json" in before and "README.md" in before

    with service.client(key_b) as cb:
        body = service.job_body(
            eval=NO_EVAL, publish={"repo_id": repo_id, "token": "hf_B_SECRET"}, source={"token": "hf_B_READ"}
        )
        job_b = wait_for_status(
            cb, cb.post("/v1/jobs", json=body).json()["id"], ("succeeded", "failed"), timeout=400
        )
        assert job_b["status"] == "failed" and job_b["stage"] == "publish", job_b
        assert "belongs to another tenant" in job_b["error"] and "artifacts kept" in job_b["error"]
        assert "hf_B" not in json.dumps(job_b) and "hf_B" not in cb.get(f"/v1/jobs/{job_b['id']}/logs").text
        # B's own artifacts are kept and downloadable; A's hub files did not change.
        f = next(x for x in job_b["artifacts"][0]["files"] if x["path"] == "config.json")
        assert cb.get(f["url"]).status_code == 200
        assert _repo_files(repo) == before
        # Publishing again is refused the same way.
        r = cb.post(f"/v1/jobs/{job_b['id']}/publish")
        assert r.status_code == 202, r.text
        again = wait_for_status(cb, job_b["id"], ("succeeded", "failed"), timeout=400)
        assert again["status"] == "failed" and "belongs to another tenant" in again["error"]
        assert _repo_files(repo) == before
        # B sees nothing of A's job: every route answers 404.
        ja = job_a["id"]
        for path in (
            f"/v1/jobs/{ja}",
            f"/v1/jobs/{ja}/events",
            f"/v1/jobs/{ja}/logs",
            f"/v1/jobs/{ja}/layers",
            f"/v1/jobs/{ja}/artifacts",
            f"/v1/jobs/{ja}/artifacts/{art['id']}.tar",
            f"/v1/jobs/{ja}/artifacts/{art['id']}/files/config.json",
        ):
            assert cb.get(path).status_code == 404, path
        for action in ("cancel", "retry", "publish"):
            assert cb.post(f"/v1/jobs/{ja}/{action}").status_code == 404, action
    # Tokens are deleted once a job ends, whatever its end.
    db_session.expire_all()
    for jid in (job_a["id"], job_b["id"]):
        row = db_session.get(Job, jid)
        assert row.source_token_enc is None and row.publish_token_enc is None
        assert "hf_" not in json.dumps(row.spec)


def test_downloads_range_etag_and_tar(service, make_key):
    key = make_key()
    with service.client(key) as c:
        job = wait_for_status(
            c, c.post("/v1/jobs", json=service.job_body(eval=NO_EVAL)).json()["id"], ("succeeded", "failed")
        )
        assert job["status"] == "succeeded", job
        art = job["artifacts"][0]
        f = max(art["files"], key=lambda x: x["size_bytes"])
        full = c.get(f["url"])
        assert full.status_code == 200 and len(full.content) == f["size_bytes"]
        etag = full.headers["ETag"]
        assert c.get(f["url"], headers={"If-None-Match": etag}).status_code == 304
        # A resumed download: the rest from byte 1000 on.
        part = c.get(f["url"], headers={"Range": "bytes=1000-"})
        assert part.status_code == 206 and part.content == full.content[1000:]
        assert part.headers["Content-Range"] == f"bytes 1000-{len(full.content) - 1}/{len(full.content)}"
        assert c.get(f["url"], headers={"Range": "bytes=1000-", "If-Range": etag}).status_code == 206
        n = len(full.content)
        past = c.get(f["url"], headers={"Range": f"bytes={n}-"})  # a .part as long as the file
        assert past.status_code == 416 and past.headers["Content-Range"] == f"bytes */{n}"
        assert c.get(f["url"], headers={"Range": "bytes=5-2"}).status_code == 400

        tar = c.get(f"/v1/jobs/{job['id']}/artifacts/{art['id']}.tar")
        assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
        assert int(tar.headers["content-length"]) == len(tar.content)
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
            names = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        assert set(names) == {f"{art['format']}/{x['path']}" for x in art["files"]}
        assert names[f"{art['format']}/{f['path']}"] == full.content
        assert c.get(f"/v1/jobs/{job['id']}/artifacts/art_nope.tar").status_code == 404
