"""The job specification shared by the CLI, the API's validation and the worker.

Pure Python (pydantic only): the API process imports this without importing torch.
Everything that can be checked before any model is loaded is checked here.
"""

from __future__ import annotations

import re
import typing
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from awqforge.limits import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from awqforge.parsing import is_local_reference
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
    r"^(bundled|pileval|self|hf:[^\s:@]+(@[^\s:@]+)?(:[^\s:]*){0,3}|file:.+|upload:[A-Za-z0-9_-]+)$"
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


Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = typing.get_args(Device)


class JobStatus(str, Enum):
    """A job's status (the service's state machine; the one vocabulary of API, database, CLI and dashboard)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobStage(str, Enum):
    """A job's stages, in order: the engine runs resolve..package, the service adds publish."""

    RESOLVE = "resolve"
    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"
    EVALUATE = "evaluate"
    PACKAGE = "package"
    PUBLISH = "publish"


JOB_STATUSES = tuple(s.value for s in JobStatus)
TERMINAL_STATUSES = tuple(s.value for s in JobStatus if s.terminal)
JOB_STAGES = tuple(s.value for s in JobStage)
# Where a job that failed its quality gate (eval.gate) is left: not a work stage of its own (the task runs count
# in evaluate), a marker that its artifacts are recorded and publish only with override_gate.
GATE_STAGE = "gate"


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


is_local_path = is_local_reference  # the one rule (awqforge.parsing); kept under this name for callers


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
            f"calibration source {shown(v)} is not understood: use bundled, pileval, self, "
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
        description="bundled (the English text shipped with awqforge) | pileval | self | hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]] | file:<path> "
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
        description="scale search of the attention and MLP mappings: every grid point is ranked on the "
        "mapping's linears' own output error (from the diagonal of their input Gram matrix), and only the best k "
        "(and no scale) are scored on the attention / MLP output; 0 scores every grid point on the module output "
        "(AWQ as published)",
    ),
]
RoundingDescription = (
    "gptq (the default): after the AWQ scale and clip search, round the codes with error feedback through "
    "the inverse input Gram matrix, same artifact format (closer to full precision on every family measured, "
    "bench/README.md); or nearest, AWQ as published"
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


class EvalTaskSpec(BaseModel):
    """One lm-evaluation-harness task (awqforge.tasks_eval), run on the FP and the quantized model."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PATH_CHARS,
            description="an lm-eval task, group or tag name (hellaswag), a bundled local task (awqforge_mc, "
            "awqforge_cloze), or a folder or YAML file of lm-eval task definitions under the allowed roots",
            examples=["awqforge_mc"],
        ),
        AfterValidator(clean_text),
    ]
    limit: int | None = Field(None, ge=1, le=1_000_000, description="at most this many examples (null: all)")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="few-shot examples (null: the task's own)")
    seed: Seed = 0


class EvalGateSpec(BaseModel):
    """A quality gate: a job below it ends failed, its artifacts kept and not published."""

    model_config = ConfigDict(extra="forbid")

    min_recovery: float | None = Field(
        None, ge=0, le=10, description="every task's recovery (quantized / FP) at least this"
    )
    min_avg_recovery: float | None = Field(None, ge=0, le=10, description="the mean recovery over tasks")
    max_perplexity_increase: float | None = Field(
        None, ge=0, le=1000, description="quantized perplexity at most FP x (1 + this): 0.05 = +5%"
    )


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[EvalTaskSpec] = Field(
        default_factory=list, max_length=32, description="lm-evaluation-harness tasks (needs awqforge[eval])"
    )
    gate: EvalGateSpec | None = None
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(clean_text)]] | None = (
        Field(
            None,
            max_length=16,
            description="prompts for side-by-side greedy generations, FP and quantized (null: a default handful "
            "when tasks are evaluated; [] : none)",
        )
    )
    max_new_tokens: int = Field(32, ge=1, le=512, description="tokens generated per prompt")

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


# The marker of a credential field: `Field(..., json_schema_extra=SECRET)`. public_spec() leaves every field so
# marked out of every view of a job spec that is stored, written or returned.
SECRET = {"secret": True, "writeOnly": True}


class SourceSpec(BaseModel):
    """How the source model is read from the hub."""

    model_config = ConfigDict(extra="forbid")

    token: HubToken | None = Field(
        None,
        description="Hub read token for private or gated source models; encrypted at rest, deleted when the "
        "job ends, never returned",
        json_schema_extra=SECRET,
    )


class PublishSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: RepoId
    private: bool = True
    token: HubToken | None = Field(None, json_schema_extra=SECRET)


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
    device: Device = "auto"
    scale_search: ScaleSearch = ScaleSearch.DUO
    n_grid: NGrid = 20
    clip_search: bool = True
    refine_steps: RefineSteps = 2
    search_screen: SearchScreen = (
        8  # k=8: SmolLM2 W4 perplexity 17.573 vs 17.567 full; k=4: 17.805 (bench/README)
    )
    rounding: Rounding = Field(Rounding.GPTQ, description=RoundingDescription)
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


# -- secrets: one outward view of a job spec ----------------------------------------------------------------


def _is_secret(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("secret") is True


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds: itself, or inside list[...], X | None and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def secret_fields(
    model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every field marked SECRET in `model` (JobSpec by default) and the models it holds, as dotted paths."""
    found: list[tuple[str, ...]] = []
    for name, info in (model or JobSpec).model_fields.items():
        if _is_secret(info):
            found.append((*prefix, name))
        else:
            for sub in _models_in(info.annotation):
                found += secret_fields(sub, (*prefix, name))
    return found


def _without_secrets(model: type[BaseModel], data: Any) -> Any:
    if isinstance(data, list):
        return [_without_secrets(model, item) for item in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        info = model.model_fields.get(key)
        if info is not None and _is_secret(info):
            continue
        subs = _models_in(info.annotation) if info is not None else []
        out[key] = _without_secrets(subs[0], value) if subs else value
    return out


def public_spec(spec: JobSpec | dict) -> dict:
    """The job spec as it may be stored, written (report, card, checkpoint fingerprint), logged or returned:
    JSON-ready, with every field marked SECRET removed at any depth (found by walking the models, so a new
    credential field is covered by its marker). Takes a JobSpec or its stored dict."""
    data = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else spec
    return _without_secrets(JobSpec, data)


# -- every other declaration of a job's settings (API body, block settings, planner, CLI and client flags)
# takes its defaults and choices from JobSpec through these; tests/test_spec_derived.py checks each one.


def _plain(value):
    """A setting as the engine's dataclasses hold it: enums as their values, lists as tuples."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def field_default(path: str):
    """JobSpec's default of a dotted field ("quant.bits", "n_grid"), enums as their values."""
    model: type[BaseModel] = JobSpec
    *parents, last = path.split(".")
    for name in parents:
        model = model.model_fields[name].annotation
    return _plain(model.model_fields[last].get_default(call_default_factory=True))


def spec_value(spec: JobSpec, path: str):
    """The value of a dotted field of a JobSpec, enums as their values."""
    value = spec
    for name in path.split("."):
        value = getattr(value, name)
    return _plain(value)


def choices(enum: type[Enum]) -> list[str]:
    """The values of one of the spec's enums (for CLI choices)."""
    return [e.value for e in enum]
