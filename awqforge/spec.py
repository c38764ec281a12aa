"""The job specification shared by the CLI, the API's validation and the worker.

Pure Python (pydantic only): the API process imports this without importing torch.
Everything that can be checked before any model is loaded is checked here.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)

# A hub id: "name" or "owner/name", the characters the Hugging Face Hub allows.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CALIB_SOURCE = re.compile(r"^(pileval|self|hf:[^\s:]+(:[^\s:]+(:[^\s:]+)?)?|file:.+|upload:[A-Za-z0-9_-]+)$")


class Method(str, Enum):
    AWQ = "awq"
    RTN = "rtn"


class ArtifactFormat(str, Enum):
    AWQ = "awq"
    COMPRESSED_TENSORS = "compressed-tensors"


class Rounding(str, Enum):
    """How codes are rounded once scales and zeros are fixed: to nearest, or with error feedback (GPTQ)."""

    NEAREST = "nearest"
    GPTQ = "gptq"


class ScaleSearch(str, Enum):
    """How the AWQ scale grid is formed: activation mean only, duo (AutoAWQ), or both (llm-compressor)."""

    ACTIVATION = "activation"
    DUO = "duo"
    BOTH = "both"


def validate_model_ref(value: str) -> str:
    """A model reference is a hub id ("org/name") or a local path (absolute, ./ or ~)."""
    v = value.strip()
    if not v:
        raise ValueError("model must not be empty")
    if v.startswith(("/", "./", "../", "~")):
        return v
    if "\\" in v or ".." in v or v.endswith((".", "-")) or not _HUB_ID.match(v):
        raise ValueError(
            f"{value!r} is not a valid Hugging Face model id: use 'org/name' "
            "(letters, digits, '.', '_' and '-') or a local path"
        )
    return v


class QuantSettings(BaseModel):
    """Bit width, grouping and what stays in full precision."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="Weight bit width", examples=[4])
    group_size: int = Field(
        128, description="Input channels per quantization group; -1 = one group per output channel"
    )
    zero_point: bool = Field(True, description="Asymmetric with a zero point (True) or symmetric (False)")
    modules_to_not_convert: list[str] = Field(
        default_factory=list,
        description="Extra module name patterns (fnmatch or substring) left in full precision; lm_head and MoE routers always are",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)}, got {v}")
        return v


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "pileval",
        description="pileval | self | hf:<dataset>[:<split>[:<column>]] | file:<path> | upload:<id>",
        examples=["pileval"],
    )
    n_samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=8192)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not _CALIB_SOURCE.match(v):
            raise ValueError(
                f"calibration source {v!r} is not understood: use pileval, self, "
                "hf:<dataset>[:<split>[:<column>]], file:<path> or upload:<id>"
            )
        return v


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    text: str | None = Field(
        None,
        description="Evaluation text source: file:<path>, hf:<dataset>[:<split>[:<column>]], or None for the built-in text",
    )
    seq_len: int = Field(2048, ge=16, le=32768)
    max_seqs: int | None = Field(None, ge=1)


# Hub tokens: long enough for any Hugging Face token, short enough to refuse a pasted file.
MAX_TOKEN_CHARS = 512


def hub_token_field(purpose: str):
    """A per-job hub token: its limits, and what the service does with it."""
    return Field(
        None,
        min_length=1,
        max_length=MAX_TOKEN_CHARS,
        description=f"{purpose}; encrypted at rest, deleted when the job ends, never returned",
        json_schema_extra={"writeOnly": True},
    )


def hub_namespace(repo_id: str) -> str:
    """The `owner` of an `owner/name` repo id."""
    return repo_id.split("/", 1)[0]


class SourceSpec(BaseModel):
    """How the source model is read from the hub."""

    model_config = ConfigDict(extra="forbid")

    token: str | None = hub_token_field("Hub read token for private or gated source models")


class PublishSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    private: bool = True
    token: str | None = hub_token_field("Hub write token")

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str) -> str:
        v = v.strip()
        if "/" not in v or v.startswith(("/", "./", "../", "~")):
            raise ValueError("publish.repo_id must be a hub repo id 'owner/name', not a path")
        return validate_model_ref(v)


class JobSpec(BaseModel):
    """One quantization job, as the CLI, the API and the worker all see it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ...,
        description="Hugging Face model id or local checkpoint path",
        examples=["HuggingFaceTB/SmolLM2-135M-Instruct"],
    )
    revision: str | None = Field(
        None, max_length=200, description="Hub revision (branch, tag or commit); default main"
    )
    source: SourceSpec = Field(default_factory=SourceSpec)
    method: Method = Method.AWQ
    quant: QuantSettings = Field(default_factory=QuantSettings)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    formats: list[ArtifactFormat] = Field(default_factory=lambda: [ArtifactFormat.AWQ])
    eval: EvalSpec = Field(default_factory=EvalSpec)
    publish: PublishSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scale_search: ScaleSearch = ScaleSearch.DUO
    n_grid: int = Field(20, ge=2, le=100)
    clip_search: bool = True
    rounding: Rounding = Field(
        Rounding.NEAREST,
        description="nearest (AWQ as published) or gptq: after the AWQ scale and clip search, round the codes "
        "with error feedback through the inverse input Gram matrix; same artifact format",
    )
    seed: int = 0

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return validate_model_ref(v)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[ArtifactFormat]) -> list[ArtifactFormat]:
        if not v:
            raise ValueError("formats must name at least one artifact format")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _formats_against_bits(self) -> JobSpec:
        if ArtifactFormat.AWQ in self.formats and self.quant.bits != 4:
            raise ValueError(
                f"format 'awq' is 4-bit only (the AutoAWQ/vLLM gemm layout); bits={self.quant.bits} "
                "needs format 'compressed-tensors'"
            )
        return self
