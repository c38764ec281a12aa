"""awqforge.spec.JobSpec declares every job setting once: its default, enum and limits. The API body, the
engine's block settings, the planner's settings, the CLI flags and the client's flags are derived from it; each
test here fails when one of them disagrees (a default, a choice, a limit, or a field left out)."""

from __future__ import annotations

import argparse
import typing

import pytest
from pydantic import BaseModel, TypeAdapter

from awqforge import limits, spec
from awqforge.spec import JobSpec, field_default, spec_value

# A JobSpec whose every setting differs from its default, to check that values (not only defaults) flow.
CHANGED = JobSpec(
    model="org/name",
    method="rtn",
    quant={"bits": 3, "group_size": 64, "zero_point": False, "modules_to_not_convert": ["mlp.down_proj"]},
    calibration={"source": "self", "n_samples": 7, "seq_len": 33, "packing": "per_sample"},
    formats=["compressed-tensors"],
    eval={
        "enabled": False,
        "seq_len": 99,
        "max_seqs": 3,
        "tasks": [{"name": "awqforge_mc", "limit": 5}],
        "gate": {"min_recovery": 0.9},
        "prompts": ["Hello"],
        "max_new_tokens": 8,
    },
    device="cpu",
    scale_search="both",
    n_grid=5,
    clip_search=False,
    refine_steps=0,
    search_screen=3,
    rounding="nearest",
    gqa_fold=True,
    seed=11,
)


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Dotted path -> field info of every setting (nested settings models walked; tokens and mappings are
    whole values)."""
    out = {}
    for name, f in model.model_fields.items():
        inner = f.annotation
        if (
            isinstance(inner, type)
            and issubclass(inner, BaseModel)
            and name in ("quant", "calibration", "eval")
        ):
            out.update(_leaves(inner, f"{prefix}{name}."))
        else:
            out[prefix + name] = f
    return out


SPEC_FIELDS = _leaves(JobSpec)


def test_every_setting_differs_in_the_changed_spec():
    same = [p for p in SPEC_FIELDS if spec_value(CHANGED, p) == field_default(p)]
    assert set(same) <= {"model", "revision", "source", "publish", "mappings", "eval.text"}, same


def _check_table(cls, table: dict[str, str]):
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, path in table.items():
        assert path in SPEC_FIELDS, path
        assert fields[name].default == field_default(path), (cls.__name__, name)
    derived = cls.from_spec(CHANGED)
    for name, path in table.items():
        assert getattr(derived, name) == spec_value(CHANGED, path), (cls.__name__, name)


def test_block_settings_derive_from_the_spec():
    from awqforge.awq.settings import BLOCK_SETTINGS_FROM_SPEC, BlockSettings

    _check_table(BlockSettings, BLOCK_SETTINGS_FROM_SPEC)
    # every spec setting the block algorithm reads is in the table
    assert {"method", "quant.bits", "quant.group_size", "quant.zero_point", "quant.modules_to_not_convert",
            "scale_search", "n_grid", "clip_search", "refine_steps", "search_screen", "rounding", "gqa_fold"} == set(
        BLOCK_SETTINGS_FROM_SPEC.values()
    )  # fmt: skip


def test_planner_settings_derive_from_the_spec_and_use_the_engines_constants():
    from awqforge import plan
    from awqforge.awq import search
    from awqforge.awq.settings import BlockSettings

    _check_table(plan.JobSettings, plan.JOB_SETTINGS_FROM_SPEC)
    s = BlockSettings()
    assert plan._CHUNK_TOKENS == s.chunk_tokens == limits.CHUNK_TOKENS
    assert plan._CHUNK_ELEMS == search.CHUNK_ELEMS == limits.CHUNK_ELEMS
    assert plan._CLIP_RATIOS == int(s.clip_grid * s.max_shrink)
    source = plan.__file__ and open(plan.__file__).read()
    assert "1 << 23" not in source and "16384" not in source


# The API body is flat: quant settings at the top, calibration by source or upload id.
BODY_TO_SPEC = {
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "zero_point": "quant.zero_point",
    "modules_to_not_convert": "quant.modules_to_not_convert",
    "calibration.n_samples": "calibration.n_samples",
    "calibration.seq_len": "calibration.seq_len",
    "calibration.packing": "calibration.packing",
    "calibration.source": "calibration.source",
}


def _schema(annotation) -> dict:
    """The JSON schema of a field's type with prose and None-ability dropped (limits and enums kept)."""
    args = typing.get_args(annotation)
    if (
        typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and type(None) in args
    ):
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    out = TypeAdapter(annotation).json_schema()

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("description", "title", "examples")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(out)


