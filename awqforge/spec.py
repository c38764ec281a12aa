"""The job specification shared by the CLI, the API's validation and the worker.

Pure Python (pydantic only): the API process imports this without importing torch.
Everything that can be checked before any model is loaded is checked here.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from awqforge.limits import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from awqforge.patterns import validate_pattern

MAX_PATH_CHARS = 500  # a model path or hub id (the jobs table's column is as wide)
MAX_PATH_PART_CHARS = 255  # one path component (NAME_MAX)
MAX_SEED = 2**32 - 1  # numpy's seed range, the narrowest of the generators a job seeds
MAX_TOKEN_CHARS = (
    512  # hub tokens: long enough for any Hugging Face token, short enough to refuse a pasted file
)

# A hub id: "name" or "owner/name", the characters the Hugging Face Hub allows.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CALIB_SOURCE = re.compile(
    r"^(pileval|self|hf:[^\s:@]+(@[^\s:@]+)?(:[^\s:]*){0,3}|file:.+|upload:[A-Za-z0-9_-]+)$"
)


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


def shown(value: object, limit: int = 80) -> str:
    """repr() of a value for an error message, cut so that a huge input is never echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clean_text(value: str) -> str:
    """Refuse what no database column, file name or log line can hold: NUL bytes and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode (lone surrogate at character {exc.start})") from None
    return value


def is_local_path(value: str) -> bool:
    """A local path is written as one (absolute, ./, ../ or ~); anything else is a hub id."""
    return value.startswith(("/", "./", "../", "~"))


def validate_model_ref(value: str) -> str:
    """A model reference is a hub id ("org/name") or a local path (absolute, ./ or ~)."""
    v = clean_text(value).strip()
    if not v:
        raise ValueError("model must not be empty")
    if is_local_path(v):
        if any(len(part) > MAX_PATH_PART_CHARS for part in v.split("/")):
            raise ValueError(f"a path component is longer than {MAX_PATH_PART_CHARS} characters")
        return v
    if "\\" in v or ".." in v or v.endswith((".", "-")) or not _HUB_ID.match(v):
        raise ValueError(
            f"{shown(value)} is not a valid Hugging Face model id: use 'org/name' "
            "(letters, digits, '.', '_' and '-') or a local path"
        )
    return v


def validate_repo_id(value: str) -> str:
    """A repo to publish to: exactly 'owner/name' in the hub's characters (never a path)."""
    v = clean_text(value)
    if is_local_path(v.strip()):
        raise ValueError("publish.repo_id must be a hub repo id 'owner/name', not a path")
    if "/" not in v or v.count("/") != 1:
        raise ValueError("publish.repo_id must be 'owner/name'")
    if ".." in v or v.endswith((".", "-")) or not _HUB_ID.match(v):
        raise ValueError(
            f"{shown(value)} is not a valid repo id: use 'owner/name' (letters, digits, '.', '_' and '-'; "
            "each part starting with a letter or digit)"
        )
    return v


def _one_of(name: str, allowed: tuple[int, ...]):
    def check(v: int) -> int:
        if v not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {v}")
        return v

    return check


def _calibration_source(v: str) -> str:
    if not _CALIB_SOURCE.match(clean_text(v)):
        raise ValueError(
            f"calibration source {shown(v)} is not understood: use pileval, self, "
            "hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]], file:<path> or upload:<id>"
        )
    return v


def _eval_text(v: str) -> str:
    if not clean_text(v).startswith(("file:", "hf:")) or not _CALIB_SOURCE.match(v):
        raise ValueError(
            f"evaluation text {shown(v)} is not understood: use file:<path> or hf:<dataset>[:<split>[:<column>]]"
        )
    return v


