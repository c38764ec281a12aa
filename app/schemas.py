"""What the API accepts and returns (never the table rows themselves)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from awqforge import spec  # pure pydantic: no torch
from awqforge.parsing import ID_PATTERN

JobStatusName = Literal[spec.JOB_STATUSES]  # type: ignore[valid-type]
UploadId = Annotated[str, Field(max_length=64, pattern=ID_PATTERN)]


def _default(model: type[BaseModel], name: str):
    """The engine's default for one of its fields (the API's flat body keeps it, declared once)."""
    return model.model_fields[name].default


class CalibrationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: spec.CalibrationSource | None = Field(
        None,
        description="pileval | self | hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]]; or give upload_id",
    )
    upload_id: UploadId | None = Field(None, description="id returned by POST /v1/calibration-sets")
    n_samples: spec.NSamples = _default(spec.CalibrationSpec, "n_samples")
    seq_len: spec.CalibrationSeqLen = _default(spec.CalibrationSpec, "seq_len")
    packing: spec.Packing = Field(
        _default(spec.CalibrationSpec, "packing"),
        description=spec.CalibrationSpec.model_fields["packing"].description,
    )


# The evaluation and publish settings are the engine's own models.
EvalIn = spec.EvalSpec
PublishIn = spec.PublishSpec

JOB_EXAMPLE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "method": "awq",
    "bits": 4,
    "group_size": 64,
    "zero_point": True,
    "calibration": {"source": "pileval", "n_samples": 64, "seq_len": 512},
    "formats": ["awq"],
    "eval": {"seq_len": 1024},
}


class JobCreate(BaseModel):
    """A quantization job: the engine's JobSpec, flatter (quant settings at the top, uploads by id).

    Every field's type and limits come from awqforge.spec; the whole body is checked against JobSpec
    before anything is queued."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    model: spec.ModelRef
    revision: spec.Revision | None = Field(
        None, description="branch, tag or commit; resolved to a commit sha (default main)"
    )
    source: spec.SourceSpec = Field(
        default_factory=spec.SourceSpec, description="hub access for the source model"
    )
    method: spec.Method = _default(spec.JobSpec, "method")
    bits: spec.Bits = _default(spec.QuantSettings, "bits")
    group_size: spec.GroupSize = _default(spec.QuantSettings, "group_size")
    zero_point: bool = _default(spec.QuantSettings, "zero_point")
    modules_to_not_convert: spec.ModulePatterns = Field(default_factory=list)
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    formats: list[spec.ArtifactFormat] = Field(
        default_factory=spec.JobSpec.model_fields["formats"].default_factory,
        min_length=1,
        max_length=spec.JobSpec.model_fields["formats"].metadata[0].max_length,
    )
    eval: EvalIn = Field(default_factory=EvalIn)
    publish: PublishIn | None = None
    device: spec.Device = Field(
        _default(spec.JobSpec, "device"), description="cpu routes the job to the cpu queue"
    )
    # Advanced AWQ search settings (None: the engine's defaults).
    scale_search: spec.ScaleSearch | None = None
    n_grid: spec.NGrid | None = None
    clip_search: bool | None = None
    refine_steps: spec.RefineSteps | None = None
    search_screen: spec.SearchScreen | None = None
    rounding: spec.Rounding | None = Field(None, description=spec.RoundingDescription)
    gqa_fold: bool | None = Field(None, description=spec.JobSpec.model_fields["gqa_fold"].description)
    seed: spec.Seed | None = None
    mappings: list[spec.MappingSpecIn] | None = Field(
        None, max_length=64, description=spec.JobSpec.model_fields["mappings"].description
    )


class FieldError(BaseModel):
    field: str = Field(..., description="the field (dotted path), header or query parameter at fault")
    reason: str = Field(..., description="why it was refused (the value shown at most 80 characters)")


class ErrorResponse(BaseModel):
    detail: str | list[FieldError]


class MetricsPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    fp_perplexity: float | None = None
    quant_perplexity: float | None = None
    resolve_s: float | None = None
    calibrate_s: float | None = None
    quantize_s: float | None = None
    evaluate_s: float | None = None
    package_s: float | None = None
    publish_s: float | None = None
    total_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    size_before_bytes: int | None = None
    size_after_bytes: int | None = None
    n_layers_quantized: int | None = None
    calibration_samples: int | None = Field(None, description="calibration sequences actually used")
    calibration_tokens: int | None = Field(None, description="calibration tokens actually used")
    calibration_shortfall: int | None = Field(
        None, description="tokens asked for (n_samples x seq_len) that the source could not fill"
    )
    eval_tokens: int | None = Field(None, description="tokens scored by the evaluation")


