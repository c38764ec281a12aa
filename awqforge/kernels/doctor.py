"""Which kernel path each device will use, and why (`awqforge doctor`, `awqforge kernels build`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_report() -> dict[str, str]:
    """The CPU path: ISA and why, the kernel binary (or why there is none), the compiler."""
    from awqforge.kernels import cpu

    cap = torch.backends.cpu.get_cpu_capability()
    isa = cpu.best_isa()
    why = f"torch reports {cap}"
    if os.environ.get("AWQFORGE_CPU_ISA"):
        why += f", AWQFORGE_CPU_ISA={os.environ['AWQFORGE_CPU_ISA']}"
    info = {"model": _cpu_model(), "isa": isa, "isa_reason": why, "cache": str(cpu.build_dir())}
    info["compiler"] = cpu.compiler() or f"none ({os.environ.get('CXX') or 'c++'} not on PATH)"
    if os.environ.get("AWQFORGE_KERNELS", "1") == "0":
        info["path"] = "reference (AWQFORGE_KERNELS=0)"
        return info
    binary = cpu.built_binary()
    if binary is None:
        if cpu.jit_allowed() and cpu.compiler():
            info["path"] = "C++ kernel, compiled by the first process that needs it (AWQFORGE_KERNELS_JIT=1)"
        else:
            hint = "install a C++ compiler, then " if cpu.compiler() is None else ""
            info["path"] = (
                f"reference (pure torch, slow): the kernel is not built; {hint}run `awqforge kernels build`"
            )
        return info
    try:
        ext = cpu.load_extension(allow_build=False)
    except cpu.KernelBuildError as exc:
        info["path"] = f"reference (pure torch, slow): {exc}"
        return info
    info["binary"] = str(binary)
    if isa == "avx512":
        detail = "AVX-512 integer tiles" + (" with VNNI" if ext.cpu_has_avx512vnni() else " (no VNNI)")
    elif isa == "avx2":
        detail = "AVX2 integer tiles"
    else:
        detail = "portable scalar code"
    info["path"] = f"C++ kernel: {detail} at M < {cpu.PANEL_MIN_M}, decoded panels + sgemm above"
    return info


def cuda_reports() -> list[dict[str, str]]:
    """One entry per visible CUDA device: the Triton W4A16 kernel or the reference, and why."""
    if not torch.cuda.is_available():
        return []
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        entry = {
            "device": f"cuda:{i}",
            "name": torch.cuda.get_device_name(i),
            "capability": f"sm_{major}{minor}",
        }
        if os.environ.get("AWQFORGE_KERNELS", "1") == "0":
            entry["path"] = "reference (AWQFORGE_KERNELS=0)"
        elif triton_version is None:
            entry["path"] = "reference: triton is not installed"
        elif major >= 8:
            entry["path"] = (
                f"Triton W4A16 (triton {triton_version}), fp16/bf16 activations, group size % 16 == 0"
            )
        elif major == 7:
            entry["path"] = f"Triton W4A16 (triton {triton_version}) for fp16 activations; bf16 needs sm_80"
        else:
            entry["path"] = "reference: Triton needs compute capability 7.0 or newer"
        out.append(entry)
    return out


def report_lines() -> list[str]:
    lines = [f"torch {torch.__version__} ({platform.machine()})"]
    c = cpu_report()
    lines.append(f"cpu: {c['model']}")
    lines.append(f"  ISA: {c['isa']} ({c['isa_reason']})")
    lines.append(f"  path: {c['path']}")
    lines.append(f"  kernel cache: {c['cache']}" + (" (built)" if "binary" in c else " (empty)"))
    lines.append(f"  C++ compiler: {c['compiler']}")
    gpus = cuda_reports()
    if not gpus:
        lines.append("cuda: no CUDA device visible")
    for g in gpus:
        lines.append(f"{g['device']}: {g['name']} ({g['capability']})")
        lines.append(f"  path: {g['path']}")
    return lines
