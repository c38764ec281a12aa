"""quant_report.json: what a quantization run did and measured, and the few lines the CLI prints of it."""

from __future__ import annotations

import json
import platform
import resource
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

REPORT_NAME = "quant_report.json"


def reset_peak_rss() -> None:
    """Start the process's peak-RSS counter afresh (Linux), so a long-lived worker reports this job's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak resident set size since the last reset (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        v = value.float()
        return {
            "shape": list(value.shape),
            "min": v.min().item(),
            "max": v.max().item(),
            "mean": v.mean().item(),
        }
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def build_report(
    *,
    spec,
    resolved_path: Path,
    revision: str | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    checkpoint_dtype: torch.dtype,
    metrics: dict,
    layers: list,
    mappings: dict,
    skipped: list[str],
    artifacts: dict[str, Path],
    eval_info: dict | None,
    calibration: dict | None = None,
) -> dict:
    """The report as a JSON-ready dict. The job spec is included without its secrets (public_spec). `method` says in
    words what ran (the model card's labels); `calibration` the real sample and token counts (None: RTN)."""
    from awqforge.formats.card import describe_method
    from awqforge.spec import is_local_path, public_spec

    settings = public_spec(spec)
    return _jsonable(
        {
            "awqforge_version": _version(),
            "settings": settings,
            "method": describe_method(spec),
            "calibration": calibration,
            "source": {
                # a hub model by its id (not the download cache's folder); a local one as it was given
                "path": str(resolved_path) if is_local_path(spec.model) else spec.model,
                "revision": revision,
                "dtype": str(checkpoint_dtype).removeprefix("torch."),
            },
            "environment": {
                "device": str(device),
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "metrics": metrics,
            "evaluation": eval_info,
            "artifacts": {fmt: Path(p).name for fmt, p in artifacts.items()},  # beside this report
            "layers": [asdict(m) for m in layers],
            "mappings": mappings,
            "skipped_mappings": skipped,
        }
    )


def write_report(folder: Path, report: dict) -> Path:
    path = Path(folder) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def summary_lines(metrics: dict, layers: list) -> list[str]:
    """A few human lines: perplexities, sizes, error reduction, time and memory."""
    lines = []
    fp, q = metrics.get("fp_perplexity"), metrics.get("quant_perplexity")
    if fp is not None or q is not None:
        lines.append(f"perplexity: FP {_fmt(fp)} -> quantized {_fmt(q)}")
    before, after = metrics.get("size_before_bytes"), metrics.get("size_after_bytes")
    if before and after:
        lines.append(
            f"size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({before / after:.2f}x smaller)"
        )
    if layers:
        rtn = sum(m.mse_rtn for m in layers)
        ours = sum(m.mse_quant for m in layers)
        if rtn > 0:
            lines.append(
                f"{metrics.get('n_layers_quantized', len(layers))} layers quantized; output MSE vs RTN: "
                f"{ours / rtn:.3f}x (sum over layers)"
            )
    walls = metrics.get("wall_time_s", {})
    if walls:
        lines.append("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in walls.items()))
    lines.append(
        f"peak memory: RSS {metrics.get('peak_rss_bytes', 0) / 2**30:.2f} GiB"
        + (f", GPU {metrics['peak_gpu_bytes'] / 2**30:.2f} GiB" if metrics.get("peak_gpu_bytes") else "")
    )
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _version() -> str:
    from awqforge import __version__

    return __version__
