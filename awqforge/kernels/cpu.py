"""The C++ W4 CPU kernel: JIT build (cached) and its Python wrapper.

Build: compiled on first use with torch.utils.cpp_extension.load (needs a C++ compiler and ninja,
both pulled in by `pip install awqforge` except the compiler itself), then cached. The cache folder
is, in order: $AWQFORGE_EXTENSIONS_DIR, $TORCH_EXTENSIONS_DIR/awqforge, or
~/.cache/awqforge/torch_extensions; below it one folder per torch version (torch2.13.0_cpu/...), so
a torch upgrade rebuilds instead of loading a stale binary. A first build takes ~40-70 s (measured
on 2 busy cores); later processes load the cached .so in a few seconds (ninja only recompiles when
the source or flags change). The build has AVX2+FMA code (function-level target attributes) and a portable
scalar path, plus an AVX-512 variant of the same kernels, in one binary; which one runs is decided
at call time (`best_isa()`: torch.backends.cpu.get_cpu_capability(), capped by $AWQFORGE_CPU_ISA,
and re-checked in C++ with __builtin_cpu_supports). On a non-x86 build the SIMD code is compiled
out (#if) and only the scalar path exists.

A failed build raises `KernelBuildError` carrying the compiler's output; QuantLinear catches it,
warns once and uses the pure-torch reference instead.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from awqforge.packing import CPU_BLOCK_N

_SOURCE = Path(__file__).parent / "csrc" / "w4_cpu.cpp"
_EXT_NAME = "awqforge_w4_cpu"

# From this many rows on, decode panels of PANEL_N channels and let the BLAS sgemm multiply them.
PANEL_MIN_M = int(os.environ.get("AWQFORGE_CPU_PANEL_MIN_M", "48"))
PANEL_N = int(os.environ.get("AWQFORGE_CPU_PANEL_N", "256"))
# Software prefetch distance (bytes) in the weight stream of the tile loops; 0 disables. At M=1 one
# core does not keep enough reads in flight on its own: 4 KiB ahead cut the time by ~40% here.
PREFETCH = int(os.environ.get("AWQFORGE_CPU_PREFETCH", "4096"))

_lock = threading.Lock()
_module: ModuleType | None = None
_error: KernelBuildError | None = None


class KernelBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded; the message says why."""


def build_dir() -> Path:
    root = os.environ.get("AWQFORGE_EXTENSIONS_DIR")
    if root:
        base = Path(root)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "awqforge"
    else:
        base = Path.home() / ".cache" / "awqforge" / "torch_extensions"
    torch_tag = torch.__version__.replace("+", "_")
    return base / f"torch{torch_tag}" / _EXT_NAME


def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first time) or load the cached extension; raises KernelBuildError on failure."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise _error
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            _module = cpp_extension.load(
                name=_EXT_NAME,
                sources=[str(_SOURCE)],
                build_directory=str(directory),
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast"],
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # compiler missing, compile error, ninja missing, ...
            _error = KernelBuildError(
                f"building the AWQForge CPU kernel in {directory} failed: {type(exc).__name__}: {exc}"
            )
            raise _error from exc
    return _module


def is_available() -> bool:
    try:
        load_extension()
    except KernelBuildError:
        return False
    return True


ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}


def best_isa() -> str:
    """Runtime check: the widest path this CPU runs.

    torch.backends.cpu.get_cpu_capability() gives scalar / AVX2 / AVX-512.
    AWQFORGE_CPU_ISA=scalar|avx2|avx512 caps it (the C++ side also refuses anything the CPU lacks).
    """
    cap = torch.backends.cpu.get_cpu_capability()
    isa = "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "scalar"
    cap_env = os.environ.get("AWQFORGE_CPU_ISA")
    if cap_env in ISAS and ISAS[cap_env] < ISAS[isa]:
        isa = cap_env
    return isa


def w4_linear_cpu(
    x: torch.Tensor,
    qdata: torch.Tensor,
    params: torch.Tensor,
    out_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    isa: str | None = None,
    panel_min_m: int | None = None,
) -> torch.Tensor:
    """y = x . W^T (+ bias) for fp32/bf16/fp16 x [..., K] from `packing.pack_cpu_w4` tensors.

    group_size is the effective group size (K for per-channel). Computes in fp32, returns x.dtype.
    """
    ext = load_extension()
    if x.device.type != "cpu":
        raise ValueError(f"the CPU kernel needs CPU tensors, got {x.device}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"unsupported activation dtype {x.dtype}")
    if qdata.shape[0] * CPU_BLOCK_N < out_features:
        raise ValueError("qdata holds fewer channels than out_features")
    lead = x.shape[:-1]
    y = ext.w4_linear(
        x.reshape(-1, x.shape[-1]),  # fp32/bf16/fp16: converted to fp32 inside, with the row sums
        qdata,
        params,
        out_features,
        group_size,
        ISAS[isa or best_isa()],
        PANEL_MIN_M if panel_min_m is None else panel_min_m,
        PANEL_N,
        PREFETCH,
        bias,
    )
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.reshape(*lead, out_features)
