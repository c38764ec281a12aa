"""The plan's time estimate on a rate measured here: one block of the model's shape, timed."""

from __future__ import annotations

import math

import pytest
from tiny_models import tiny_config

from awqforge.plan import DEVICE_FLOPS, JobSettings, block_flops, describe, plan
from awqforge.timing import measure_rate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe"])
def test_measured_rate_drives_the_estimate(family):
    config = tiny_config(family).to_dict()
    s = JobSettings(n_samples=4, seq_len=32, group_size=32, eval_enabled=False)
    rate, secs = measure_rate(config, s)
    assert secs > 0 and math.isfinite(rate) and rate > 0
    p = plan(config, s, device="cpu", flops_rate=rate)
    assert p.flops_rate_source == "measured" and p.flops_rate == rate
    # the quantize stage is n_layers blocks at the measured block time (up to the plan's rounding)
    assert p.est_seconds_by_stage["quantize"] == pytest.approx(config["num_hidden_layers"] * secs, abs=0.06)
    assert "measured on this machine" in describe(p)
    default = plan(config, s, device="cpu")
    assert default.flops_rate == DEVICE_FLOPS["cpu"] and default.flops_rate_source == "default"
    assert block_flops(config, s) > 0


def test_measured_forward_rate_drives_the_forward_stages():
    """Evaluation runs the model forward (large matmuls): its stage is estimated at the rate of a timed
    forward of one block on an evaluation window, not at the search's rate."""
    from awqforge.plan import ModelShape, forward_flops
    from awqforge.timing import measure_forward_rate

    config = tiny_config("llama").to_dict()
    s = JobSettings(n_samples=4, seq_len=32, group_size=32, eval_seq_len=64, eval_max_seqs=2000)
    fwd, secs = measure_forward_rate(config, s)
    assert secs > 0 and math.isfinite(fwd) and fwd > 0
    p = plan(config, s, device="cpu", flops_rate=1e9, forward_rate=fwd)
    params = ModelShape.from_config(config).total_params
    want = 2 * forward_flops(params, 2000 * 64) / fwd
    assert want > 5 and p.est_seconds_by_stage["evaluate"] == pytest.approx(want, rel=0.01)
    assert p.forward_rate == fwd and "forward" in describe(p)
    slower = plan(config, s, device="cpu", flops_rate=1e9, forward_rate=fwd / 10)
    assert slower.est_seconds_by_stage["evaluate"] > p.est_seconds_by_stage["evaluate"]
    assert slower.est_seconds_by_stage["quantize"] == p.est_seconds_by_stage["quantize"]
