"""The job specification refuses bad input before any work, with the field and the reason."""

import pytest
from pydantic import ValidationError

from awqforge.spec import JobSpec


def _err(**kw) -> str:
    with pytest.raises(ValidationError) as ei:
        JobSpec(**kw)
    return str(ei.value)


def test_defaults_are_the_awq_paper_settings():
    spec = JobSpec(model="org/model")
    assert spec.quant.bits == 4 and spec.quant.group_size == 128 and spec.quant.zero_point
    assert spec.calibration.source == "pileval"
    assert spec.calibration.n_samples == 128 and spec.calibration.seq_len == 512
    assert spec.eval.seq_len == 2048 and spec.n_grid == 20
    assert spec.rounding == "gptq"  # AWQ's scales and clip, GPTQ's rounding; "nearest" is AWQ as published


def test_rounding():
    assert JobSpec(model="org/model", rounding="gptq").rounding == "gptq"
    assert "nearest" in _err(model="a/b", rounding="stochastic")


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bad_bits(bits):
    assert "bits must be one of" in _err(model="a/b", quant={"bits": bits}, formats=["compressed-tensors"])


def test_bad_group_size():
    assert "group_size must be one of" in _err(model="a/b", quant={"group_size": 48})


def test_awq_format_is_4_bit_only():
    msg = _err(model="a/b", quant={"bits": 3}, formats=["awq"])
    assert "4-bit only" in msg
    JobSpec(model="a/b", quant={"bits": 3}, formats=["compressed-tensors"])


@pytest.mark.parametrize("model", ["", "a/b/c", "bad model", "org/..", "-x"])
def test_bad_model_ids(model):
    _err(model=model)


def test_local_paths_are_accepted():
    assert JobSpec(model="/tmp/x").model == "/tmp/x"


@pytest.mark.parametrize(
    "source", ["pileval", "self", "hf:org/ds", "hf:org/ds:train:text", "file:/x.txt", "upload:abc"]
)
def test_calibration_sources(source):
    JobSpec(model="a/b", calibration={"source": source})


def test_bad_calibration_source():
    assert "not understood" in _err(model="a/b", calibration={"source": "ftp://x"})


def test_unknown_field_refused():
    assert "extra" in _err(model="a/b", bitz=4).lower()


def test_calibration_packing_refine_steps_and_eval_bound():
    spec = JobSpec(model="org/model")
    assert spec.calibration.packing == "concat"  # AutoAWQ's way; see bench/README.md (bench_calibration)
    assert spec.refine_steps == 2 and spec.eval.max_seqs == 16  # evaluation bounded by default
    assert JobSpec(model="a/b", eval={"max_seqs": None}).eval.max_seqs is None  # the whole text, on request
    assert JobSpec(model="a/b", calibration={"packing": "per_sample"}).calibration.packing == "per_sample"
    assert JobSpec(model="a/b", refine_steps=0).refine_steps == 0  # AWQ as published
    assert "concat" in _err(model="a/b", calibration={"packing": "random"})
    assert "less than or equal to 10" in _err(model="a/b", refine_steps=11)
    assert "greater than or equal to 0" in _err(model="a/b", refine_steps=-1)


def test_search_screen_setting_and_its_label():
    from awqforge.awq import BlockSettings
    from awqforge.formats.card import describe_method

    spec = JobSpec(model="a/b")
    # 8 by default (SmolLM2's perplexity held at k=8, not at k=4: bench/README.md)
    assert spec.search_screen == 8 and BlockSettings.from_spec(spec).search_screen == 8
    assert BlockSettings().search_screen == 8
    assert BlockSettings.from_spec(JobSpec(model="a/b", search_screen=0)).search_screen == 0
    assert "greater than or equal to 0" in _err(model="a/b", search_screen=-1)
    assert "less than or equal to 100" in _err(model="a/b", search_screen=101)
    assert "the best 8 scored on the attention / MLP output" in describe_method(spec)["search_screen"]
    screened = describe_method(JobSpec(model="a/b", search_screen=4))["search_screen"]
    assert "the best 4 scored on the attention / MLP output" in screened
    off = "off: every grid point scored on the attention / MLP output (AWQ as published)"
    assert describe_method(JobSpec(model="a/b", search_screen=0))["search_screen"] == off
    # k at least the number of candidates (n_grid + 1 with duo's s = 1) screens nothing: labelled off
    assert describe_method(JobSpec(model="a/b", n_grid=10, search_screen=11))["search_screen"] == off
    assert "best 10" in describe_method(JobSpec(model="a/b", n_grid=10, search_screen=10))["search_screen"]
    assert describe_method(JobSpec(model="a/b", method="rtn"))["search_screen"] == "none"