# Each field and its limits, declared once (bits and group_size: the enum in OpenAPI, the check in the
# validator, so that the message names the allowed values): the engine's models below and the API's request body
# (app/schemas.py) are both built from these.
Text = Annotated[str, AfterValidator(clean_text)]
ModelRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Hugging Face model id (org/name) or an allowed local checkpoint path",
        examples=["HuggingFaceTB/SmolLM2-135M-Instruct"],
    ),
    AfterValidator(validate_model_ref),
]
Revision = Annotated[
    str,
    Field(min_length=1, max_length=200, description="Hub revision (branch, tag or commit)"),
    AfterValidator(clean_text),
]
Bits = Annotated[
    int,
    Field(
        description="Weight bit width: 2 | 3 | 4 | 8 (format awq is 4-bit only)",
        json_schema_extra={"enum": list(SUPPORTED_BITS)},
        examples=[4],
    ),
    AfterValidator(_one_of("bits", SUPPORTED_BITS)),
]
GroupSize = Annotated[
    int,
    Field(
        description="Input channels per quantization group: 32 | 64 | 128, or -1 = one group per output channel",
        json_schema_extra={"enum": list(SUPPORTED_GROUP_SIZES)},
    ),
    AfterValidator(_one_of("group_size", SUPPORTED_GROUP_SIZES)),
]
ModulePatterns = Annotated[
    list[
        Annotated[
            str,
            Field(min_length=1, max_length=200),
            AfterValidator(clean_text),
            AfterValidator(validate_pattern),
        ]
    ],
    Field(
        max_length=256,
        description="Module name patterns left in full precision (globs over full module names or their tails: "
        "'mlp.down_proj', 'model.layers.0.*', 'model.layers.*.mlp.down_proj'); a pattern that matches no module "
        "fails the job before any work; lm_head and MoE routers always stay in full precision",
    ),
]
CalibrationSource = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1000,
        description="pileval | self | hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]] | file:<path> "
        "| upload:<id>; jsonl/parquet rows with `messages` are rendered with the model's chat template",
        examples=["pileval"],
    ),
    AfterValidator(_calibration_source),
]
NSamples = Annotated[int, Field(ge=1, le=4096, description="calibration sequences")]
CalibrationSeqLen = Annotated[int, Field(ge=16, le=8192, description="tokens per calibration sequence")]
EvalText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1000,
        description="Evaluation text source: file:<path>, hf:<dataset>[:<split>[:<column>]], "
        "or None for the built-in text",
    ),
    AfterValidator(_eval_text),
]
EvalSeqLen = Annotated[int, Field(ge=16, le=32768, description="tokens per evaluation window")]
MaxSeqs = Annotated[int, Field(ge=1, le=1_000_000, description="at most this many evaluation windows")]
RepoId = Annotated[
    str,
    Field(min_length=3, max_length=193, examples=["my-org/SmolLM2-135M-Instruct-AWQ"]),
    AfterValidator(validate_repo_id),
]
HubToken = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TOKEN_CHARS,
        description="Hub token: encrypted at rest, deleted when the job ends, never logged or returned",
        json_schema_extra={"writeOnly": True},
    ),
    AfterValidator(clean_text),
]
NGrid = Annotated[int, Field(ge=2, le=100, description="points of the AWQ scale grid")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="random seed (calibration sampling, torch)")]
RefineSteps = Annotated[
    int,
    Field(
        ge=0,
        le=10,
        description="least-squares refits of each group's scale and zero for its output error after the clip "
        "search; 0 gives AWQ as published",
    ),
]
SearchScreen = Annotated[
    int,
    Field(
        ge=0,
        le=100,
        description="scale search of the attention and MLP mappings: every grid point is scored exactly on the "
        "mapping's linears' own outputs (from their input Gram matrix), and only the best k are scored on the "
        "attention / MLP output; 0 scores every grid point on the module output (AWQ as published)",
    ),
]
RoundingDescription = (
    "nearest (AWQ as published) or gptq: after the AWQ scale and clip search, round the codes "
    "with error feedback through the inverse input Gram matrix; same artifact format"
)


class QuantSettings(BaseModel):
    """Bit width, grouping and what stays in full precision."""

    model_config = ConfigDict(extra="forbid")

    bits: Bits = 4
    group_size: GroupSize = 128
    zero_point: bool = Field(True, description="Asymmetric with a zero point (True) or symmetric (False)")
    modules_to_not_convert: ModulePatterns = Field(default_factory=list)


class Packing(str, Enum):
    """How calibration texts become sequences (see awqforge.calibration)."""

    CONCAT = "concat"
    PER_SAMPLE = "per_sample"


