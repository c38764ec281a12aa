"""What the API accepts and returns (never the table rows themselves)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class CalibrationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None,
        description="pileval | self | hf:<dataset>[:<split>[:<column>]]; or give upload_id",
        examples=["pileval"],
    )
    upload_id: str | None = Field(None, description="id returned by POST /v1/calibration-sets")
    n_samples: int = Field(128, description="calibration sequences")
    seq_len: int = Field(512, description="tokens per calibration sequence")


class EvalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    text: str | None = Field(
        None, description="hf:<dataset>[:<split>[:<column>]] or None for the built-in text"
    )
    seq_len: int = 2048
    max_seqs: int | None = None


class PublishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(..., examples=["my-org/SmolLM2-135M-Instruct-AWQ"])
    private: bool = True
    token: str | None = Field(
        None,
        description="Hub token: encrypted at rest, used once, never returned",
        json_schema_extra={"writeOnly": True},
    )


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
    """A quantization job. Checked against awqforge.spec.JobSpec before anything is queued."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    model: str = Field(..., description="Hugging Face model id (org/name) or an allowed local path")
    revision: str | None = None
    method: Literal["awq", "rtn"] = "awq"
    bits: int = Field(4, description="2 | 3 | 4 | 8 (format awq is 4-bit only)")
    group_size: int = Field(128, description="32 | 64 | 128 | -1")
    zero_point: bool = True
    modules_to_not_convert: list[str] = Field(default_factory=list)
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    formats: list[Literal["awq", "compressed-tensors"]] = Field(default_factory=lambda: ["awq"])
    eval: EvalIn = Field(default_factory=EvalIn)
    publish: PublishIn | None = None
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cpu routes the job to the cpu queue")
    # Advanced AWQ search settings (defaults are the engine's).
    scale_search: Literal["activation", "duo", "both"] | None = None
    n_grid: int | None = None
    clip_search: bool | None = None
    rounding: Literal["nearest", "gptq"] | None = None
    seed: int | None = None


class FieldError(BaseModel):
    field: str
    reason: str


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


class ArtifactFile(BaseModel):
    path: str
    size_bytes: int
    url: str


class ArtifactPublic(BaseModel):
    id: str
    format: str
    size_bytes: int
    published_to: str | None = None
    files: list[ArtifactFile] = Field(default_factory=list)


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class LayerMetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    block: int
    name: str
    mse_rtn: float | None = None
    mse_quant: float | None = None
    scale_ratio: float | None = None
    clip_ratio: float | None = None


class JobPublic(BaseModel):
    id: str
    status: JobStatusName
    stage: str | None = None
    progress: float = Field(..., ge=0.0, le=1.0)
    eta_s: float | None = None
    error: str | None = None
    model: str
    revision: str | None = None
    method: str
    bits: int
    group_size: int
    queue: str
    attempts: int
    spec: dict = Field(..., description="The validated job spec (publish token removed)")
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
