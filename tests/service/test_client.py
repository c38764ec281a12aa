"""The `awqforge` client commands (submit --wait, jobs, status, cancel, download) as subprocesses
against the running service: real HTTP, the Celery worker, Range resumes and sha256 checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.services

# The client must stay light: running it may not import torch.
RUN = (
    "import sys; from awqforge.cli import main; rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'the client imported torch'; sys.exit(rc)"
)


def cli(service, key, *args, timeout=240):
    env = {**os.environ, "AWQFORGE_URL": service.url, "AWQFORGE_API_KEY": key or ""}
    return subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def waited(service):
    """One job submitted with `awqforge submit --wait` (calibration file uploaded by the client)."""
    from app.core.db import session_scope
    from app.services.keys import create_api_key

    with session_scope() as s:
        key = create_api_key(s, tenant_name="client-tenant").secret
    calib = service.home / "client-calib.txt"
    calib.write_text(service.calib_file.read_text())
    extra = {"eval": {"seq_len": 32, "max_seqs": 2}, "n_grid": 4}
    r = cli(
        service, key, "submit", str(service.model_dir), "--group-size", "32", "--calibration", str(calib),
        "--n-samples", "4", "--seq-len", "32", "--device", "cpu", "--format", "awq",
        "--format", "compressed-tensors", *[f"--set={k}={json.dumps(v)}" for k, v in extra.items()], "--wait",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split()[0]
    return dict(key=key, job_id=job_id, out=r.stdout, err=r.stderr)


def test_submit_wait_follows_the_stream_and_prints_metrics(waited):
    out, err = waited["out"], waited["err"]
    assert waited["job_id"].startswith("job_") and "on queue cpu" in out
    assert f"{waited['job_id']}  succeeded" in out
    assert "perplexity  FP" in out and "x smaller" in out and "quantize" in out
    assert "uploaded client-calib.txt" in err
    # Not a terminal: stage lines, no progress-bar redraws turned into long log lines.
    assert "\r" not in err and max(len(line) for line in err.splitlines()) < 300
    stages = [line.split("] ")[1] for line in err.splitlines() if line.startswith(f"[{waited['job_id']}] ")]
    assert "quantize" in stages and "evaluate" in stages


def test_jobs_status_and_api_errors(service, waited):
    key, job_id = waited["key"], waited["job_id"]
    r = cli(service, key, "jobs")
    assert r.returncode == 0 and job_id in r.stdout and "succeeded" in r.stdout
    r = cli(service, key, "status", job_id)
    assert r.returncode == 0 and "succeeded" in r.stdout and "perplexity" in r.stdout
    assert json.loads(cli(service, key, "status", job_id, "--json").stdout)["id"] == job_id

    r = cli(service, key, "status", "job_doesnotexist")
    assert r.returncode == 2 and r.stderr.strip() == "error: job not found"
    r = cli(service, "awqf_bad_key", "jobs")
    assert r.returncode == 2 and "missing, unknown or revoked API key" in r.stderr
    r = cli(service, key, "submit", str(service.model_dir), "--bits", "5")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "bits" in r.stderr
    r = cli(service, key, "submit", "/etc/passwd")
    assert r.returncode == 2 and "model" in r.stderr


def test_cancel(service, waited):
    key = waited["key"]
    r = cli(service, key, "submit", str(service.deep_model_dir), "--device", "cpu", "--n-samples", "4",
            "--seq-len", "32", "--calibration", f"file:{service.calib_file}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[0]
    r = cli(service, key, "cancel", job_id)
    assert r.returncode == 0 and job_id in r.stdout and ("cancelled" in r.stdout or "running" in r.stdout)
    r = cli(service, key, "cancel", job_id)  # cancelling twice is the API's 409, shown as its message
    assert r.returncode in (0, 2)
    if r.returncode == 2:
        assert r.stderr.startswith("error: ")


def test_download_resumes_with_range_and_verifies_sha256(service, waited, tmp_path):
    key, job_id = waited["key"], waited["job_id"]
    dest = tmp_path / "out"
    r = cli(service, key, "download", job_id, str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    weights = dest / "awq" / "model.safetensors"
    manifest = json.loads((dest / "awq" / "manifest.json").read_text())["files"]
    assert weights.stat().st_size == manifest["model.safetensors"]["size"]
    assert (dest / "compressed-tensors" / "config.json").exists()
    assert "sha256 ok" in r.stdout

    # A cut download: half the file left as .part; the client asks for the rest with Range.
    data = weights.read_bytes()
    weights.unlink()
    (weights.parent / "model.safetensors.part").write_bytes(data[: len(data) // 2])
    r = cli(service, key, "download", job_id, str(dest), "--format", "awq")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model.safetensors" in r.stdout and "resumed, sha256 ok" in r.stdout
    assert weights.read_bytes() == data

    # A corrupt partial file is caught by the sha256; the client starts that file again and ends whole.
    weights.unlink()
    (weights.parent / "model.safetensors.part").write_bytes(b"\0" * (len(data) // 2))
    r = cli(service, key, "download", job_id, str(dest), "--format", "awq")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model.safetensors" in r.stdout and "restarted after a sha256 mismatch, sha256 ok" in r.stdout
    assert weights.read_bytes() == data and not (weights.parent / "model.safetensors.part").exists()

    # A complete .part (cut between the last byte and the rename): completed without a request, no 416.
    weights.rename(weights.parent / "model.safetensors.part")
    r = cli(service, key, "download", job_id, str(dest), "--format", "awq")
    assert r.returncode == 0 and "resumed, sha256 ok" in r.stdout, r.stdout + r.stderr
    assert weights.read_bytes() == data

    # A complete .part of the right size but wrong bytes: fetched again from the start.
    weights.unlink()
    (weights.parent / "model.safetensors.part").write_bytes(b"\1" * len(data))
    r = cli(service, key, "download", job_id, str(dest), "--format", "awq")
    assert r.returncode == 0 and "restarted after a sha256 mismatch" in r.stdout, r.stdout + r.stderr
    assert weights.read_bytes() == data

    # A corrupt local manifest.json (same size, other bytes) is repaired, not skipped.
    manifest_path = dest / "awq" / "manifest.json"
    good = manifest_path.read_bytes()
    manifest_path.write_bytes(b"#" * len(good))
    r = cli(service, key, "download", job_id, str(dest), "--format", "awq")
    assert r.returncode == 0 and "awq/manifest.json" in r.stdout and "repaired, sha256 ok" in r.stdout, (
        r.stdout
    )
    assert manifest_path.read_bytes() == good
    # every file of the listing carries the sha256 the run recorded (README: "files with size and sha256")
    from awqforge.manifest import sha256_file

    listing = service.client(key).get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    awq = next(x for x in listing if x["format"] == "awq")
    assert {f["path"]: f["sha256"] for f in awq["files"]} == {
        p.relative_to(dest / "awq").as_posix(): sha256_file(p)
        for p in (dest / "awq").rglob("*")
        if p.is_file()
    }
