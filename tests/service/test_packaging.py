"""A non-editable install: the wheel built from the tracked files holds the engine `awqforge` and the
service's own top-level packages `app`, `worker` and `migrations` (each import path is its file path),
and, installed into a fresh virtualenv and run away from the repository, it migrates a Postgres database,
serves, runs a worker and takes a job end to end."""

from __future__ import annotations

import os
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.wheel_build import build_wheel, run_checked

from .conftest import PG_ADMIN_URL, SERVICE_ENV, services_available
from .test_embedded import run_embedded_job

REPO = Path(__file__).resolve().parents[2]


_run = run_checked


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed; its dependencies come from the environment running the
    tests, whatever it is (the system interpreter, a virtualenv, a conda-style prefix). `--system-site-packages`
    alone would expose the base interpreter's site, not a virtualenv's, so the running interpreter's own
    site folders are added after the new venv's (a `.pth` that calls `site.addsitedir`, which also honours
    their `.pth` files)."""
    import site
    import sysconfig

    env_dir = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)])
    py = env_dir / "bin" / "python"
    new_site = _run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    parents = dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    )
    lines = [f"import site; site.addsitedir({d!r})" for d in parents if Path(d).is_dir() and d != new_site]
    (Path(new_site) / "_awqforge_test_parent_site.pth").write_text("\n".join(lines) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    return py


TOP_LEVEL = ["app", "awqforge", "migrations", "worker"]


def test_wheel_has_the_engine_and_service_packages_and_every_service_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        *TOP_LEVEL,
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    tracked = _run(["git", "ls-files", "app", "worker", "migrations"], cwd=REPO).stdout.split()
    wanted = [
        f
        for f in tracked
        if f.endswith((".py", ".mako", ".html", ".js", ".css")) or "/static/" in f or "/templates/" in f
    ]
    missing = [f for f in wanted if f not in names]
    assert not missing, missing
    top = sorted(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top[0]).decode().split() == TOP_LEVEL
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in ("serve", "migrate", "keys", "tenants", "worker", "submit", "status", "download"):
        assert f"{command} = app." in entry, entry


def test_installed_wheel_adds_only_its_packages(venv, tmp_path):
    """What the install adds to site-packages (its RECORD) is its four packages and its dist-info, and the
    service modules load from there, not from the repository."""
    code = (
        "import importlib.metadata as m, app.main, worker.celery_app, migrations;"
        "print(app.__file__, migrations.__file__);"
        "print(sorted({str(f).split('/')[0] for f in m.distribution('awqforge').files if not str(f).startswith('..')}))"
    )
    out = _run([str(venv), "-c", code], cwd=tmp_path).stdout.split("\n")
    site = str(venv.parents[1])
    assert all(
        f.startswith(site) and "/site-packages/" in f and not f.startswith(str(REPO)) for f in out[0].split()
    ), out
    assert out[1] == str(sorted([*TOP_LEVEL, "awqforge-0.1.0.dist-info"])), out


@pytest.mark.skipif(not services_available(), reason="needs the real Postgres")
def test_installed_wheel_migrates_postgres(venv, tmp_path):
    import psycopg

    name = f"awqforge_pkg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = SERVICE_ENV["DATABASE_URL"].rsplit("/", 1)[0]
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
        env.update(DATABASE_URL=f"{base}/{name}", AWQFORGE_HOME=str(tmp_path / "home"))
        out = _run([str(venv), "-m", "awqforge", "migrate"], cwd=tmp_path, env=env, timeout=120).stdout
        assert "database at head" in out
        heads = sorted(p.name.split("_")[0] for p in (REPO / "migrations" / "versions").glob("0*.py"))
        with psycopg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}") as conn:
            (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert version.startswith(heads[-1]) and {"jobs", "api_keys", "artifacts"} <= tables, (
            version,
            tables,
        )
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_installed_wheel_serves_and_runs_a_job(venv, tiny_models, tmp_path):
    """keys, serve (migrates SQLite), its worker child (celery -A worker.celery_app) and a job, run
    from a folder outside the repository with the installed package only."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_embedded_job(str(venv), work, tiny_models, tmp_path)
