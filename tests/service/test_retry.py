"""Retry with the job's credentials: POST /v1/jobs/{id}/retry takes the tokens again (encrypted, deleted when
the run ends), keeps the publish destination chosen at submit, and keeps the recorded artifacts until the new
run replaces them. Against the Hub-protocol test server (tests/service/hub_server.py) with the API and a
Celery worker as processes of their own (the fixture of test_hub_jobs.py)."""

from __future__ import annotations

import pytest

from .conftest import wait_for_status
from .test_hub_jobs import ALICE, _body, _client, _tenant, hub_service  # noqa: F401 (the fixture)

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")


def _private_model(hub, service) -> None:
    if "acme/tiny-private" not in hub.repos:
        hub.add_repo("acme/tiny-private", service.model_dir, private=True)


def test_retry_takes_the_tokens_again(service, hub_service, make_key):  # noqa: F811
    from app.core.db import session_scope
    from app.models import Job

    _private_model(hub_service.hub, service)
    key = _tenant(make_key, namespaces=["acme"])  # not allowed the service token
    with _client(hub_service, key) as c:
        job = wait_for_status(c, c.post("/v1/jobs", json=_body(service)).json()["id"], TERMINAL, 300)
        assert job["status"] == "failed" and "give source.token" in job["error"], job
        bad = c.post(f"/v1/jobs/{job['id']}/retry", json={"source": {"token": ALICE}, "extra": 1})
        assert bad.status_code == 422, bad.text  # an unknown field is refused, not ignored
        refused = c.post(f"/v1/jobs/{job['id']}/retry", json={"publish": {"token": ALICE}})
        assert refused.status_code == 422 and "publish.token" in refused.text  # the job does not publish
        r = c.post(f"/v1/jobs/{job['id']}/retry", json={"source": {"token": ALICE}})
        assert r.status_code == 202 and "SECRET" not in r.text, r.text
        job = wait_for_status(c, job["id"], TERMINAL, 300)
        assert job["status"] == "succeeded", job
        assert job["source_sha"] == hub_service.hub.repos["acme/tiny-private"].refs["main"]
    with session_scope() as s:
        row = s.get(Job, job["id"])
        assert row.source_token_enc is None and row.publish_token_enc is None  # deleted when it ended


def test_artifacts_kept_until_a_new_run_replaces_them(service, hub_service, make_key):  # noqa: F811
    hub = hub_service.hub
    _private_model(hub, service)
    key = _tenant(make_key, namespaces=["acme"])
    hub.fail("POST", r"/api/models/acme/tiny-kept/commit/main$", 500, times=1000)
    body = _body(service, source={"token": ALICE}, publish={"repo_id": "acme/tiny-kept", "token": ALICE})
    with _client(hub_service, key) as c:
        job = wait_for_status(c, c.post("/v1/jobs", json=body).json()["id"], TERMINAL, 400)
        assert job["status"] == "failed" and job["stage"] == "publish", job
        files = [f["url"] for a in job["artifacts"] for f in a["files"]]
        hub.faults.clear()
        # Retried without the source token: the run fails at resolve, the recorded artifact set stays.
        assert c.post(f"/v1/jobs/{job['id']}/retry").status_code == 202
        again = wait_for_status(c, job["id"], TERMINAL, 300)
        assert again["status"] == "failed" and again["stage"] == "resolve", again
        assert [f["url"] for a in again["artifacts"] for f in a["files"]] == files
        assert all(c.get(u).status_code == 200 for u in files)
        # ... and can still be published, with a good token.
        r = c.post(f"/v1/jobs/{job['id']}/publish", json={"token": ALICE})
        assert r.status_code == 202, r.text
        done = wait_for_status(c, job["id"], TERMINAL, 120)
        assert done["status"] == "succeeded", done
        assert done["artifacts"][0]["commit_url"].endswith(hub.repos["acme/tiny-kept"].refs["main"])


def test_publish_destination_is_chosen_once(service, make_key, monkeypatch):
    """PUBLISH_BACKEND=auto: the first publish of a job that has a publish token goes to the Hugging Face Hub
    and that choice is recorded on the job; its retry, whose tokens were deleted when it ended, publishes
    there again, not to the local folder (the worker's choice, called as publish_artifacts calls it)."""
    from app.core.config import settings
    from app.core.db import session_scope
    from app.models import Job
    from worker.hub import HuggingFaceHub, LocalHub, hub_for
    from worker.runner import _publish_destination

    tenant = "dest-" + __import__("uuid").uuid4().hex[:6]
    with service.client(make_key(tenant)) as c:
        body = service.job_body(
            model=str(service.home / "models" / "not-there"), publish={"repo_id": f"{tenant}/x"}
        )
        ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
        for job_id in ids:
            assert wait_for_status(c, job_id, TERMINAL)["status"] == "failed"
    monkeypatch.setattr(settings, "PUBLISH_BACKEND", "auto")
    with session_scope() as s:
        assert s.get(Job, ids[0]).publish_backend is None  # failed before publishing: nothing chosen yet
    assert _publish_destination(ids[0], "hf_first_run_SECRET") == "huggingface"
    assert _publish_destination(ids[0], None) == "huggingface"  # the retry, without a token
    assert _publish_destination(ids[1], None) == "local"  # no token, no HF_ENDPOINT/HF_TOKEN
    assert _publish_destination(ids[1], "hf_later_SECRET") == "local"
    with session_scope() as s:
        assert [s.get(Job, i).publish_backend for i in ids] == ["huggingface", "local"]
    assert isinstance(hub_for(None, "huggingface"), HuggingFaceHub)
    assert isinstance(hub_for("hf_x", "local"), LocalHub)