class ArtifactFile(BaseModel):
    path: str
    size_bytes: int
    sha256: str | None = Field(
        None, description="as recorded by the run (null for artifacts made before it was)"
    )
    url: str
    download_url: str | None = Field(
        None, description="presigned object-store URL (ARTIFACT_STORE=s3): download without the API"
    )


class ArtifactPublic(BaseModel):
    id: str
    format: str
    size_bytes: int
    published_to: str | None = None
    commit_url: str | None = Field(None, description="the hub commit that published this artifact")
    hub_revision: str | None = Field(None, description="that commit's sha (or the local hub's revision)")
    files: list[ArtifactFile] = Field(default_factory=list)


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class LayerMetricPublic(BaseModel):
    """One quantized linear's metrics: the engine's LayerMetric (awqforge.awq.settings) and the
    layer_metrics table hold these same fields (tests/test_declared.py checks it); /layers and /metrics
    both answer with it."""

    model_config = ConfigDict(from_attributes=True)

    block: int
    name: str
    mse_rtn: float | None = Field(None, description="output MSE under plain RTN (null for method rtn)")
    mse_quant: float | None = Field(None, description="output MSE under the job's method")
    scale_ratio: float | None = Field(
        None, description="the AWQ grid exponent a chosen for the layer's input (scales = mean|x|^a)"
    )
    clip_ratio: float | None = Field(None, description="mean chosen clip ratio over the groups")


class JobPublic(BaseModel):
    id: str
    status: JobStatusName
    stage: str | None = None
    progress: float = Field(..., ge=0.0, le=1.0)
    eta_s: float | None = None
    error: str | None = None
    model: str
    revision: str | None = None
    source_sha: str | None = Field(None, description="the commit sha the source revision resolved to")
    method: str
    bits: int
    group_size: int
    queue: str
    waiting_reason: str | None = Field(None, description="why a queued job cannot start now (no live worker)")
    attempts: int
    spec: dict = Field(..., description="The validated job spec (tokens removed)")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    metrics: MetricsPublic | None = None
    artifacts: list[ArtifactPublic] = Field(default_factory=list)


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class JobLayersPublic(BaseModel):
    data: list[LayerMetricPublic]
    count: int


class CalibrationSetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str
    size_bytes: int
    n_records: int
    sha256: str
    created_at: datetime


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class DurationStats(BaseModel):
    n: int
    median_s: float | None = None
    p95_s: float | None = None


class PerplexityChange(BaseModel):
    n: int
    pct: list[float] = Field(default_factory=list, description="FP -> quantized change per job, % (sorted)")
    median_pct: float | None = None
    p95_pct: float | None = None


class RecoveryStats(BaseModel):
    n: int
    median: float | None = None
    p05: float | None = Field(None, description="the 5th percentile: the worst recoveries")
    min: float | None = None


class TaskRecovery(BaseModel):
    """lm-eval task recovery (quantized / FP) across this tenant's jobs."""

    n: int
    recovery: list[float] = Field(default_factory=list, description="every job-task recovery (sorted)")
    median: float | None = None
    p05: float | None = None
    by_task: dict[str, RecoveryStats] = Field(default_factory=dict)


class TaskMetricPublic(BaseModel):
    task: str
    metric: str
    fp: float | None = None
    quantized: float | None = None
    stderr: float | None = Field(None, description="the quantized score's standard error")
    fp_stderr: float | None = None
    recovery: float | None = Field(None, description="quantized / FP (FP / quantized where lower is better)")
    n_samples: int | None = None
    fp_cached: bool = Field(False, description="the FP score came from an earlier job's")
    fp_s: float | None = None
    quantized_s: float | None = None
    tokens: int | None = None


class MetricsSummary(BaseModel):
    since: datetime
    jobs_by_status: dict[str, int]
    queue_depth: dict[str, dict[str, int]] = Field(
        description="per queue: this tenant's queued and running jobs"
    )
    stage_durations: dict[str, DurationStats]
    duration_by_size_class: dict[str, DurationStats] = Field(
        description="total job time by FP checkpoint size: <1GiB, 1-4GiB, 4-16GiB, 16-64GiB, >64GiB"
    )
    perplexity_change: PerplexityChange
    bytes_saved: int
    gpu_hours: float
    cpu_hours: float
    task_recovery: TaskRecovery = Field(default_factory=lambda: TaskRecovery(n=0))


class JobMetricsDetail(BaseModel):
    job_id: str
    status: JobStatusName
    stage_timings_s: dict[str, float]
    total_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    fp_perplexity: float | None = None
    quant_perplexity: float | None = None
    size_before_bytes: int | None = None
    size_after_bytes: int | None = None
    layers: list[LayerMetricPublic]
    tasks: list[TaskMetricPublic] = Field(
        default_factory=list, description="lm-eval task results (eval.tasks)"
    )
