"""Jobs that read their model from, and publish to, a Hub: the API and a Celery worker as processes of their
own (their own queue prefix, HF_ENDPOINT pointed at tests/service/hub_server.py, PUBLISH_BACKEND=huggingface,
a service HF_TOKEN), the real huggingface_hub client in the worker, Postgres shared with the other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from .conftest import HOME, free_port, wait_for_status
from .hub_server import HubServer

pytestmark = pytest.mark.services

SERVICE_TOKEN = "hf_service_SECRET"
ALICE = "hf_alice_SECRET"
NO_EVAL = {"enabled": False}


@dataclass
class HubService:
    url: str
    hub: HubServer


@pytest.fixture(scope="module")
def hub_service(service):
    from app.core.config import settings
    from app.embedded import stop_process, worker_argv

    hub = HubServer().start()
    hub.add_user(ALICE, "alice", orgs=("acme",))
    hub.add_user(SERVICE_TOKEN, "svc", orgs=("acme",))  # the service account can read acme's repos
    prefix = f"awqf-test-hub-{uuid.uuid4().hex[:8]}-"
    env = {
        **os.environ,
        "CELERY_QUEUE_PREFIX": prefix,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(HOME / "hf-home"),
        "PUBLISH_BACKEND": "huggingface",
        "HF_TOKEN": SERVICE_TOKEN,
        "PUBLISH_ATTEMPTS": "2",
        "PUBLISH_BACKOFF_S": "0.1",
        "OMP_NUM_THREADS": "1",
    }
    argv = worker_argv(list(settings.queue_classes), name=f"hubtest-{prefix}")
    argv[argv.index("-Q") + 1] = ",".join(prefix + q for q in settings.queue_classes)
    log = HOME / f"hub-worker-{prefix}.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        port = free_port()
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--no-worker",
                "--no-migrate",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        import httpx

        deadline = time.monotonic() + 90
        while b"ready." not in log.read_bytes() or not _up(f"http://127.0.0.1:{port}"):
            assert worker.poll() is None and api.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        del httpx
        yield HubService(url=f"http://127.0.0.1:{port}", hub=hub)
    finally:
        stop_process(api)
        stop_process(worker)
        hub.stop()
        import redis

        r = redis.Redis.from_url(env["REDIS_URL"])
        keys = list(r.scan_iter(f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _client(hs: HubService, key: str):
    import httpx

    return httpx.Client(base_url=hs.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _tenant(make_key, *, namespaces=None, service_token=False) -> str:
    from app.core.db import session_scope
    from app.services.keys import upsert_tenant

    name = f"t-{uuid.uuid4().hex[:6]}"
    with session_scope() as s:
        upsert_tenant(s, name=name, create=True, namespaces=namespaces, allow_service_token=service_token)
    return make_key(name)


def _body(service, **kw) -> dict:
    return service.job_body(model="acme/tiny-private", eval=NO_EVAL, **kw)


def test_hub_source_resolved_to_sha_and_published_in_one_private_commit(service, hub_service, make_key):
    hub = hub_service.hub
    sha = hub.add_repo("acme/tiny-private", service.model_dir, private=True)
    hub.add_repo("acme/tiny-private", {**hub.repos["acme/tiny-private"].files_at("main")[1], "x.txt": b"x"})
    key = _tenant(make_key, namespaces=["acme"])
    hub.fail("POST", r"/preupload/main$", 429, **{"Retry-After": "1"})
    body = _body(
        service,
        revision=sha,  # the first commit, by its sha
        source={"token": ALICE},
        formats=["awq", "compressed-tensors"],
        publish={"repo_id": "acme/tiny-awq", "private": True, "token": ALICE},
    )
    with _client(hub_service, key) as c:
        job = wait_for_status(c, c.post("/v1/jobs", json=body).json()["id"], ("succeeded", "failed"), 400)
        assert job["status"] == "succeeded", job
        assert job["source_sha"] == sha and "SECRET" not in json.dumps(job)
        repo = hub.repos["acme/tiny-awq"]
        # every format and the card: one commit (after the one a new repo starts with)
        assert repo.private is True and len(repo.commits) == 2
        head = repo.refs["main"]
        for art in job["artifacts"]:
            assert (
                art["hub_revision"] == head and art["commit_url"] == f"{hub.url}/acme/tiny-awq/commit/{head}"
            )
        files = repo.files_at("main")[1]
        assert {"README.md", "awq/config.json", "compressed-tensors/config.json"} <= set(files)
        assert sha in files["README.md"].decode() and sha in files["awq/README.md"].decode()
        report = json.loads(files["awq/quant_report.json"])
        assert report["source"]["revision"] == sha
        assert hub.count("POST", r"/preupload/main$", 429) == 1  # retried after Retry-After
        # Nothing but safetensors, config, tokenizer and generation files came down.
        got = {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, s in hub.requests if "/resolve/" in p}
        assert "x.txt" not in got and any(g.endswith(".safetensors") for g in got)

        # Publishing the same artifacts again makes no new commit.
        r = c.post(f"/v1/jobs/{job['id']}/publish", json={"token": ALICE})
        assert r.status_code == 202, r.text
        again = wait_for_status(c, job["id"], ("succeeded", "failed"), 120)
        assert again["status"] == "succeeded", again
        assert len(repo.commits) == 2 and again["artifacts"][0]["hub_revision"] == head


def test_credentials_stay_with_their_tenant(service, hub_service, make_key):
    hub = hub_service.hub
    if "acme/tiny-private" not in hub.repos:
        hub.add_repo("acme/tiny-private", service.model_dir, private=True)
    other = _tenant(make_key)  # no namespaces but its own, not allowed the service token
    allowed = _tenant(make_key, service_token=True)
    with _client(hub_service, other) as c:
        f = c.post("/v1/jobs", json=_body(service, publish={"repo_id": "acme/stolen"}))
        assert f.status_code == 422 and "publish.repo_id" in f.text
        job = wait_for_status(
            c, c.post("/v1/jobs", json=_body(service)).json()["id"], ("succeeded", "failed"), 300
        )
        # The service token could read it, but this tenant may not use it: the hub saw no token.
        assert job["status"] == "failed" and job["stage"] == "resolve", job
        assert "or private: give source.token" in job["error"] and "SECRET" not in job["error"]
    with _client(hub_service, allowed) as c:
        job = wait_for_status(
            c, c.post("/v1/jobs", json=_body(service)).json()["id"], ("succeeded", "failed"), 400
        )
        assert job["status"] == "succeeded", job  # an admin allowed this tenant the service token
        assert job["source_sha"] == hub.repos["acme/tiny-private"].refs["main"]


def test_failed_publish_keeps_artifacts_and_publishes_again(service, hub_service, make_key):
    hub = hub_service.hub
    if "acme/tiny-private" not in hub.repos:
        hub.add_repo("acme/tiny-private", service.model_dir, private=True)
    key = _tenant(make_key, namespaces=["acme"])
    hub.fail("POST", r"/api/models/acme/tiny-retry/commit/main$", 500, times=1000)
    body = _body(service, source={"token": ALICE}, publish={"repo_id": "acme/tiny-retry", "token": ALICE})
    with _client(hub_service, key) as c:
        job = wait_for_status(c, c.post("/v1/jobs", json=body).json()["id"], ("succeeded", "failed"), 400)
        assert job["status"] == "failed" and job["stage"] == "publish", job
        assert "publish failed" in job["error"] and "500" in job["error"] and "SECRET" not in job["error"]
        f = next(x for x in job["artifacts"][0]["files"] if x["path"] == "config.json")
        assert c.get(f["url"]).status_code == 200  # artifacts kept
        assert len(hub.repos["acme/tiny-retry"].commits) == 1  # the repo's first, nothing of ours
        hub.faults.clear()
        # The job's token was deleted when it failed: publishing again takes one.
        r = c.post(f"/v1/jobs/{job['id']}/publish", json={"token": ALICE})
        assert r.status_code == 202, r.text
        job = wait_for_status(c, job["id"], ("succeeded", "failed"), 120)
        assert job["status"] == "succeeded", job["error"]
        assert len(hub.repos["acme/tiny-retry"].commits) == 2
        assert job["artifacts"][0]["commit_url"].endswith(hub.repos["acme/tiny-retry"].refs["main"])
