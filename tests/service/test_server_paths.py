"""Tenants see no server folders: a job's views (job, list, logs, events, artifacts), its report and model card
and its error name artifacts and uploads by id, never the artifact folder, the upload folder, the local hub
folder or a job's work folder."""

from __future__ import annotations

import json

import pytest

from .conftest import wait_for_status

pytestmark = pytest.mark.services

TERMINAL = ("succeeded", "failed", "cancelled")


def _views(c, job: dict) -> str:
    got = [json.dumps(job)]
    for path in ("", "/logs", "/artifacts", "/events"):
        got.append(c.get(f"/v1/jobs/{job['id']}{path}").text)
    for art in job["artifacts"]:
        for f in art["files"]:
            if f["path"].endswith((".json", ".md")):
                got.append(c.get(f["url"]).text)
    return "\n".join(got)


def test_no_server_folder_in_what_a_tenant_reads(service, make_key):
    from app.core.config import settings
    from app.services import lifecycle

    tenant = "paths-" + __import__("uuid").uuid4().hex[:6]
    with service.client(make_key(tenant)) as c:
        up = c.post(
            "/v1/calibration-sets", files={"file": ("c.txt", service.calib_file.read_bytes()[:100_000])}
        )
        assert up.status_code == 201, up.text
        body = service.job_body(
            calibration={"upload_id": up.json()["id"], "n_samples": 4, "seq_len": 32},
            publish={"repo_id": f"{tenant}/paths", "private": True},
        )
        ok = wait_for_status(c, c.post("/v1/jobs", json=body).json()["id"], TERMINAL, 300)
        assert ok["status"] == "succeeded", ok
        assert all(a["published_to"].startswith(f"local:{tenant}/paths") for a in ok["artifacts"])
        text = _views(c, ok)
        report = next(
            c.get(f["url"]).json()
            for a in ok["artifacts"]
            for f in a["files"]
            if f["path"] == "quant_report.json"
        )
    assert report["settings"]["calibration"]["source"] == f"upload:{up.json()['id']}"
    assert set(report["artifacts"].values()) <= {"awq", "compressed-tensors"}
    folders = {
        "artifact folder": settings.ARTIFACT_DIR,
        "upload folder": settings.UPLOAD_DIR,
        "local hub folder": settings.HUB_DIR,
        "work folder": lifecycle.job_work_dir(0, ok["id"]).parent,
    }
    for what, folder in folders.items():
        for form in {str(folder), str(folder.resolve())}:
            assert form not in text, f"the {what} {form} is shown to the tenant"
