"""The C++ W4 CPU kernel: its build (once, at install), its cache, and its Python wrapper.

Built once, never inside a job: `awqforge kernels build` (run by scripts/install.sh and the
Dockerfile) compiles csrc/w4_cpu.cpp with torch.utils.cpp_extension (a C++ compiler with OpenMP,
ninja) into the kernel cache. A process that needs the kernel and is not a job builds it there first
if the install did not: `ensure_built()`, called by `awqforge quantize` / `awqforge eval` before any
work and by a worker at start-up (worker/startup.py, before it takes jobs), prints one progress line
and compiles (concurrent builders wait on cpp_extension's lock in the build folder). Inside a job
`load_extension()` only loads a binary that is already there; when there is none it raises
`KernelNotBuilt` (QuantLinear then warns once and uses the pure-torch reference, and `doctor`, the
job's report and its model card say so) unless JIT builds are allowed explicitly
(AWQFORGE_KERNELS_JIT=1, never in a worker, or `load_extension(allow_build=True)`, which tests and
benchmarks use).

Cache: `cache_root()` is, in order, $AWQFORGE_EXTENSIONS_DIR, $AWQFORGE_HOME/kernels, or
~/.awqforge/kernels (AWQFORGE_HOME's default), so it survives restarts and lives on the data volume
in the Docker image. Below it one folder per key, `build_dir()`:
torch<version>-<machine>/awqforge_w4_cpu-<source hash>, so a torch upgrade or a changed source
finds no binary (and `kernels build` makes a new one) instead of loading a stale one. The CPU
features are not part of the key on purpose: the binary holds the AVX2, AVX-512 (+VNNI) and scalar
paths (function-level target attributes, no -march), and which one runs is decided at call time
(`best_isa()`: torch.backends.cpu.get_cpu_capability(), capped by $AWQFORGE_CPU_ISA, re-checked in
C++ with __builtin_cpu_supports), so one build serves every x86-64 CPU. A build takes ~40-120 s on
2 busy cores; a later process loads the binary in well under a second. On a non-x86 build the SIMD
code is compiled out (#if) and only the scalar path exists.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

from awqforge.kernels import cache
from awqforge.packing import CPU_BLOCK_N

_SOURCE = cache.SOURCE
_EXT_NAME = cache.EXT_NAME
_CFLAGS = list(cache.CFLAGS)
_LDFLAGS = list(cache.LDFLAGS)

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


class KernelNotBuilt(KernelBuildError):
    """No built kernel for this torch/source in the cache, and JIT builds are not allowed."""


def cache_root() -> Path:
    """The kernel cache folder (see the module docstring)."""
    return cache.cache_root()


def source_hash() -> str:
    return cache.source_hash(_SOURCE, _CFLAGS + _LDFLAGS)


def build_dir() -> Path:
    """Where the binary for this torch version, machine and kernel source lives."""
    return cache.build_dir(torch.__version__, _SOURCE, _EXT_NAME, _CFLAGS + _LDFLAGS)


def built_binary() -> Path | None:
    """The cached extension binary, if `awqforge kernels build` made one for this key."""
    return cache.built_binary(torch.__version__, _SOURCE, _EXT_NAME, _CFLAGS + _LDFLAGS)


def jit_allowed() -> bool:
    return os.environ.get("AWQFORGE_KERNELS_JIT", "0") == "1"


def compiler() -> str | None:
    """Path of the C++ compiler cpp_extension would call ($CXX or c++), None when there is none."""
    return shutil.which(os.environ.get("CXX") or "c++")


def _import_binary(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_EXT_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(directory: Path, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    cxx = compiler()
    if cxx is None:
        raise KernelBuildError(
            f"no C++ compiler found (looked for {os.environ.get('CXX') or 'c++'} on PATH); install one "
            "(Debian/Ubuntu: apt-get install g++) and run `awqforge kernels build`"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_EXT_NAME,
        sources=[str(_SOURCE)],
        build_directory=str(directory),
        extra_cflags=list(_CFLAGS),  # cpp_extension appends to the lists it gets
        extra_ldflags=list(_LDFLAGS),
        verbose=verbose,
    )


def load_extension(allow_build: bool | None = None, verbose: bool = False) -> ModuleType:
    """Load the built kernel; raises KernelNotBuilt / KernelBuildError.

    allow_build: compile it when it is not in the cache (default: only with AWQFORGE_KERNELS_JIT=1).
    """
    global _module, _error
    if _module is not None:
        return _module
    allow = jit_allowed() if allow_build is None else allow_build
    if _error is not None and not (allow and isinstance(_error, KernelNotBuilt)):
        raise _error
    with _lock:
        if _module is not None:
            return _module
        directory = build_dir()
        binary = built_binary()
        try:
            if binary is not None:
                _module = _import_binary(binary)
            elif allow:
                _module = _compile(directory, verbose)
            else:
                _error = KernelNotBuilt(
                    f"the AWQForge CPU kernel is not built for torch {torch.__version__} in {directory}; "
                    "run `awqforge kernels build` once (scripts/install.sh does), or set "
                    "AWQFORGE_KERNELS_JIT=1 to let a process compile it"
                )
                raise _error
        except KernelBuildError as exc:  # not built, no compiler: already says what to do
            _error = exc
            raise
        except Exception as exc:  # compiler missing, compile error, ninja missing, bad binary ...
            _error = KernelBuildError(
                f"building the AWQForge CPU kernel in {directory} failed: {type(exc).__name__}: {exc}"
            )
            raise _error from exc
    return _module


def build(verbose: bool = False) -> Path:
    """Compile the kernel into the cache (no-op when it is there); returns the binary's path."""
    load_extension(allow_build=True, verbose=verbose)
    binary = built_binary()
    if binary is None:
        raise KernelBuildError(f"the build finished but no binary is in {build_dir()}")
    return binary


def ensure_built(announce=None, verbose: bool = False) -> tuple[bool, str]:
    """Load the cached kernel, or compile it into the cache now, announcing that with one line first
    (`announce(text)`, e.g. a print to stderr): for a process that needs the kernel and is not a job, before
    any work. Never raises: (True, the binary's path) when the kernel is ready, else (False, why not): no
    C++ compiler, a failed build, AWQFORGE_KERNELS=0; QuantLinear then runs the pure-torch reference."""
    if os.environ.get("AWQFORGE_KERNELS", "1") == "0":
        return False, "AWQFORGE_KERNELS=0 turns the kernels off"
    if built_binary() is None and compiler() is not None and announce is not None:
        announce(
            f"building the AWQForge CPU kernel for torch {torch.__version__} into {build_dir()} "
            "(once, about a minute; later runs load it) ..."
        )
    try:
        load_extension(allow_build=True, verbose=verbose)
    except KernelBuildError as exc:
        return False, str(exc)
    binary = built_binary()
    if binary is None:
        return False, f"the build finished but no binary is in {build_dir()}"
    return True, str(binary)


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