# A block-relative module name; `*` stands for one name part (an expert index) and binds across the mapping.
_BLOCK_NAME = re.compile(r"^(?:[A-Za-z0-9_]+|\*)(?:\.(?:[A-Za-z0-9_]+|\*)){0,15}$")


def _block_name(v: str) -> str:
    if not _BLOCK_NAME.match(v):
        raise ValueError(
            f"{v!r} is not a block-relative module name (dotted parts of letters, digits and '_', or '*' for one "
            "part), e.g. 'input_layernorm' or 'mlp.experts.*.up_proj'"
        )
    return v


BlockName = Annotated[str, Field(min_length=1, max_length=200)]


class MappingSpecIn(BaseModel):
    """One AWQ mapping given with the job: the op whose output is scaled, the linears that read it."""

    model_config = ConfigDict(extra="forbid")

    prev: BlockName = Field(..., description="the norm, linear or activation whose output channels take 1/s")
    linears: list[BlockName] = Field(
        ..., min_length=1, max_length=64, description="the linears reading that output"
    )
    inspect: BlockName | None = Field(
        None, description="the module whose output measures the loss (default: the linears' own outputs)"
    )
    absorb: list[BlockName] = Field(
        default_factory=list, max_length=8, description="unquantized readers of the same input (MoE routers)"
    )
    prev_rows: Literal["v", "up"] | None = Field(
        None, description="for a fused prev linear: its v rows (fused qkv) or its up half (fused gate_up)"
    )

    @field_validator("prev", "inspect")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _block_name(v)

    @field_validator("linears", "absorb")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return [_block_name(n) for n in v]


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: CalibrationSource = "pileval"
    n_samples: NSamples = 128
    seq_len: CalibrationSeqLen = 512
    packing: Packing = Field(
        Packing.CONCAT,
        description="concat (AutoAWQ: texts concatenated and cut into seq_len blocks) or per_sample "
        "(llm-compressor: each text its own sequence, truncated at seq_len, padded, with an attention mask)",
    )


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    text: EvalText | None = None
    seq_len: EvalSeqLen = 2048
    max_seqs: MaxSeqs | None = Field(
        16,
        description="At most this many windows of seq_len tokens are scored (default 16: 32,768 tokens at "
        "seq_len 2048, FP and quantized); null scores the whole text",
    )


def hub_namespace(repo_id: str) -> str:
    """The `owner` of an `owner/name` repo id."""
    return repo_id.split("/", 1)[0]


class SourceSpec(BaseModel):
    """How the source model is read from the hub."""

    model_config = ConfigDict(extra="forbid")

    token: HubToken | None = Field(
        None,
        description="Hub read token for private or gated source models; encrypted at rest, deleted when the "
        "job ends, never returned",
    )


class PublishSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: RepoId
    private: bool = True
    token: HubToken | None = None


class JobSpec(BaseModel):
    """One quantization job, as the CLI, the API and the worker all see it."""

    model_config = ConfigDict(extra="forbid")

    model: ModelRef
    revision: Revision | None = None
    source: SourceSpec = Field(default_factory=SourceSpec)
    method: Method = Method.AWQ
    quant: QuantSettings = Field(default_factory=QuantSettings)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    formats: list[ArtifactFormat] = Field(default_factory=lambda: [ArtifactFormat.AWQ], max_length=2)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    publish: PublishSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scale_search: ScaleSearch = ScaleSearch.DUO
    n_grid: NGrid = 20
    clip_search: bool = True
    refine_steps: RefineSteps = 2
    search_screen: SearchScreen = (
        8  # k=8: SmolLM2 W4 perplexity 17.573 vs 17.567 full; k=4: 17.805 (bench/README)
    )
    rounding: Rounding = Field(Rounding.NEAREST, description=RoundingDescription)
    gqa_fold: bool = Field(
        False,
        description="grouped-query attention: fold the v -> o scale per KV channel, shared by its query heads "
        "(off by default: on SmolLM2 it lowered o_proj's error but not perplexity, bench/README.md; off skips "
        "that mapping, as AutoAWQ and llm-compressor do)",
    )
    mappings: list[MappingSpecIn] | None = Field(
        None,
        max_length=64,
        description="AWQ mappings for a model the engine does not know (names relative to a decoder block); "
        "they replace the registry's or the structural fallback's",
    )
    seed: Seed = 0

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
