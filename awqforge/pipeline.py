"""run_quantization: the one code path from a JobSpec to published artifacts, for the CLI and the worker alike.

Stages: resolve (checkpoint folder, config, architecture and group-size checks, output folders), calibrate
(token blocks, capture of every decoder layer's inputs), quantize (block by block, streamed from the shards,
every requested format fed in the same pass), evaluate (perplexity of the FP and the quantized model), package
(report, model card, manifest, atomic rename). Peak memory is one block plus the calibration activations;
the FP model is evaluated block by block from its shards too. The exceptions: calibration source `self`
(generation needs the whole model) and the quantized evaluation, which loads the quantized model whole
(about a quarter of the FP size at 4 bits; eval.enabled=False skips it).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from awqforge.errors import InputError, JobCancelled
from awqforge.spec import JobStage

logger = logging.getLogger("awqforge")

# Where each engine stage (awqforge.spec.JobStage; publish is the service's) sits on the overall progress
# scale (start, end).
STAGES = {
    JobStage.RESOLVE.value: (0.0, 0.02),
    JobStage.CALIBRATE.value: (0.02, 0.10),
    JobStage.QUANTIZE.value: (0.10, 0.85),
    JobStage.EVALUATE.value: (0.85, 0.97),
    JobStage.PACKAGE.value: (0.97, 1.0),
}


@dataclass
class ProgressEvent:
    stage: str
    progress: float  # overall, 0..1
    message: str
    block: int | None = None  # blocks done so far (quantize stage)
    n_blocks: int | None = None
    # remaining seconds of the job: the current stage at the pace it has run (blocks, windows, tasks), then the
    # later stages by the plan's model at the rate the quantize stage's blocks showed
    eta_s: float | None = None
    # evaluate stage: work done in windows, each pass (FP, then quantized) counting every window once
    step: float | None = None
    n_steps: int | None = None


@dataclass
class QuantResult:
    artifacts: dict[str, Path]  # format -> final folder
    metrics: dict
    layers: list = field(default_factory=list)  # awq.LayerMetric
    report_path: Path | None = None  # the first format's quant_report.json
    source_revision: str | None = None  # the commit sha a hub model's revision resolved to
    # Why the artifacts missed the quality bar (task evaluation failed, or eval.gate not met); they are
    # written and kept all the same. None: passed (or nothing was asked).
    quality_failure: str | None = None


class _Job:
    """Progress, cancellation, logging and stage timing of one run."""

    def __init__(self, progress, cancel, log) -> None:
        self.progress_cb = progress
        self.cancel_cb = cancel
        self.log = log or logger.info
        self.wall: dict[str, float] = {}
        self._stage: str | None = None
        self._t0 = 0.0
        self._shown = 0.0  # the highest overall progress reported: a bar never moves back
        # seconds the stages after evaluate (lm-eval tasks) are expected to take: the plan's model at the rate
        # the quantize stage's blocks showed, added to the evaluate stage's ETA
        self.after_evaluate_s = 0.0

    def stage(self, name: str, message: str) -> None:
        self.end_stage()
        self.check_cancel()
        self._stage, self._t0 = name, time.perf_counter()
        self.report(0.0, message)  # first: a listener tags the log line below with the stage it was told
        self.log(message)

    def end_stage(self) -> None:
        if self._stage is not None and self._t0:
            self.wall[self._stage] = round(
                self.wall.get(self._stage, 0.0) + time.perf_counter() - self._t0, 3
            )
            self._t0 = 0.0

    def wall_so_far(self) -> dict[str, float]:
        """Wall time per stage, the running stage counted up to now."""
        wall = dict(self.wall)
        if self._stage is not None and self._t0:
            wall[self._stage] = round(wall.get(self._stage, 0.0) + time.perf_counter() - self._t0, 3)
        return wall

    def report(self, fraction: float, message: str, **extra) -> None:
        if self.progress_cb is None or self._stage is None:
            return
        lo, hi = STAGES[self._stage]
        # A time-based fraction (elapsed / (elapsed + ETA)) can dip when the estimate grows; what is shown
        # holds its highest value instead, while the event's eta_s stays the honest estimate.
        self._shown = max(self._shown, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
        self.progress_cb(ProgressEvent(self._stage, self._shown, message, **extra))

    def check_cancel(self) -> None:
        if self.cancel_cb is not None and self.cancel_cb():
            raise JobCancelled("the job was cancelled; partial output removed")


def run_quantization(
    spec,
    out_dir: str | Path,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
    shard_size: int | str | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    checkpoint_dir: str | Path | None = None,
    fp_task_cache=None,
) -> QuantResult:
    """Quantize `spec.model` into `out_dir/<format>/` for every format in `spec.formats` (see module docstring).

    `shard_size` (bytes or "500MB"): the bound on one safetensors file (default 5 GB, as the Hub's tools);
    the writers spool tensors to disk as they come, so it does not bound memory.
    `allowed_roots`: the folders every local path the spec names must lie in (None: anywhere, the CLI).
    `checkpoint_dir`: store each finished block there and resume from what an earlier, interrupted run
    of the same spec stored (awqforge/checkpoint.py); the caller removes it once the result is safe.
    `fp_task_cache`: where FP task scores are kept across runs (awqforge.tasks_eval.FPScoreCache's get/put).
    Raises InputError (bad request), HubUnavailable, UnsupportedArchitecture, NumericalError, JobCancelled;
    on any error nothing is left in out_dir that was not there before.
    """
    from transformers import AutoTokenizer

    from awqforge import report as reporting
    from awqforge.arch import (
        check_format_support,
        check_group_size,
        check_module_patterns,
        get_adapter,
        has_experts,
        refuse_nothing_to_quantize,
    )
    from awqforge.awq import BlockSettings
    from awqforge.calibration import build_calibration, read_text
    from awqforge.evaluate import eval_windows
    from awqforge.formats import DEFAULT_SHARD_SIZE, ArtifactWriter, ModelCardInfo
    from awqforge.multimodal import MultimodalModel
    from awqforge.resolve import resolve_model, resolve_spec_paths
    from awqforge.streaming import StreamingModel, pick_device

    job = _Job(progress, cancel, log)
    out_dir = Path(out_dir).expanduser().absolute()
    created_out_dir = not out_dir.exists()
    writers: list[ArtifactWriter] = []
    reporting.reset_peak_rss()
    torch.manual_seed(spec.seed)
    device = pick_device(spec.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        # -- resolve: everything that can fail cheaply fails here, before any heavy work
        job.stage("resolve", f"resolving {spec.model}")
        spec = resolve_spec_paths(spec, allowed_roots)
        resolved = resolve_model(
            spec.model, spec.revision, token=spec.source.token, allowed_roots=allowed_roots
        )
        adapter = get_adapter(resolved.config, mappings=spec.mappings)
        stream = StreamingModel.from_resolved(resolved, adapter, device=device)
        adapter = stream.adapter  # with the linears transformers' _init_weights reads kept (kept_for_init)
        mm = MultimodalModel.of(stream)  # None for text-only models
        refuse_nothing_to_quantize(stream.model, adapter)
        try:
            check_module_patterns(stream.model, adapter, spec.quant.modules_to_not_convert)
            check_group_size(stream.model, adapter, spec.quant.group_size, spec.quant.modules_to_not_convert)
            check_format_support(
                stream.model,
                adapter,
                spec.formats,
                spec.quant.zero_point,
                getattr(resolved.config, "model_type", ""),
            )
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        settings = BlockSettings.from_spec(spec)
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=False)
        eval_text = n_eval_windows = None
        if spec.eval.enabled:  # a missing or too short evaluation text fails now, not after the quantization
            eval_text = read_text(spec.eval.text)
            n_eval_windows = len(eval_windows(tokenizer, eval_text, spec.eval.seq_len, spec.eval.max_seqs))
        task_items = _resolve_eval_tasks(spec, allowed_roots)  # unknown tasks fail now, not after quantizing
        if shard_size is None:
            shard_size = DEFAULT_SHARD_SIZE
        for fmt in spec.formats:
            fmt = getattr(fmt, "value", fmt)
            writers.append(
                ArtifactWriter(
                    out_dir / fmt,
                    fmt,
                    source_dir=resolved.path,
                    settings=spec.quant,
                    shard_size=shard_size,
                    overwrite=overwrite,
                    unquantized_names=mm.unquantized_names if mm else stream.unquantized_names,
                )
            )
        job.log(
            f"{adapter.family}, {stream.n_blocks} blocks, checkpoint {_dt(stream.checkpoint_dtype)}, "
            f"computing in {_dt(stream.dtype)} on {device}"
        )

        # -- calibrate: token blocks, then every layer's inputs captured once (RTN reads no calibration data)
        cal = spec.calibration
        rtn = getattr(spec.method, "value", spec.method) == "rtn"
        calibration_info = None
        inputs = layer_kwargs = captured = token_mask = None
        if not rtn:
            job.stage(
                "calibrate",
                f"calibration: {cal.source}, {cal.n_samples} x {cal.seq_len} tokens ({cal.packing.value})",
            )
            calib = build_calibration(
                cal, tokenizer, resolved.path, device=device, dtype=stream.dtype, seed=spec.seed
            )
            calibration_info = calib.summary()
            if calib.warning:
                job.log(f"warning: {calib.warning}")
            stream.load_non_block()
            captured = stream.capture(calib.input_ids, calib.attention_mask)
            stream.unload_non_block()
            inputs, layer_kwargs, token_mask = captured.inputs, captured.layer_kwargs, captured.token_mask

        # -- quantize: one block at a time
        job.stage("quantize", f"quantizing {stream.n_blocks} blocks ({spec.method.value})")
        planned = _plan_seconds(
            resolved.path,
            spec,
            calib.n_samples if not rtn else spec.calibration.n_samples,
            n_eval_windows,
            device,
        )
        layers, mappings, skipped = [], {}, []
        checkpoints, first = None, 0
        if checkpoint_dir is not None and not rtn:  # RTN reruns faster than it would resume
            from awqforge.checkpoint import BlockCheckpoints, RecordingWriters, spec_fingerprint

            checkpoints = BlockCheckpoints(checkpoint_dir, spec_fingerprint(spec))
            first = checkpoints.start(stream.n_blocks)
            for i in range(first):  # the stored blocks feed the writers exactly as when they were made
                block_layers, block_mappings, block_skipped = checkpoints.replay_block(i, writers)
                layers.extend(block_layers)
                mappings.update(block_mappings)
                skipped.extend(block_skipped)
            if first:
                inputs = checkpoints.load_inputs(inputs.device).to(inputs.dtype)
                job.log(f"resuming at block {first}/{stream.n_blocks} from {checkpoint_dir}")
        started = time.perf_counter()
        for i in range(first, stream.n_blocks):
            job.check_cancel()
            sink = RecordingWriters(writers) if checkpoints else writers
            new_mappings, n_skipped = dict(mappings), len(skipped)
            if rtn:
                block_layers = _rtn_one_block(stream, i, settings, adapter, sink)
            else:
                inputs, block_layers = _quantize_one_block(
                    stream,
                    i,
                    inputs,
                    layer_kwargs[i],
                    settings,
                    adapter,
                    sink,
                    new_mappings,
                    skipped,
                    token_mask,
                )
            if checkpoints:
                added = {k: v for k, v in new_mappings.items() if k not in mappings}
                checkpoints.save_block(i, sink, block_layers, added, skipped[n_skipped:])
                checkpoints.save_inputs(i + 1, inputs)
            mappings = new_mappings
            layers.extend(block_layers)
            done = i + 1
            per_block = (time.perf_counter() - started) / (done - first)
            eta = per_block * (stream.n_blocks - done)
            if planned and planned.get("quantize"):  # the plan's later stages at the rate these blocks show
                scale = per_block / (planned["quantize"] / stream.n_blocks)
                eta += scale * sum(v for k, v in planned.items() if k not in ("calibrate", "quantize"))
                job.after_evaluate_s = scale * planned.get("evaluate_tasks", 0.0)
            job.report(
                done / stream.n_blocks,
                f"block {done}/{stream.n_blocks}",
                block=done,
                n_blocks=stream.n_blocks,
                eta_s=eta,
            )
        del inputs, layer_kwargs, captured, token_mask
        job.check_cancel()
        for name, tensor in stream.non_block_checkpoint_tensors():
            for w in writers:  # a multimodal model's towers: in the dtype they are stored in
                w.add_tensor(name, tensor, keep_dtype=bool(mm and mm.is_tower_tensor(name)))
        for w in writers:
            w.finish_tensors()

        # -- evaluate
        eval_info = None
        metrics: dict = {"fp_perplexity": None, "quant_perplexity": None}
        if calibration_info is not None:
            metrics["calibration_samples"] = calibration_info["samples"]
            metrics["calibration_tokens"] = calibration_info["tokens"]
            metrics["calibration_shortfall"] = max(
                0, calibration_info["requested_tokens"] - calibration_info["tokens"]
            )
        if spec.eval.enabled:
            job.stage("evaluate", "evaluating perplexity (FP and quantized)")
            eval_info = _evaluate(
                spec, eval_text, resolved, adapter, writers[0], tokenizer, device, stream.dtype, job
            )
            metrics["fp_perplexity"] = eval_info["fp"]["perplexity"]
            metrics["quant_perplexity"] = (eval_info.get("quantized") or {}).get("perplexity")
            metrics["eval_tokens"] = eval_info["cost"]["tokens"]

        quality_failure = None
        if task_items or spec.eval.prompts:
            job.stage("evaluate", f"evaluating {len(task_items)} task(s) with lm-evaluation-harness")
            eval_info = eval_info if eval_info is not None else {}
            quality_failure = _evaluate_tasks(
                spec,
                task_items,
                resolved,
                writers[0],
                tokenizer,
                device,
                stream.dtype,
                job,
                eval_info,
                fp_task_cache,
                metrics,
            )
        if spec.eval.gate is not None and quality_failure is None:
            eval_info = eval_info if eval_info is not None else {}
            quality_failure = _check_gate(spec, eval_info, metrics, job)

        # -- package
        job.stage("package", "writing report, model card and manifest")
        sizes = {w.fmt: _weights_size(w.staging_dir) for w in writers}
        metrics.update(
            wall_time_s=job.wall_so_far(),  # in the report: package counted until the report is written
            peak_rss_bytes=reporting.peak_rss_bytes(),
            peak_gpu_bytes=reporting.peak_gpu_bytes(device),
            size_before_bytes=resolved.size_bytes,
            size_after_bytes=sizes[writers[0].fmt],
            size_after_bytes_by_format=sizes,
            n_layers_quantized=len(layers),
        )
        final_dirs = {w.fmt: w.final_dir for w in writers}
        report = reporting.build_report(
            spec=spec,
            resolved_path=resolved.path,
            revision=resolved.revision,
            device=device,
            compute_dtype=stream.dtype,
            checkpoint_dtype=stream.checkpoint_dtype,
            metrics=metrics,
            layers=layers,
            mappings=mappings,
            skipped=skipped,
            artifacts=final_dirs,
            eval_info=eval_info,
            calibration=calibration_info,
        )
        card = ModelCardInfo.from_spec(
            spec, metrics={k: v for k, v in metrics.items() if not isinstance(v, dict)}
        )
        card.quantized_experts = has_experts(stream.model, adapter)
        if mm:  # what was quantized, what was kept, how it was calibrated (report and card)
            report["multimodal"] = mm.report()
            mm.describe(card)
        note = _cpu_kernel_note(device, eval_info)
        if note:
            report["environment"]["cpu_kernel"] = note
            if note.startswith("reference"):  # the perplexity was measured on the slow path: said on the card
                card.extra_settings["cpu_kernel"] = note
        card.base_model_revision = resolved.revision or spec.revision  # the commit sha for a hub model
        if eval_info:
            card.tasks = eval_info.get("tasks") or []
            card.generations = eval_info.get("generations") or []
            card.quality_failure = quality_failure
        for w in writers:
            reporting.write_report(w.staging_dir, report)
            w.finalize(card)
        job.end_stage()
        metrics["wall_time_s"] = dict(job.wall)
        job.report(1.0, "done")
        job.log(f"artifacts: {', '.join(str(p) for p in final_dirs.values())}")
        return QuantResult(
            artifacts=final_dirs,
            metrics=metrics,
            layers=layers,
            report_path=final_dirs[writers[0].fmt] / reporting.REPORT_NAME,
            source_revision=resolved.revision,
            quality_failure=quality_failure,
        )
    except BaseException:
        for w in writers:
            w.abort()
        if created_out_dir and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _quantize_one_block(
    stream, i, inputs, layer_kwargs, settings, adapter, writers, mappings, skipped, token_mask=None
):
    """Load block i, quantize it, feed the writers, free it. Returns (next block's inputs, layer metrics).
    token_mask: the calibration rows' real tokens (per_sample padding), None when all are real."""
    from awqforge.awq import quantize_block

    prefix = stream.block_prefix(i)
    block = stream.load_block(i)
    result = quantize_block(
        block,
        inputs,
        layer_kwargs,
        settings=settings,
        adapter=adapter,
        block_index=i,
        block_prefix=prefix,
        token_mask=token_mask,
    )
    exclude = set()
    for rel, qt in result.quantized.items():
        linear = block.get_submodule(rel)
        bias = None if linear.bias is None else linear.bias.detach().to(stream.checkpoint_dtype)
        name = adapter.checkpoint_name(f"{prefix}.{rel}")
        for w in writers:
            w.add_quantized(name, qt, bias)
        exclude.update({f"{rel}.weight", f"{rel}.bias"})
    for name, tensor in stream.block_tensors_for_checkpoint(i, exclude).items():
        for w in writers:
            w.add_tensor(name, tensor)
    for map_name, info in result.scales.items():
        mappings[f"{prefix}.{map_name}"] = info  # the scale vector is summarised (min/max/mean) in the report
    skipped.extend(f"{prefix}: {s}" for s in result.skipped)
    outputs, layer_metrics = result.outputs, result.layers
    del result, block
    stream.free_block(i)
    return outputs, layer_metrics


def _rtn_one_block(stream, i, settings, adapter, writers) -> list:
    """Round-to-nearest for block i from its weights alone (no calibration data): codes as quantize_block's rtn
    method computes them; no output error is measured (the metrics are NaN, null in the report)."""
    from awqforge.awq import LayerMetric, NumericalError
    from awqforge.quant import quantize_tensor

    prefix = stream.block_prefix(i)
    block = stream.load_block(i)
    exclude, metrics = set(), []
    for rel, linear in adapter.quantizable_linears(block, settings.skip_patterns, prefix).items():
        w = linear.weight.detach().float()
        if not torch.isfinite(w).all():
            raise NumericalError(f"block {i} ({prefix}), layer {rel}: the weight has NaN/inf values")
        qt = quantize_tensor(w, settings.bits, settings.group_size, settings.zero_point)
        bias = None if linear.bias is None else linear.bias.detach().to(stream.checkpoint_dtype)
        name = adapter.checkpoint_name(f"{prefix}.{rel}")
        for w in writers:
            w.add_quantized(name, qt, bias)
        exclude.update({f"{rel}.weight", f"{rel}.bias"})
        metrics.append(LayerMetric(rel, i, math.nan, math.nan, None, None))
    for name, tensor in stream.block_tensors_for_checkpoint(i, exclude).items():
        for w in writers:
            w.add_tensor(name, tensor)
    del block
    stream.free_block(i)
    return metrics


def _cpu_kernel_note(device, eval_info: dict | None) -> str | None:
    """On the CPU: which path 4-bit layers take (doctor's line); 'reference ...' when the evaluation ran
    through the pure-torch reference."""
    if device.type != "cpu":
        return None
    from awqforge.kernels.doctor import cpu_report
    from awqforge.qlinear import cpu_reference_reason

    why = cpu_reference_reason()
    if eval_info and why:
        return f"reference (pure torch, slow): the quantized evaluation ran without the CPU kernel: {why}"
    return cpu_report()["path"]


def _plan_seconds(model_dir, spec, n_samples: int, n_windows: int | None, device) -> dict[str, float] | None:
    """The plan's work per stage for this job as it runs (its calibration rows and evaluation windows), as
    seconds at 1 FLOP/s: the job turns it into seconds at the rate its own blocks show. None where the config
    cannot be planned (the ETA then covers the quantize stage only)."""
    import dataclasses

    from awqforge.plan import JobSettings, plan, read_config

    try:
        settings = dataclasses.replace(JobSettings.from_spec(spec), n_samples=n_samples)
        if n_windows is not None:
            settings = dataclasses.replace(settings, eval_max_seqs=n_windows)
        kind = "cuda" if str(device).startswith("cuda") else "cpu"
        return plan(read_config(model_dir), settings, device=kind, flops_rate=1.0).est_seconds_by_stage
    except Exception as exc:  # noqa: BLE001  an estimate never fails the job: an unplannable config, no ETA
        logger.debug("no plan for the ETA: %s", exc)
        return None


def _evaluate(spec, text: str, resolved, adapter, writer, tokenizer, device, dtype, job: _Job) -> dict:
    """FP perplexity (the source checkpoint streamed block by block) and quantized perplexity (load_quantized
    on the first format's staging folder, i.e. our QuantLinear kernels). Progress (with ETA) counts the FP
    blocks, then the quantized windows; the cost (time, tokens) is in the result."""
    from awqforge.evaluate import (
        REFERENCE_SLOWDOWN,
        PassTimer,
        eval_windows,
        perplexity,
        quantized_path,
        streamed_perplexity,
    )
    from awqforge.loading import load_quantized
    from awqforge.streaming import StreamingModel

    ev = spec.eval
    info: dict = {
        "text": ev.text or "built-in English text (awqforge/data/eval_en.txt)",
        "format": writer.fmt,
        "max_seqs": ev.max_seqs,
    }
    fp_stream = StreamingModel.from_resolved(resolved, adapter, device=device, dtype=dtype)
    n_windows = len(eval_windows(tokenizer, text, ev.seq_len, ev.max_seqs))
    kernel, reference = quantized_path(writer.bits, device)
    # Each pass timed on its own: the FP pass steps over blocks (all windows at once), the quantized one over
    # windows, at its own cost per window (the reference path is slower than the FP model on a CPU).
    timer = PassTimer(
        n_windows,
        {"FP": (fp_stream.n_blocks, 1.0), "quantized": (n_windows, REFERENCE_SLOWDOWN if reference else 1.0)},
    )
    started = time.perf_counter()

    def step(name: str, done: int) -> None:
        timer.step(name, done)
        eta = timer.eta_s()
        elapsed = time.perf_counter() - started
        steps = timer.passes[name][0]
        unit = "block" if name == "FP" else "window"
        job.report(
            elapsed / (elapsed + eta) if eta is not None else 0.0,
            f"evaluate: {name} pass, {unit} {done}/{steps}",
            step=timer.windows_done(),
            n_steps=2 * n_windows,
            eta_s=None if eta is None else eta + job.after_evaluate_s,
        )

    timer.start("FP")
    info["fp"] = streamed_perplexity(
        fp_stream,
        tokenizer,
        text,
        seq_len=ev.seq_len,
        max_seqs=ev.max_seqs,
        progress=lambda d, _t: step("FP", d),
    )
    fp_s = time.perf_counter() - started
    del fp_stream
    job.log(f"FP perplexity {info['fp']['perplexity']:.3f}")
    job.check_cancel()
    if reference:
        guess = timer.per_window("FP") * REFERENCE_SLOWDOWN * n_windows
        job.log(
            f"the quantized pass runs QuantLinear's {kernel.removeprefix('the ')} on {device.type}: "
            f"about {REFERENCE_SLOWDOWN}x the FP pass per window, an estimated {guess:.0f} s for {n_windows} windows"
        )
    # The artifact must load through our own loader: a failure here fails the job rather than shipping an
    # artifact nobody has run.
    qmodel = load_quantized(writer.staging_dir, device=device, dtype=dtype)
    timer.start("quantized")
    info["quantized"] = perplexity(
        qmodel,
        tokenizer,
        text,
        seq_len=ev.seq_len,
        max_seqs=ev.max_seqs,
        progress=lambda d, _t: step("quantized", d),
    )
    info["kernel"] = kernel
    del qmodel
    total_s = time.perf_counter() - started
    info["cost"] = {
        "wall_s": round(total_s, 3),
        "fp_s": round(fp_s, 3),
        "quantized_s": round(total_s - fp_s, 3),
        "windows": n_windows,
        "tokens": n_windows * info["fp"]["seq_len"] * 2,  # each window runs through both models
        "fp_s_per_window": round(fp_s / n_windows, 3),
        "quantized_s_per_window": round((total_s - fp_s) / n_windows, 3),
    }
    job.log(f"quantized perplexity {info['quantized']['perplexity']:.3f}")
    return info


def _resolve_eval_tasks(spec, allowed_roots) -> list:
    """eval.tasks resolved to lm-eval task configs; a task path must lie under the allowed roots."""
    tasks = list(spec.eval.tasks or [])
    if not tasks:
        return []
    from awqforge.resolve import resolve_local_path
    from awqforge.tasks_eval import TaskRequest, is_task_path, lm_eval_available, resolve_tasks

    if not lm_eval_available():
        raise InputError("eval.tasks needs lm-evaluation-harness: pip install 'awqforge[eval]'")
    requests = []
    for i, t in enumerate(tasks):
        req = TaskRequest.of(t)
        if is_task_path(req.name):
            req.name = str(resolve_local_path(req.name, allowed_roots, what=f"eval.tasks.{i}.name"))
        requests.append(req)
    return resolve_tasks(requests)


def _model_key(resolved) -> str:
    """What identifies the source weights for the FP score cache: the hub commit, or a local folder's
    weight files (names, sizes, modification times)."""
    if resolved.revision:
        return f"rev:{resolved.revision}"
    import hashlib

    h = hashlib.sha256(str(resolved.path).encode())
    for f in resolved.weight_files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"local:{h.hexdigest()}"


def _evaluate_tasks(
    spec, items, resolved, writer, tokenizer, device, dtype, job: _Job, info: dict, fp_cache, metrics: dict
) -> str | None:
    """lm-eval tasks and side-by-side generations on the FP model (loaded whole) and the quantized one
    (our loader, as for perplexity); results into `info` (the report's `evaluation`). Returns why the job
    misses its quality bar (a task that could not run, or eval.gate), None when it passes."""
    from awqforge.evaluate import load_fp_model
    from awqforge.loading import load_quantized
    from awqforge.tasks_eval import TaskEvalError, evaluate_models

    started = time.perf_counter()

    def progress(label: str, done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total - done) if done else None
        job.report(
            done / max(total, 1), f"tasks: {label} ({done}/{total})", step=done, n_steps=total, eta_s=eta
        )

    try:
        result = evaluate_models(
            lambda: load_fp_model(resolved.path, device=device, dtype=dtype),
            lambda: load_quantized(writer.staging_dir, device=device, dtype=dtype),
            tokenizer,
            items,
            prompts=spec.eval.prompts,
            max_new_tokens=spec.eval.max_new_tokens,
            fp_cache=fp_cache,
            model_key=_model_key(resolved),
            cancel=job.cancel_cb,
            progress=progress,
            log=job.log,
        )
    except TaskEvalError as exc:  # the artifacts are good: they are kept, the job says why it failed
        info["tasks_error"] = str(exc)
        job.log(f"task evaluation failed: {exc}")
        return f"task evaluation failed: {exc}"
    info.update(
        tasks=result["tasks"],
        generations=result["generations"],
        fp_cache_used=result["fp_cache_used"],
        tasks_cost=result["cost"],
    )
    metrics["tasks_eval_s"] = result["cost"]["wall_s"]
    return None


def _check_gate(spec, info: dict, metrics: dict, job: _Job) -> str | None:
    """eval.gate against the task recoveries and the perplexities; the verdict goes into the report."""
    from awqforge.tasks_eval import check_gate

    reasons = check_gate(
        spec.eval.gate, info.get("tasks") or [], metrics.get("fp_perplexity"), metrics.get("quant_perplexity")
    )
    info["gate"] = {"settings": spec.eval.gate.model_dump(), "passed": not reasons, "reasons": reasons}
    if not reasons:
        return None
    job.log("quality gate not met: " + "; ".join(reasons))
    return "quality gate not met: " + "; ".join(reasons)


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
