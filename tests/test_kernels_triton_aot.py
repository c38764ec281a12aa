"""Every launch configuration of the Triton W4A16 kernel compiles for sm_80 and sm_90 without spills.

No GPU needed: triton.compile with a GPUTarget gives the PTX, and the ptxas inside the triton wheel
(`-v`) reports registers and spill bytes. fp16 and bf16 activations: the bf16 tl.dot path, which the
CPU interpreter of tests/test_kernels_triton.py widens to fp32, is compiled here as a GPU runs it.
Compiles run two at a time in worker processes; triton's own disk cache makes a rerun fast.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")


def ptxas_path(arch: int = 80) -> Path:
    """The ptxas triton itself uses for this arch (the wheel bundles a newer one for sm_90+)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(arch).path)


def compile_config(args: tuple[str, int, str]) -> dict:
    """Compile one (configuration, arch, dtype) to PTX, run ptxas -v; registers and spill bytes."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from awqforge.kernels import triton_w4a16 as tw

    name, arch, dtype = args
    cfg = next(c for c in tw.LAUNCH_CONFIGS if c.name == name)
    signature = {
        "x_ptr": f"*{dtype}",
        "qw_ptr": "*i32",
        "qz_ptr": "*i32",
        "s_ptr": f"*{dtype}",  # QuantLinear keeps scales in the activation dtype
        "y_ptr": "*fp32" if cfg.split_k else f"*{dtype}",
        **dict.fromkeys(("M", "N", "K", "group_size", "stride_xm", "stride_ym", "SPLIT_K"), "i32"),
    }
    constexprs = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": 8,
        "USE_DOT": cfg.use_dot,
        "ATOMIC": cfg.split_k,
        "DOT_F32": False,  # what a GPU runs (True only under the CPU interpreter)
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    src = ASTSource(fn=tw._w4a16_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": tw.NUM_STAGES},
    )
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [str(ptxas_path(arch)), "-v", f"-arch={target}", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    info = out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "config": name,
        "arch": target,
        "dtype": dtype,
        "ok": out.returncode == 0,
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "ptxas": info[-2000:],
        "bf16_mma": bool(re.search(r"mma[\w.]*\.bf16", ptx)),
    }


@cache
def compiled_all() -> tuple[dict, ...]:
    from awqforge.kernels import triton_w4a16 as tw

    jobs = [(c.name, arch, dtype) for c in tw.LAUNCH_CONFIGS for arch in ARCHS for dtype in DTYPES]
    # fresh (spawned) workers without TRITON_INTERPRET, which the interpreter tests may have set
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1), mp_context=ctx) as pool:
            return tuple(pool.map(compile_config, jobs))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="module")
def results():
    if not all(ptxas_path(arch).is_file() for arch in ARCHS):
        pytest.skip("this triton wheel has no bundled ptxas")
    return compiled_all()


def test_every_launch_configuration_compiles_without_spills(results):
    from awqforge.kernels import triton_w4a16 as tw

    assert len(results) == len(tw.LAUNCH_CONFIGS) * len(ARCHS) * len(DTYPES)
    for r in results:
        assert r["ok"], r["ptxas"]
        assert r["registers"] is not None and r["spill_stores"] is not None, r["ptxas"]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255, r
    archs = {r["arch"].rstrip("a") for r in results}
    assert archs == {"sm_80", "sm_90"}


def test_bf16_uses_tensor_cores(results):
    """The bf16 tl.dot configurations really compile to bf16 MMA instructions."""
    from awqforge.kernels import triton_w4a16 as tw

    dot_configs = {c.name for c in tw.LAUNCH_CONFIGS if c.use_dot}
    assert dot_configs
    for r in results:
        if r["config"] in dot_configs:
            assert r["bf16_mma"] == (r["dtype"] == "bf16"), r["config"]
