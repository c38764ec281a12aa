"""run_quantization end to end on tiny checkpoints: artifacts, report, load-back, cancel, errors, memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.errors import InputError, JobCancelled, NumericalError, UnsupportedArchitecture
from awqforge.loading import load_quantized
from awqforge.pipeline import ProgressEvent, run_quantization
from awqforge.spec import JobSpec

CALIB = f"file:{BUNDLED_CALIBRATION_TEXT}"


def tiny_spec(model: Path, **overrides) -> JobSpec:
    """Small and fast: 8 x 64 calibration tokens, a coarse grid, short evaluation windows."""
    fields = dict(
        model=str(model),
        quant={"bits": 4, "group_size": 64},
        calibration={"source": CALIB, "n_samples": 8, "seq_len": 64},
        formats=["awq", "compressed-tensors"],
        eval={"seq_len": 64, "max_seqs": 4},
        device="cpu",
        n_grid=6,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_end_to_end_both_formats(family, tiny_checkpoint, tiny_tokenizer, tmp_path):
    ckpt = tiny_checkpoint(family)
    events: list[ProgressEvent] = []
    # MoE: symmetric, as compressed-tensors with zero points is refused for MoE models (arch.MOE_ASYMMETRIC_CT)
    extra = {"quant": {"bits": 4, "group_size": 64, "zero_point": False}} if family == "qwen2_moe" else {}
    result = run_quantization(tiny_spec(ckpt, **extra), tmp_path / "out", progress=events.append)

    assert set(result.artifacts) == {"awq", "compressed-tensors"}
    for fmt, folder in result.artifacts.items():
        assert folder == tmp_path / "out" / fmt
        for name in ("config.json", "model.safetensors", "manifest.json", "README.md", "quant_report.json"):
            assert (folder / name).is_file(), (fmt, name)
        assert json.loads((folder / "config.json").read_text())["quantization_config"]
    assert leftovers(tmp_path / "out") == ["awq", "compressed-tensors"]  # no staging folder left

    report = json.loads(result.report_path.read_text())
    m = report["metrics"]
    assert set(m["wall_time_s"]) == {"resolve", "calibrate", "quantize", "evaluate", "package"}
    assert m["peak_rss_bytes"] > 0 and m["size_after_bytes"] < m["size_before_bytes"]
    assert m["n_layers_quantized"] == len(report["layers"]) > 0
    assert all(
        {"mse_rtn", "mse_quant", "scale_ratio", "clip_ratio"} <= set(layer) for layer in report["layers"]
    )
    assert report["mappings"] and math.isfinite(m["fp_perplexity"])
    assert "token" not in json.dumps(report["settings"].get("publish") or {})

    # progress: monotonic, every block reported, ends at 1
    assert [e.progress for e in events] == sorted(e.progress for e in events) and events[-1].progress == 1.0
    assert max(e.block or 0 for e in events) == events[-1].n_blocks or any(
        e.block == e.n_blocks for e in events
    )

    if family in ("qwen2_moe",):
        # experts are written per expert, as vLLM and AutoAWQ read them; the router stays in full precision
        with safe_open(str(result.artifacts["awq"] / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert "model.layers.0.mlp.experts.3.down_proj.qweight" in names
        assert "model.layers.0.mlp.gate.weight" in names
    assert math.isfinite(m["quant_perplexity"])
    assert m["quant_perplexity"] < 1.2 * m["fp_perplexity"]
    for folder in result.artifacts.values():
        model = load_quantized(folder)
        ids = torch.randint(3, 512, (1, 16))
        assert torch.isfinite(model(ids).logits).all()


def test_shown_progress_never_moves_back():
    """A time-based fraction dips when its estimate grows (the quantized pass slower than the FP one);
    the bar holds its highest value, so a listener never sees progress go backwards."""
    from awqforge.pipeline import STAGES, _Job

    events: list[ProgressEvent] = []
    job = _Job(events.append, None, lambda _m: None)
    job.stage("evaluate", "evaluate")
    for fraction in (0.2, 0.5, 0.4, 0.45, 0.7, 1.0):
        job.report(fraction, "step")
    shown = [e.progress for e in events]
    lo, hi = STAGES["evaluate"]
    assert shown == sorted(shown) and shown[0] == lo and shown[-1] == hi
    assert shown[3] == shown[2] == lo + (hi - lo) * 0.5  # the dips are held at the highest value


def test_awq_beats_rtn(tiny_checkpoint, tmp_path):
    """Outlier channels (tiny_models) at 3 bits: AWQ's layer output error and perplexity are not worse than RTN's."""
    ckpt = tiny_checkpoint("llama")
    common = dict(quant={"bits": 3, "group_size": 64}, formats=["compressed-tensors"])
    awq = run_quantization(tiny_spec(ckpt, **common), tmp_path / "awq")
    rtn = run_quantization(tiny_spec(ckpt, method="rtn", **common), tmp_path / "rtn")
    # mse_rtn: plain RTN's output error on the same calibration inputs, measured in the AWQ run
    assert sum(m.mse_quant for m in awq.layers) < 0.9 * sum(m.mse_rtn for m in awq.layers)
    assert awq.metrics["quant_perplexity"] <= rtn.metrics["quant_perplexity"] * 1.01


def test_rtn_reads_no_calibration_data(tiny_checkpoint, tmp_path):
    """RTN with a calibration source that does not exist (and one that is too short) succeeds: it is never read."""
    ckpt = tiny_checkpoint("llama")
    for i, source in enumerate([f"file:{tmp_path / 'absent.jsonl'}", "hf:nobody/nothing"]):
        spec = tiny_spec(
            ckpt,
            method="rtn",
            calibration={"source": source, "n_samples": 4096, "seq_len": 8192},
            formats=["awq"],
            eval={"enabled": False},
        )
        result = run_quantization(spec, tmp_path / f"out{i}")
        report = json.loads(result.report_path.read_text())
        assert report["calibration"] is None and "calibrate" not in report["metrics"]["wall_time_s"]
        assert report["method"]["method"].startswith("RTN") and report["method"]["scale_search"] == "none"
        assert result.metrics["n_layers_quantized"] > 0
        card = (result.artifacts["awq"] / "README.md").read_text()
        assert "| calibration set | none |" in card
    # the same codes as the AWQ pipeline's rtn method computes from the weights
    from awqforge.quant import quantize_tensor

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight").float()
    model = load_quantized(result.artifacts["awq"])
    got = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, w.shape[1])
    expected = x @ quantize_tensor(w, 4, 64).dequantize().T
    assert torch.allclose(got(x).float(), expected, atol=1e-3, rtol=1e-3)


def test_short_calibration_per_sample_refine_and_evaluation_cost(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """32 paragraphs (less than 32 x 512 tokens): used as far as they go, with a warning and the real counts
    in the report and the metrics; refine_steps reaches the algorithm (0: AWQ as published); the evaluation
    reports progress steps with an ETA and its cost."""
    ckpt = tiny_checkpoint("llama")
    docs = [p.strip() for p in BUNDLED_CALIBRATION_TEXT.read_text().split("\n\n") if len(p.strip()) >= 200][
        :32
    ]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calibration = {"source": f"file:{data}", "n_samples": 40, "seq_len": 512, "packing": "per_sample"}
    events: list[ProgressEvent] = []
    logs: list[str] = []
    tagged: list[tuple[str | None, str]] = []
    published = run_quantization(
        tiny_spec(
            ckpt,
            calibration=calibration,
            refine_steps=0,
            formats=["awq"],
            eval={"seq_len": 64, "max_seqs": 3},
        ),
        tmp_path / "awq0",
        progress=events.append,
        log=lambda m: (logs.append(m), tagged.append((events[-1].stage if events else None, m))),
    )
    # a stage's first log line comes after the stage was reported: a listener tags it with that stage
    starts = {m.split()[0]: st for st, m in tagged if m.startswith(("quantizing", "evaluating", "writing"))}
    assert starts == {"quantizing": "quantize", "evaluating": "evaluate", "writing": "package"}, tagged
    report = json.loads(published.report_path.read_text())
    cal = report["calibration"]
    assert cal["packing"] == "per_sample" and cal["samples"] == 32 and cal["requested_samples"] == 40
    assert cal["shortfall"] and cal["tokens"] == published.metrics["calibration_tokens"] < 32 * 512
    assert published.metrics["calibration_samples"] == 32
    assert published.metrics["calibration_shortfall"] == cal["requested_tokens"] - cal["tokens"] > 0
    assert any(line.startswith("warning: ") and "32 texts" in line for line in logs)
    assert report["method"]["refine_steps"] == "off (AWQ as published)"
    assert report["settings"]["refine_steps"] == 0
    # the default k=8 with tiny_spec's n_grid=6 (7 candidates) screens nothing: the report says so
    assert report["settings"]["search_screen"] == 8 and report["method"]["search_screen"].startswith("off")
    card = (published.artifacts["awq"] / "README.md").read_text()
    assert "per_sample packing, 32 samples" in card and "off (AWQ as published)" in card
    # evaluation: bounded to max_seqs windows, progress steps with an ETA, cost in the report
    cost = report["evaluation"]["cost"]
    assert cost["windows"] == 3 and cost["tokens"] == 3 * 64 * 2 and cost["wall_s"] > 0
    assert published.metrics["eval_tokens"] == cost["tokens"]
    steps = [e for e in events if e.stage == "evaluate" and e.n_steps]
    # in windows, the FP pass (block by block) and the quantized one (window by window) each counting 3
    assert steps[-1].step == steps[-1].n_steps == 2 * 3 and steps[-1].eta_s == 0
    fp_steps = [e for e in steps if "FP pass" in e.message]
    assert fp_steps[-1].step == 3 and fp_steps[0].eta_s > 0  # the FP pass's end still has the quantized left
    assert [e.step for e in steps if "quantized pass" in e.message] == [4, 5, 6]
    # the quantize stage's ETA is the job's: after the last block the evaluation (the plan's model, at the rate
    # the blocks showed) is still to come
    blocks = [e for e in events if e.stage == "quantize" and e.block]
    assert blocks[-1].block == blocks[-1].n_blocks and blocks[-1].eta_s > 0
    refined = run_quantization(
        tiny_spec(ckpt, calibration=calibration, refine_steps=2, formats=["awq"], eval={"enabled": False}),
        tmp_path / "awq2",
    )
    assert sum(m.mse_quant for m in refined.layers) < sum(m.mse_quant for m in published.layers)
    assert json.loads(refined.report_path.read_text())["method"]["refine_steps"].startswith("2 refits")


def test_per_sample_padding_does_not_reach_the_weights(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """per_sample rows of different lengths, right-padded: the same job with another pad token (<pad> vs </s>,
    so other ids and activations in every padding position) writes the same quantized weights, bit for bit."""
    import copy
    import shutil

    from safetensors.torch import load_file

    ckpt = tiny_checkpoint("llama")
    other = tmp_path / "ckpt-eos-pad"
    shutil.copytree(ckpt, other)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = "</s>"
    tok.save_pretrained(other)
    paragraphs = [
        p.strip() for p in BUNDLED_CALIBRATION_TEXT.read_text().split("\n\n") if len(p.strip()) >= 300
    ]
    data = tmp_path / "texts.jsonl"  # 8 texts of 40 to 320 characters: rows of very different lengths
    data.write_text(
        "".join(json.dumps({"text": p[: 40 * (i + 1)]}) + "\n" for i, p in enumerate(paragraphs[:8]))
    )
    calibration = {"source": f"file:{data}", "n_samples": 8, "seq_len": 64, "packing": "per_sample"}
    tensors, reports = [], []
    for i, folder in enumerate((ckpt, other)):
        result = run_quantization(
            tiny_spec(folder, calibration=calibration, formats=["awq"], eval={"enabled": False}),
            tmp_path / f"o{i}",
        )
        tensors.append(load_file(str(result.artifacts["awq"] / "model.safetensors")))
        reports.append(json.loads(result.report_path.read_text()))
    assert (
        reports[0]["calibration"]["pad_tokens"] > 50
        and reports[0]["calibration"] == reports[1]["calibration"]
    )
    assert tensors[0].keys() == tensors[1].keys() and any(k.endswith(".qweight") for k in tensors[0])
    for name, t in tensors[0].items():
        assert torch.equal(t, tensors[1][name]), name


def test_bf16_checkpoint(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3", dtype=torch.bfloat16)
    spec = tiny_spec(ckpt, method="rtn", formats=["awq"], eval={"enabled": False})
    result = run_quantization(spec, tmp_path / "out")
    report = json.loads(result.report_path.read_text())
    assert report["source"]["dtype"] == "bfloat16" and report["environment"]["compute_dtype"] == "float32"
    with safe_open(str(result.artifacts["awq"] / "model.safetensors"), "pt") as f:
        assert (
            f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        )  # unquantized tensors keep their dtype


def test_cancel_removes_partial_output(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    blocks_done = []
    out = tmp_path / "out"

    def on_progress(event: ProgressEvent) -> None:
        if event.block:
            blocks_done.append(event.block)

    with pytest.raises(JobCancelled):
        run_quantization(
            tiny_spec(ckpt, method="rtn"), out, progress=on_progress, cancel=lambda: bool(blocks_done)
        )
    assert blocks_done == [1]  # stopped between blocks
    assert not out.exists()  # created by the job, removed with everything in it

    out.mkdir()
    (out / "mine.txt").write_text("kept")
    with pytest.raises(JobCancelled):
        run_quantization(tiny_spec(ckpt, method="rtn"), out, cancel=lambda: True)
    assert leftovers(out) == ["mine.txt"]


def test_bad_group_size_refused_up_front(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama", hidden_size=96, head_dim=24, intermediate_size=192)
    with pytest.raises(InputError) as info:
        run_quantization(tiny_spec(ckpt, quant={"group_size": 64}), tmp_path / "out")
    msg = str(info.value)
    assert "group size 64" in msg and "q_proj" in msg and "32" in msg
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_refused(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=512)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        run_quantization(tiny_spec(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_only_checkpoint_refused(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle"):
        run_quantization(tiny_spec(folder), tmp_path / "out")


def test_missing_model_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run_quantization(tiny_spec(tmp_path / "nope"), tmp_path / "out")


def test_nan_names_block_and_removes_output(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    folder = tmp_path / "nan"
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NumericalError, match="block 1"):
        run_quantization(tiny_spec(folder, method="rtn"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    spec = JobSpec(model=sys.argv[1], method="rtn", quant={{"group_size": 128}}, device="cpu", eval={{"enabled": False}},
                   calibration={{"source": {calib!r}, "n_samples": 4, "seq_len": 64}})
    print(json.dumps(run_quantization(spec, sys.argv[2], shard_size="4MB").metrics))
    """
)


