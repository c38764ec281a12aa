"""The engine installs and runs without the service stack or Triton: the wheel's core requirements name none
of them, and the installed wheel, run away from the repository in a process where importing any of them
fails, quantizes a tiny model through its Python API and its CLI (`awqforge quantize`), loads the result and
plans a job. The service's own packages are blocked too, so the engine cannot lean on them."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.wheel_build import build_wheel, run_checked

REPO = Path(__file__).resolve().parents[1]
# What `pip install awqforge` must not bring (the service stack, the GPU kernel's compiler).
SERVICE_STACK = (
    "fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "sqlalchemy", "psycopg", "alembic",
    "pydantic_settings", "boto3", "prometheus_client", "cryptography", "multipart", "triton",
)  # fmt: skip
OWN_SERVICE = ("app", "worker", "migrations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist"))


def _requires(whl: Path) -> list[Requirement]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def test_the_wheels_core_requirements_lack_the_service_stack(wheel):
    reqs = _requires(wheel)
    core = {
        r.name.lower().replace("_", "-") for r in reqs if r.marker is None or "extra" not in str(r.marker)
    }
    blocked = {n.replace("_", "-") for n in SERVICE_STACK} | {
        "pydantic-settings",
        "python-multipart",
        "httpx",
    }
    assert core, reqs
    assert not core & blocked, sorted(core & blocked)
    assert {"torch", "transformers", "safetensors", "pydantic", "pyyaml"} <= core
    extras = {str(m).split("==")[-1].strip(" '\"") for r in reqs if (m := r.marker) and "extra" in str(m)}
    assert {"service", "gpu", "eval"} <= extras


# Top-level modules of those distributions (and of their own dependencies that only they bring).
ABSENT = (*SERVICE_STACK, "psycopg_binary", "psycopg_c", "botocore", "s3transfer", "python_multipart", "billiard",
          "vine", "amqp", "httptools", "uvloop", "watchfiles", "websockets", *OWN_SERVICE)  # fmt: skip


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def engine_only_site(dest: Path) -> Path:
    """A site folder with every installed distribution of this interpreter except the service stack and
    Triton (symlinks), and without .pth files (so no editable install of this repository is seen)."""
    import sysconfig

    dest.mkdir(parents=True, exist_ok=True)
    absent = {_norm(n) for n in ABSENT}
    for folder in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(folder).iterdir():
            top = _norm(entry.name.split("-")[0].removesuffix(".py"))
            if entry.suffix == ".pth" or top in absent or top.startswith(("__editable__", "awqforge")):
                continue
            if entry.name.endswith(".libs") and _norm(entry.name.removesuffix(".libs")) in absent:
                continue
            if not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


def test_the_installed_engine_quantizes_without_the_service_stack(wheel, tiny_checkpoint, tmp_path):
    site = tmp_path / "site"
    run_checked(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    )
    for pkg in OWN_SERVICE:  # an engine-only install: the service's packages are not there
        shutil.rmtree(site / pkg, ignore_errors=True)
    ckpt = tiny_checkpoint("llama")
    deps = engine_only_site(tmp_path / "deps")
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        ABSENT = {ABSENT!r}
        missing = [n for n in ABSENT if importlib.util.find_spec(n) is None]
        assert missing == list(ABSENT), sorted(set(ABSENT) - set(missing))
        import awqforge
        assert awqforge.__file__.startswith({str(site)!r}), awqforge.__file__
        from awqforge import run_quantization, load_quantized
        from awqforge.spec import JobSpec
        from awqforge.cli import main
        from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

        spec = JobSpec(model={str(ckpt)!r}, quant={{"group_size": 64}}, device="cpu", n_grid=4, formats=["awq"],
                       calibration={{"source": "file:" + str(BUNDLED_CALIBRATION_TEXT),
                                     "n_samples": 4, "seq_len": 64}}, eval={{"enabled": False}})
        result = run_quantization(spec, {str(tmp_path / "api")!r})
        model = load_quantized(result.artifacts["awq"])
        rc = main(["quantize", {str(ckpt)!r}, "--out", {str(tmp_path / "cli")!r}, "--method", "rtn",
                   "--group-size", "64", "--no-eval", "--device", "cpu"])
        assert rc == 0, rc
        rc = main(["plan", {str(ckpt)!r}, "--json"])
        assert rc == 0, rc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ABSENT)
        print(json.dumps({{"layers": result.metrics["n_layers_quantized"], "loaded": loaded}}))
        """
    )
    # -S: no site-packages but the engine-only folder (and the wheel's install) on the path
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{deps}", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    r = run_checked([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layers"] > 0 and out["loaded"] == []
    assert (tmp_path / "cli" / "awq" / "model.safetensors").exists()
