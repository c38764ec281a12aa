"""Routing by need: the memory plan from config.json, the smallest queue class that fits, refusals, /v1/plan."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.services

# Llama-2-7B and Llama-3-70B as their config.json says (no weights are needed to plan)
LLAMA_7B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    torch_dtype="float16",
)
LLAMA_70B = {
    **LLAMA_7B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def config_models(service):
    """Checkpoint folders that hold only a config.json (under ALLOWED_LOCAL_ROOTS)."""
    out = {}
    for name, cfg in (("llama-7b", LLAMA_7B), ("llama-70b", LLAMA_70B)):
        d = service.home / "models" / f"config-only-{name}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = str(d)
    return out


def test_plan_is_pure_and_ordered():
    """The plan module imports no torch, and its peak grows with what the job holds."""
    code = "import sys, awqforge.plan, app.services.routing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"

    from awqforge.plan import GIB, JobSettings, plan

    small = plan(LLAMA_7B, JobSettings(n_samples=128, seq_len=512, rounding="nearest"), device="cuda")
    more = plan(LLAMA_7B, JobSettings(n_samples=512, seq_len=2048, rounding="nearest"), device="cuda")
    gptq = plan(LLAMA_7B, JobSettings(n_samples=128, seq_len=512, rounding="gptq"), device="cuda")
    cpu = plan(LLAMA_7B, JobSettings(n_samples=128, seq_len=512, rounding="nearest"), device="cpu")
    assert small.peak_bytes < more.peak_bytes and small.quantize_peak_bytes < gptq.quantize_peak_bytes
    assert cpu.compute_dtype == "float32" and cpu.quantize_peak_bytes > small.quantize_peak_bytes
    # a 7B job fits a 24 GiB card, a 70B one does not (its quantized weights alone are ~35 GiB)
    assert small.peak_bytes < 0.9 * 24 * GIB
    big = plan(LLAMA_70B, JobSettings(n_samples=128, seq_len=512), device="cuda")
    assert 24 * GIB < big.peak_bytes < 0.9 * 80 * GIB and big.peak_stage == "evaluate"
    assert big.est_seconds > small.est_seconds > 0


def test_plan_counts_task_evaluation():
    """eval.tasks loads the FP model whole (in fp32 on CPU) beside lm-eval's batch of logits: a stage of its
    own in the memory plan and the time estimate, absent without tasks."""
    from awqforge.plan import JobSettings, describe, plan

    common = {"n_samples": 16, "seq_len": 128}
    base = plan(LLAMA_7B, JobSettings(**common), device="cpu")
    tasks = ({"name": "awqforge_mc", "limit": 100}, {"name": "awqforge_cloze", "limit": 100})
    with_tasks = plan(LLAMA_7B, JobSettings(**common, eval_tasks=tasks), device="cpu")
    assert base.evaluate_tasks_peak_bytes == 0 and "evaluate_tasks" not in base.est_seconds_by_stage
    assert with_tasks.peak_stage == "evaluate_tasks" and with_tasks.peak_bytes > base.peak_bytes
    assert with_tasks.evaluate_tasks_peak_bytes > 4 * with_tasks.params  # the FP weights in fp32
    assert with_tasks.est_seconds_by_stage["evaluate_tasks"] > 0
    assert with_tasks.est_seconds > base.est_seconds
    assert "evaluate_tasks" in describe(with_tasks)
    more = plan(LLAMA_7B, JobSettings(**common, eval_tasks=({"name": "hellaswag"},)), device="cpu")
    assert more.est_seconds_by_stage["evaluate_tasks"] > with_tasks.est_seconds_by_stage["evaluate_tasks"]
    # side-by-side generations alone load the FP model too; they cost no task time
    prompts = plan(LLAMA_7B, JobSettings(**common, eval_prompts=("Once",)), device="cpu")
    assert prompts.evaluate_tasks_peak_bytes == with_tasks.evaluate_tasks_peak_bytes
    assert "evaluate_tasks" not in prompts.est_seconds_by_stage


def test_plan_follows_the_engine_on_wide_layers():
    """Fewer calibration tokens than a linear's input width: the engine keeps the inputs, not the Gram matrix,
    and on CPU the inputs of q/k/v and gate/up are the module-loss records themselves (not counted twice)."""
    from awqforge.plan import GIB, JobSettings, plan

    few = plan(LLAMA_70B, JobSettings(n_samples=16, seq_len=128, eval_enabled=False), device="cpu")
    many = plan(LLAMA_70B, JobSettings(n_samples=128, seq_len=512, eval_enabled=False), device="cpu")
    assert few.components["gram_matrices"] == 0
    assert few.components["kept_inputs"] == 4 * 2048 * (8192 + 28672)  # o_proj's and down_proj's inputs
    assert many.components["kept_inputs"] == 0
    assert many.components["gram_matrices"] == 4 * (
        3 * 8192**2 + 28672**2
    )  # one fp32 Gram per distinct input
    # the 70B block in fp32 with 2048 tokens fits a 24 GiB machine: weights 3.19 GiB plus gate/up candidates
    assert few.transient == "scale_search" and 6 * GIB < few.quantize_peak_bytes < 8 * GIB
    # GPTQ only where 4 calibration tokens or more reach each input channel: none of the layers at 2048 tokens
    few_near = plan(LLAMA_70B, JobSettings(n_samples=16, seq_len=128, rounding="nearest"), device="cpu")
    assert few.components == few_near.components  # few is the default, rounding=gptq
    gptq = plan(LLAMA_70B, JobSettings(n_samples=256, seq_len=512, rounding="gptq"), device="cpu")
    assert gptq.components["transient_quantize"] > 3 * 8 * 28672**2  # float64 factors of the widest input


def test_plan_endpoint_and_routing_by_need(service, make_key, config_models):
    from app.core.config import settings

    with service.client(make_key()) as c:
        r = c.get("/v1/plan", params={"model": config_models["llama-7b"], "n_samples": 128, "seq_len": 512})
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["fits"] and p["queue"] == "gpu-24g", p
        assert p["plan"]["device"] == "cuda" and p["plan"]["peak_bytes"] < settings.queue_classes["gpu-24g"]
        assert set(p["plans"]) == set(settings.queue_classes)
        assert set(p["live_queues"]) == set(settings.queue_classes)  # the test worker reads every queue

        body = {"model": config_models["llama-70b"], "calibration": {"n_samples": 128, "seq_len": 512}}
        r = c.post("/v1/plan", json=body)
        assert r.status_code == 200 and r.json()["queue"] == "gpu-80g", r.text
        r = c.post("/v1/plan", json={**body, "device": "cpu"})
        assert r.json()["queue"] == "cpu" and r.json()["plan"]["compute_dtype"] == "float32"

        # nothing is large enough: the plan says why, and a submit is refused with that reason
        huge = {**body, "calibration": {"n_samples": 4096, "seq_len": 8192}}
        r = c.post("/v1/plan", json=huge)
        assert r.status_code == 200 and not r.json()["fits"] and r.json()["queue"] is None
        assert "GiB" in r.json()["reason"]
        r = c.post("/v1/jobs", json=huge)
        assert r.status_code == 422, r.text
        assert "needs" in r.text and "gpu-80g" in r.text
        # bad settings are the spec's 422, as for a submit
        r = c.get("/v1/plan", params={"model": config_models["llama-7b"], "bits": 5})
        assert r.status_code == 422 and "bits" in r.text
        r = c.get("/v1/plan", params={"model": "/etc"})
        assert r.status_code == 422
    with service.client(None) as c:
        assert c.get("/v1/plan", params={"model": config_models["llama-7b"]}).status_code == 401


def test_plan_endpoint_counts_task_evaluation(service, make_key, config_models):
    body = {
        "model": config_models["llama-7b"],
        "calibration": {"n_samples": 16, "seq_len": 128},
        "device": "cpu",
    }
    with service.client(make_key()) as c:
        plain = c.post("/v1/plan", json=body).json()["plan"]
        r = c.post("/v1/plan", json={**body, "eval": {"tasks": [{"name": "awqforge_mc", "limit": 50}]}})
        assert r.status_code == 200, r.text
        p = r.json()["plan"]
    assert plain["peak_stage"] != "evaluate_tasks" and plain["evaluate_tasks_peak_bytes"] == 0
    assert p["peak_stage"] == "evaluate_tasks" and p["peak_bytes"] > plain["peak_bytes"]
    assert p["est_seconds_by_stage"]["evaluate_tasks"] > 0 and p["est_seconds"] > plain["est_seconds"]


def test_cpu_only_deployment_routes_everything_to_cpu(service, monkeypatch, config_models):
    """Configured with one cpu class (as docker-compose's default), every job goes there."""
    from app.core.config import settings
    from app.services.routing import RoutingError, route
    from awqforge.spec import JobSpec

    monkeypatch.setattr(settings, "QUEUE_CLASSES", "cpu=16GiB")
    monkeypatch.setattr(settings, "DEFAULT_QUEUE", "cpu")
    r = route(JobSpec(model=config_models["llama-7b"], calibration={"n_samples": 64, "seq_len": 256}))
    assert r.queue == "cpu" and r.plan["device"] == "cpu"
    assert route(JobSpec(model="someorg/unreachable-model")).queue == "cpu"  # no config: the default
    with pytest.raises(RoutingError, match="no GPU queue class"):
        route(JobSpec(model=config_models["llama-7b"], device="cuda"))
    with pytest.raises(RoutingError, match="needs"):  # 70B: ~35 GiB of codes alone for evaluation
        route(JobSpec(model=config_models["llama-70b"], device="cpu"))


def test_queue_classes_setting_is_checked():
    from app.core.config import Settings

    s = Settings(QUEUE_CLASSES="gpu-80g=80GiB, cpu=512GiB ,gpu-24g=24GB")
    assert list(s.queue_classes) == ["gpu-24g", "gpu-80g", "cpu"]  # smallest first
    assert s.queue_classes["gpu-24g"] == 24 * 10**9
    for bad in ("cpu", "cpu=lots", "c pu=1GiB", ""):
        with pytest.raises(ValueError, match="QUEUE_CLASSES"):
            Settings(QUEUE_CLASSES=bad)
    with pytest.raises(ValueError, match="DEFAULT_QUEUE"):
        Settings(QUEUE_CLASSES="cpu=8GiB", DEFAULT_QUEUE="gpu-80g")


def test_plan_command(tmp_path):
    """`awqforge plan MODEL ...` prints the same plan, from config.json alone."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    out = subprocess.run(
        [sys.executable, "-m", "awqforge", "plan", str(tmp_path), "--device", "cuda", "--json", "--no-eval"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)["cuda"]
    from awqforge.plan import JobSettings, plan

    assert p["peak_bytes"] == plan(LLAMA_70B, JobSettings(eval_enabled=False), device="cuda").peak_bytes
    assert p["peak_stage"] == "quantize" and p["compute_dtype"] == "bfloat16"
    text = subprocess.run(
        [sys.executable, "-m", "awqforge", "plan", str(tmp_path), "--n-samples", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "device cpu (float32)" in text and "device cuda (bfloat16)" in text and "time estimate" in text
    missing = subprocess.run(
        [sys.executable, "-m", "awqforge", "plan", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "config.json" in missing.stderr
