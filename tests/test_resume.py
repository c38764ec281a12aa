"""Block checkpoints in the engine: a run that dies after block k resumes at block k and writes the same
artifact bytes as a run that never stopped (awqforge/checkpoint.py, run_quantization(checkpoint_dir=...))."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.pipeline import ProgressEvent, run_quantization
from awqforge.spec import JobSpec

# The report and model card carry wall times; the manifest lists their hashes. Everything else
# (weights, config, tokenizer files) must be byte for byte the same.
TIMED = {"quant_report.json", "README.md", "manifest.json"}


def spec_for(model: Path, **overrides) -> JobSpec:
    fields = dict(
        model=str(model),
        quant={"bits": 4, "group_size": 32},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=["awq", "compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in TIMED
    }


class WorkerLost(BaseException):
    """What a SIGKILL looks like from inside: the run stops with no chance to clean up its checkpoints."""


def crash_after(n_blocks_done: int):
    def progress(e: ProgressEvent) -> None:
        if e.stage == "quantize" and e.block == n_blocks_done:
            raise WorkerLost

    return progress


def test_resume_after_crash_gives_identical_artifacts(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", num_hidden_layers=5)
    spec = spec_for(model)
    reference = run_quantization(spec, tmp_path / "ref")

    work = tmp_path / "work"
    with pytest.raises(WorkerLost):
        run_quantization(spec, tmp_path / "out", checkpoint_dir=work, progress=crash_after(3))
    assert not (tmp_path / "out").exists(), "an interrupted run leaves no partial artifact"
    assert sorted(p.name for p in work.glob("block-*")) == [f"block-0000{i}.safetensors" for i in range(3)]

    logs: list[str] = []
    events: list[ProgressEvent] = []
    resumed = run_quantization(spec, tmp_path / "out", checkpoint_dir=work, log=logs.append, progress=events.append)
    assert any("resuming at block 3/5" in m for m in logs), logs
    # Only blocks 3 and 4 were quantized again: the first block reported by the resumed run is 4 (3 done + 1).
    assert min(e.block for e in events if e.stage == "quantize" and e.block) == 4
    for fmt in ("awq", "compressed-tensors"):
        assert digests(resumed.artifacts[fmt]) == digests(reference.artifacts[fmt]), fmt
    # The layer metrics and the scale mappings of the replayed blocks are kept for the report.
    assert [(m.block, m.name, m.mse_quant) for m in resumed.layers] == [
        (m.block, m.name, m.mse_quant) for m in reference.layers
    ]
    assert resumed.metrics["n_layers_quantized"] == reference.metrics["n_layers_quantized"]


def test_checkpoints_of_another_spec_are_ignored(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", num_hidden_layers=3)
    work = tmp_path / "work"
    with pytest.raises(WorkerLost):
        run_quantization(spec_for(model), tmp_path / "a", checkpoint_dir=work, progress=crash_after(2))
    other = spec_for(model, quant={"bits": 4, "group_size": 64})
    logs: list[str] = []
    result = run_quantization(other, tmp_path / "b", checkpoint_dir=work, log=logs.append)
    assert not any("resuming" in m for m in logs)
    reference = run_quantization(other, tmp_path / "ref")
    assert digests(result.artifacts["awq"]) == digests(reference.artifacts["awq"])


def test_torn_checkpoint_write_resumes_from_the_last_whole_block(tiny_checkpoint, tmp_path):
    """A crash between a block's file and the inputs that follow it: that block is quantized again."""
    model = tiny_checkpoint("llama", num_hidden_layers=3)
    spec = spec_for(model, formats=["awq"])
    work = tmp_path / "work"
    with pytest.raises(WorkerLost):
        run_quantization(spec, tmp_path / "out", checkpoint_dir=work, progress=crash_after(2))
    # Roll the inputs back to "next block 1" while block 1's file stays, as if the kill fell in between.
    from awqforge.checkpoint import BlockCheckpoints, spec_fingerprint

    ck = BlockCheckpoints(work, spec_fingerprint(spec))
    ck.save_inputs(1, torch.zeros(1))  # a torn state must not be trusted past the inputs' own marker
    (work / "block-00000.safetensors").unlink()
    logs: list[str] = []
    result = run_quantization(spec, tmp_path / "out", checkpoint_dir=work, log=logs.append)
    assert not any("resuming" in m for m in logs), "block 0 missing: start over"
    reference = run_quantization(spec, tmp_path / "ref")
    assert digests(result.artifacts["awq"]) == digests(reference.artifacts["awq"])