def test_streaming_peak_rss_is_bounded(tmp_path, tiny_tokenizer):
    """Peak RSS grows far less than the checkpoint when the model gets 4x deeper (one block at a time).

    Each quantization runs in a fresh process (peak RSS is per process); the checkpoints are written here,
    so that building them does not count.
    """
    from tiny_models import build_tiny_model

    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT.format(calib=CALIB))
    procs = {}
    for layers in (2, 8):
        folder = tmp_path / f"m{layers}"
        build_tiny_model(
            "llama",
            hidden_size=512,
            intermediate_size=1536,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            num_hidden_layers=layers,
            outliers=False,
        ).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        procs[layers] = subprocess.Popen(
            [sys.executable, str(script), str(folder), str(tmp_path / f"o{layers}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    metrics = {}
    for layers, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        metrics[layers] = json.loads(out.strip().splitlines()[-1])
    model_growth = metrics[8]["size_before_bytes"] - metrics[2]["size_before_bytes"]  # ~80 MB of fp32 weights
    rss_growth = metrics[8]["peak_rss_bytes"] - metrics[2]["peak_rss_bytes"]
    assert rss_growth < 0.25 * model_growth, (rss_growth, model_growth)


@pytest.mark.parametrize("family", ["gemma3_text", "mixtral"])
def test_streamed_fp_perplexity_equals_in_memory(family, tiny_checkpoint, tiny_tokenizer):
    """Block-by-block from the shards (per-layer masks, rotary, fused experts) gives the full model's numbers."""
    from awqforge.arch import get_adapter
    from awqforge.calibration import read_text
    from awqforge.evaluate import load_fp_model, perplexity, streamed_perplexity
    from awqforge.resolve import resolve_model
    from awqforge.streaming import StreamingModel

    resolved = resolve_model(str(tiny_checkpoint(family)))
    stream = StreamingModel.from_resolved(resolved, get_adapter(resolved.config), device=torch.device("cpu"))
    text = read_text(None)
    streamed = streamed_perplexity(stream, tiny_tokenizer, text, seq_len=64, max_seqs=3, batch_size=2)
    full = perplexity(load_fp_model(resolved.path), tiny_tokenizer, text, seq_len=64, max_seqs=3)
    assert streamed["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert streamed["n_tokens"] == full["n_tokens"] == 3 * 63


def test_short_eval_text_refused_before_quantizing(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold one window.")
    spec = tiny_spec(tiny_checkpoint("llama"), eval={"text": f"file:{short}", "seq_len": 64})
    with pytest.raises(InputError, match="too short"):
        run_quantization(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
