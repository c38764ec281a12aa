"""Each small concept is declared once and every user agrees with it: a test here fails when a copy drifts.
Job statuses and stages, the per-layer metric schema, q/k names, local-path detection, the hub-offline rule and
byte sizes."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from awqforge import spec

REPO = Path(__file__).resolve().parents[1]


def test_job_statuses_are_one_vocabulary():
    from app import models, schemas
    from app.client import jobs_command  # noqa: F401  (the CLI's --status choices are JOB_STATUSES)

    assert spec.JOB_STATUSES == ("queued", "running", "succeeded", "failed", "cancelled")
    assert models.JobStatus is spec.JobStatus and models.TERMINAL_STATUSES == spec.TERMINAL_STATUSES
    assert typing.get_args(schemas.JobStatusName) == spec.JOB_STATUSES
    assert set(spec.TERMINAL_STATUSES) == {"succeeded", "failed", "cancelled"}
    source = (REPO / "app" / "client.py").read_text()
    assert "choices=JOB_STATUSES" in source and '"queued", "running"' not in source


def test_job_stages_are_one_vocabulary():
    from app.metrics import STAGES as service_stages
    from awqforge.pipeline import STAGES as engine_stages

    assert service_stages == spec.JOB_STAGES
    assert list(engine_stages) == [s for s in spec.JOB_STAGES if s != spec.JobStage.PUBLISH]
    # the dashboard's copy (JavaScript cannot import it): the same names in the same order
    js = (REPO / "app" / "static" / "dashboard.js").read_text()
    listed = re.search(r"const STAGES = \[([^\]]*)\]", js).group(1)
    assert tuple(re.findall(r'"([a-z]+)"', listed)) == spec.JOB_STAGES
    # and the metrics table has a duration column for each
    from app.models import JobMetrics

    assert all(f"{s}_s" in JobMetrics.__table__.columns for s in spec.JOB_STAGES)


def test_per_layer_metrics_have_one_schema():
    from app.models import LayerMetric as LayerRow
    from app.schemas import JobMetricsDetail, LayerMetricPublic
    from awqforge.awq.settings import LayerMetric

    engine = [f.name for f in dataclasses.fields(LayerMetric)]
    public = list(LayerMetricPublic.model_fields)
    table = [c for c in LayerRow.__table__.columns.keys() if c not in ("id", "job_id")]
    assert set(engine) == set(public) == set(table), (engine, public, table)
    assert typing.get_args(JobMetricsDetail.model_fields["layers"].annotation) == (LayerMetricPublic,)


def test_is_qk_knows_every_q_and_k_name_of_the_structural_fallback():
    from awqforge import structure
    from awqforge.awq.block import is_qk

    for name in structure.Q | structure.K | structure.QKV:
        assert is_qk(f"self_attn.{name}"), name
    for name in structure.V | structure.O | structure.UP | structure.DOWN:
        if name not in structure.Q | structure.K | structure.QKV:
            assert not is_qk(f"mlp.{name}"), name


def test_local_path_detection_is_one_rule():
    from awqforge import parsing, resolve

    assert spec.is_local_path is parsing.is_local_reference is resolve.is_local_reference
    for path in ("awqforge/loading.py", "app/services/routing.py", "awqforge/spec.py"):
        text = (REPO / path).read_text()
        assert 'startswith(("/", "./", "../", "~"))' not in text and 'startswith(("/", ".", "~"))' not in text


@pytest.mark.parametrize(
    ("flag", "offline"), [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False)]
)
def test_hub_offline_is_one_rule(monkeypatch, flag, offline):
    from app.services import routing
    from awqforge.resolve import hub_offline

    assert routing.hub_offline is hub_offline
    monkeypatch.setenv("HF_HUB_OFFLINE", flag)
    assert hub_offline() is offline


def test_byte_sizes_are_one_rule():
    from app.core import config
    from awqforge.formats import writer
    from awqforge.parsing import parse_size

    assert config.parse_size is parse_size and writer.parse_size is parse_size
    assert config.Settings(QUEUE_CLASSES="cpu=1G,gpu-48g=48G", DEFAULT_QUEUE="gpu-48g").queue_classes == {
        "cpu": 2**30,
        "gpu-48g": 48 * 2**30,
    }


def test_cpu_queue_classes_are_one_rule():
    from app.core.config import is_cpu_class

    assert is_cpu_class("cpu") and is_cpu_class("cpu-big") and not is_cpu_class("gpu-48g")
    for path in ("app/embedded.py", "app/services/routing.py", "app/api/routes/metrics.py"):
        text = (REPO / path).read_text()
        assert 'startswith("cpu")' not in text and 'queue == "cpu"' not in text, path
