"""Deployment files: docker-compose.yml through `docker-compose config`, the Dockerfile through hadolint and
its structure, and the settings compose relies on (DATABASE_URL from parts, SECRET_KEY length)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "p@ss:w/rd%41#?",
    "SECRET_KEY": "k" * 48,
    "S3_ACCESS_KEY_ID": "awqforge",
    "S3_SECRET_ACCESS_KEY": "s" * 24,
}


def _compose(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is needed (Debian's docker-compose; scripts/install.sh installs it)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "SECRET_KEY"))}
    return subprocess.run(
        [exe, "-f", str(ROOT / "docker-compose.yml"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # no .env from the repository
    )


def test_compose_file_is_valid_and_complete():
    import yaml

    out = _compose("--profile", "gpu", "config", env=COMPOSE_ENV)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    svc = cfg["services"]
    assert {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "migrate",
        "api",
        "worker-cpu",
        "worker-gpu0",
        "flower",
    } <= set(svc)
    assert "--appendonly" in svc["redis"]["command"] and "noeviction" in svc["redis"]["command"]
    for name in ("api", "worker-cpu", "worker-gpu0"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc[name]["restart"] == "unless-stopped"
    assert svc["migrate"]["command"] == ["awqforge", "migrate"] and svc["migrate"]["restart"] == "no"
    for name in ("postgres", "redis", "minio", "api", "flower"):
        assert svc[name]["healthcheck"]["test"], name
    gpu = svc["worker-gpu0"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert re.search(r"/cu\d+$", gpu["build"]["args"]["TORCH_INDEX"]) and gpu["build"]["target"] == "worker"
    assert svc["worker-cpu"]["build"]["args"]["TORCH_INDEX"].endswith("/cpu")
    # the images' torch is the one pyproject.toml asks for (the requirement files leave torch out, and the
    # source is installed with --no-deps: nothing else would notice an older torch)
    floor = _torch_floor()
    for name in ("worker-cpu", "worker-gpu0"):
        assert svc[name]["build"]["args"]["TORCH_VERSION"] == floor, name
        # the worker target builds the requirements stage too: it must get the same Python base as the API
        assert svc[name]["build"]["args"]["PYTHON_IMAGE"] == svc["api"]["build"]["args"]["PYTHON_IMAGE"], name
    assert svc["worker-cpu"]["image"] != gpu["image"] != svc["api"]["image"]
    assert svc["api"]["build"]["target"] == "api"
    # the password travels as a part, never inside a hand-built URL
    assert svc["api"]["environment"]["POSTGRES_PASSWORD"] == COMPOSE_ENV["POSTGRES_PASSWORD"]
    assert "DATABASE_URL" not in svc["api"]["environment"]
    assert {"pg-data", "redis-data", "s3-data"} <= set(cfg["volumes"])
    # the GPU worker only with --profile gpu; everything else by default
    assert [n for n, v in svc.items() if v.get("profiles")] == ["worker-gpu0"]
    # a missing secret stops compose with the reason
    missing = _compose("config", env={k: v for k, v in COMPOSE_ENV.items() if k != "SECRET_KEY"})
    assert missing.returncode != 0 and "SECRET_KEY" in missing.stderr
    example = (ROOT / ".env.example").read_text()
    for var in (
        "POSTGRES_PASSWORD",
        "SECRET_KEY",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
        "QUEUE_CLASSES",
    ):
        assert re.search(rf"^{var}=", example, re.M), var


def _torch_floor() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if re.match(r"torch\b", d)]
    return re.fullmatch(r"torch>=([\d.]+)", torch).group(1) + ".0" * (2 - torch.count("."))


def _stages(text: str) -> dict[str, list[str]]:
    stages, current = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_dockerfile_lints_clean_and_is_layered():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [exe, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = _stages(text)
    assert {"requirements", "source", "api", "worker"} <= set(stages)
    for name in ("api", "worker"):
        body = "\n".join(stages[name])
        # dependencies first, then the source: a source change does not reinstall them
        assert body.index("pip install -r") < body.index("COPY --from=source"), name
        assert "USER 1000" in body and "HEALTHCHECK" in body, name
    assert "torch" not in "\n".join(ln for ln in stages["api"] if not ln.lstrip().startswith("#"))
    worker = "\n".join(stages["worker"])
    # the compiler comes before the torch index argument (changing the index keeps that layer)
    assert worker.index("g++") < worker.index("ARG TORCH_INDEX") < worker.index("COPY --from=source")
    assert "awqforge kernels build" in worker
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1) == _torch_floor()
    # the source is installed, not left in a working directory where it would shadow the installed package
    for name in ("api", "worker"):
        body = "\n".join(stages[name])
        assert "rm -rf /tmp/src" in body and "WORKDIR /srv" not in body, name
    for base in re.findall(r"ARG (?:PYTHON_IMAGE|WORKER_BASE)=(\S+)", text):
        assert re.search(r":\d+\.\d+", base), f"base image {base} is not pinned to a version"
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN)", text, re.M | re.I)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests", ".env"} <= set(ignored)


def test_image_requirements_split(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        check=True,
    )
    api = (tmp_path / "requirements-api.txt").read_text()
    worker = (tmp_path / "requirements-worker.txt").read_text()
    for heavy in ("torch", "transformers", "triton"):
        assert not re.search(rf"^{heavy}\b", api, re.M), heavy
    assert "fastapi" in api and "boto3" in api and "huggingface-hub" in api
    assert "transformers" in worker and not re.search(r"^(torch|triton)\b", worker, re.M)


def test_database_url_from_parts_survives_any_password():
    """POSTGRES_* parts are percent-encoded; the URL connects (trust auth ignores the password itself)."""
    from sqlalchemy import create_engine, make_url, text

    from app.core.config import Settings

    from .conftest import PG_ADMIN_URL

    admin = make_url(PG_ADMIN_URL)
    raw = "p@ss:w/rd%41#?&"
    s = Settings(
        _env_file=None,
        DATABASE_URL=None,
        POSTGRES_SERVER=admin.host or "127.0.0.1",
        POSTGRES_PORT=admin.port or 5432,
        POSTGRES_USER=admin.username or "postgres",
        POSTGRES_PASSWORD=raw,
        POSTGRES_DB=admin.database,
    )
    url = make_url(s.database_url)
    assert url.password == raw and url.host == (admin.host or "127.0.0.1") and url.database == admin.database
    engine = create_engine(s.database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
    from app.core.db import alembic_config

    assert alembic_config(s.database_url).get_main_option("sqlalchemy.url") == s.database_url


@pytest.mark.parametrize("env", ["local", "production"])
def test_short_secret_key_refused_with_the_reason(env, monkeypatch):
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match=r"shorter than 32 characters \(31\).*token_urlsafe"):
        Settings(
            _env_file=None,
            ENVIRONMENT=env,
            SECRET_KEY="a" * 31,
            DATABASE_URL="postgresql://x/y",
            REDIS_URL="redis://r",
        )
    assert Settings(_env_file=None, SECRET_KEY="a" * 32).SECRET_KEY == "a" * 32
