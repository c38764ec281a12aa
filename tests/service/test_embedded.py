"""Embedded mode: no DATABASE_URL/REDIS_URL -> SQLite, filesystem broker, a worker child, local hub."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import SERVICE_ENV, free_port

REPO = Path(__file__).resolve().parents[2]


def test_serve_embedded_runs_a_job_end_to_end(tiny_models, tmp_path):
    run_embedded_job(sys.executable, REPO, tiny_models, tmp_path)


def run_embedded_job(python: str, cwd: Path, tiny_models, tmp_path: Path) -> None:
    """`awqforge keys create`, `awqforge serve` (embedded: SQLite, filesystem broker, a worker child), one
    tiny job through the API to `succeeded`, its artifact downloaded and published to the local hub."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SERVICE_ENV and k not in ("REDIS_URL", "DATABASE_URL", "BROKER_URL")
    }
    env.update(
        AWQFORGE_HOME=str(tmp_path / "home"),
        ALLOWED_LOCAL_ROOTS=str(tiny_models.calib.parent),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    key = subprocess.run(
        [python, "-m", "awqforge", "keys", "create", "--tenant", "solo"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert key.startswith("awqf_")
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "awqforge", "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()
                time.sleep(0.3)
            body = {
                "model": str(tiny_models.tiny),
                "bits": 4,
                "group_size": 64,
                "n_grid": 4,
                "device": "cpu",
                "calibration": {"source": f"file:{tiny_models.calib}", "n_samples": 4, "seq_len": 32},
                "eval": {"seq_len": 32, "max_seqs": 2},
                "publish": {"repo_id": "solo/tiny-awq"},
            }
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 150
            while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert time.monotonic() < deadline, job
                time.sleep(0.3)
            assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text()[-3000:])
            assert job["metrics"]["quant_perplexity"] > 0
            f = next(x for x in job["artifacts"][0]["files"] if x["path"] == "config.json")
            assert c.get(f["url"]).status_code == 200
        home = tmp_path / "home"
        assert (home / "awqforge.db").exists() and (
            home / "hub" / "solo" / "tiny-awq" / "config.json"
        ).exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("serve did not stop on SIGINT")
        log.close()