def _body_fields() -> dict[str, object]:
    from app.schemas import CalibrationIn, JobCreate

    out = {}
    for name, f in JobCreate.model_fields.items():
        if name == "calibration":
            out.update({f"calibration.{n}": cf for n, cf in CalibrationIn.model_fields.items()})
        elif name == "eval":  # the engine's own model
            assert f.annotation is spec.EvalSpec
            out.update({f"eval.{n}": ef for n, ef in spec.EvalSpec.model_fields.items()})
        else:
            out[name] = f
    return out


def test_the_api_body_has_every_setting_with_the_specs_type_limits_and_default():
    body = _body_fields()
    spec_paths = {BODY_TO_SPEC.get(name, name): name for name in body if name != "calibration.upload_id"}
    missing = set(SPEC_FIELDS) - set(spec_paths)
    assert not missing, f"JobSpec fields the API body lacks: {sorted(missing)}"
    for path, name in spec_paths.items():
        b, s = body[name], SPEC_FIELDS[path]
        if path not in ("formats", "calibration.source", "eval"):
            assert _schema(b.rebuild_annotation()) == _schema(s.rebuild_annotation()), name  # enums, limits
        default = b.get_default(call_default_factory=True)
        if default is not None:  # None: "the engine's default" (advanced settings)
            want = s.get_default(call_default_factory=True)
            assert spec._plain(default) == spec._plain(want), name


def test_the_cli_flags_default_to_the_spec(tmp_path):
    from awqforge.cli import _spec_from_args, build_parser

    parser = build_parser({})
    args = parser.parse_args(["quantize", "org/name", "--out", str(tmp_path)])
    from awqforge.cli import DEFAULT_CALIBRATION

    # The CLI's one declared difference: it calibrates offline on the bundled text (issue 19).
    assert _spec_from_args(args) == JobSpec(model="org/name", calibration={"source": DEFAULT_CALIBRATION})
    flags = [
        "--method", "rtn", "--bits", "3", "--group-size", "64", "--symmetric", "--modules-to-not-convert",
        "mlp.down_proj", "--calib", "self", "--n-samples", "7", "--seq-len", "33", "--packing", "per_sample",
        "--format", "compressed-tensors", "--no-eval", "--eval-seq-len", "99", "--eval-max-seqs", "3",
        "--device", "cpu", "--scale-search", "both", "--n-grid", "5", "--no-clip-search", "--refine-steps", "0",
        "--search-screen", "3", "--rounding", "nearest", "--seed", "11", "--gqa-fold", "--eval-task", "awqforge_mc",
        "--eval-limit", "5", "--eval-min-recovery", "0.9", "--eval-prompt", "Hello", "--eval-max-new-tokens", "8",
    ]  # fmt: skip
    args = parser.parse_args(["quantize", "org/name", "--out", str(tmp_path), *flags])
    assert _spec_from_args(args) == CHANGED
    _check_choices(parser._subparsers._group_actions[0].choices["quantize"])


def _check_choices(parser: argparse.ArgumentParser):
    enums = {
        "method": spec.Method,
        "formats": spec.ArtifactFormat,
        "packing": spec.Packing,
        "scale_search": spec.ScaleSearch,
        "rounding": spec.Rounding,
    }
    seen = set()
    for action in parser._actions:
        if action.dest in enums:
            assert list(action.choices) == spec.choices(enums[action.dest]), action.dest
            seen.add(action.dest)
        if action.dest == "device":
            assert tuple(action.choices) == spec.DEVICES
            seen.add("device")
    return seen


def test_the_client_flags_take_the_specs_choices_and_leave_defaults_to_it():
    from app.client import submit_parser

    p = submit_parser()
    assert _check_choices(p) == {"method", "formats", "device"}
    args = p.parse_args(["org/name"])
    for name in ("method", "bits", "group_size", "formats", "n_samples", "seq_len", "device"):
        assert getattr(args, name) is None, name  # unset: the service applies JobSpec's default


@pytest.mark.parametrize("path", sorted(SPEC_FIELDS))
def test_field_default_reads_the_spec(path):
    assert field_default(path) == spec._plain(SPEC_FIELDS[path].get_default(call_default_factory=True))
