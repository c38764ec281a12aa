"""Block checkpoints in the engine: a run that dies after block k resumes at block k and writes the same
artifact bytes as a run that never stopped (awqforge/checkpoint.py, run_quantization(checkpoint_dir=...))."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def run_ref(tiny_checkpoint, tmp_path_factory):
    """(model, spec, digests by format of an uninterrupted run without checkpoints)."""
    model = tiny_checkpoint("llama", num_hidden_layers=4)
    spec = spec_for(model)
    result = run_quantization(spec, tmp_path_factory.mktemp("ref") / "out")
    return model, spec, {fmt: digests(path) for fmt, path in result.artifacts.items()}, result


def test_resume_after_crash_gives_identical_artifacts(run_ref, tmp_path):
    _model, spec, reference, ref_result = run_ref
    work = tmp_path / "work"
    with pytest.raises(WorkerLost):
        run_quantization(spec, tmp_path / "out", checkpoint_dir=work, progress=crash_after(2))
    assert not (tmp_path / "out").exists(), "an interrupted run leaves no partial artifact"
    assert sorted(p.name for p in work.glob("block-*")) == [f"block-0000{i}.safetensors" for i in range(2)]

    logs: list[str] = []
    events: list[ProgressEvent] = []
    resumed = run_quantization(
        spec, tmp_path / "out", checkpoint_dir=work, log=logs.append, progress=events.append
    )
    assert any("resuming at block 2/4" in m for m in logs), logs
    # Only blocks 2 and 3 were quantized again: the first block the resumed run reports is 3 (2 done + 1).
    assert min(e.block for e in events if e.stage == "quantize" and e.block) == 3
    assert {fmt: digests(p) for fmt, p in resumed.artifacts.items()} == reference
    # The layer metrics and the scale mappings of the replayed blocks are kept for the report.
    assert [(m.block, m.name, m.mse_quant) for m in resumed.layers] == [
        (m.block, m.name, m.mse_quant) for m in ref_result.layers
    ]
    assert resumed.metrics["n_layers_quantized"] == ref_result.metrics["n_layers_quantized"]


def test_checkpoints_of_another_spec_are_ignored(run_ref, tmp_path):
    model, spec, reference, _ = run_ref
    work = tmp_path / "work"
    other = spec_for(model, quant={"bits": 4, "group_size": 64})
    with pytest.raises(WorkerLost):
        run_quantization(other, tmp_path / "a", checkpoint_dir=work, progress=crash_after(2))
    logs: list[str] = []
    result = run_quantization(spec, tmp_path / "b", checkpoint_dir=work, log=logs.append)
    assert not any("resuming" in m for m in logs)
    assert {fmt: digests(p) for fmt, p in result.artifacts.items()} == reference


def test_torn_checkpoint_is_not_trusted(run_ref, tmp_path):
    """A block file missing below the inputs' resume marker (a torn or tampered folder): start over."""
    _model, spec, reference, _ = run_ref
    work = tmp_path / "work"
    with pytest.raises(WorkerLost):
        run_quantization(spec, tmp_path / "out", checkpoint_dir=work, progress=crash_after(2))
    (work / "block-00000.safetensors").unlink()
    logs: list[str] = []
    result = run_quantization(spec, tmp_path / "out", checkpoint_dir=work, log=logs.append)
    assert not any("resuming" in m for m in logs), "block 0 missing: start over"
    assert {fmt: digests(p) for fmt, p in result.artifacts.items()} == reference


def test_checkpoints_of_another_engine_revision_are_ignored(run_ref, tmp_path, monkeypatch):
    """A worker upgraded between the crash and the resume (an engine change that alters what blocks write)
    starts over: one artifact never mixes blocks of two engines."""
    import awqforge.checkpoint as checkpoint

    _model, spec, reference, _ = run_ref
    work = tmp_path / "work"
    monkeypatch.setattr(checkpoint, "ENGINE_REVISION", checkpoint.ENGINE_REVISION - 1)
    with pytest.raises(WorkerLost):
        run_quantization(spec, tmp_path / "out", checkpoint_dir=work, progress=crash_after(2))
    monkeypatch.undo()
    logs: list[str] = []
    result = run_quantization(spec, tmp_path / "out", checkpoint_dir=work, log=logs.append)
    assert not any("resuming" in m for m in logs), logs
    assert {fmt: digests(p) for fmt, p in result.artifacts.items()} == reference
