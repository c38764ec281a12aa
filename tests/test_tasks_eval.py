"""Task evaluation with lm-evaluation-harness (awqforge.tasks_eval) on a tiny model and the bundled local tasks:
the real lm_eval.simple_evaluate over HFLM, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from awqforge.calibration import BUNDLED_EVAL_TEXT  # noqa: E402
from awqforge.errors import JobCancelled  # noqa: E402
from awqforge.formats.card import ModelCardInfo, render_card  # noqa: E402
from awqforge.pipeline import run_quantization  # noqa: E402
from awqforge.spec import JobSpec  # noqa: E402
from awqforge.tasks_eval import (  # noqa: E402
    BUILTIN_TASKS_DIR,
    FPScoreCache,
    TaskEvalError,
    TaskRequest,
    build_local_tasks,
    check_gate,
    compare,
    generate,
    recovery,
    resolve_tasks,
    run_tasks,
)


@pytest.fixture(scope="module")
def fp_model(tiny_checkpoint, one_thread):
    from awqforge.evaluate import load_fp_model

    folder = tiny_checkpoint("llama")
    return folder, load_fp_model(folder)


def test_bundled_tasks_are_built_from_the_bundled_text(tmp_path):
    counts = build_local_tasks(BUNDLED_EVAL_TEXT.read_text(), tmp_path)
    assert counts == {"awqforge_mc": 560, "awqforge_cloze": 560}  # >= 500 each (the benchmark's floor)
    for name in ("awqforge_mc.jsonl", "awqforge_cloze.jsonl", "awqforge_mc.yaml", "awqforge_cloze.yaml"):
        assert (tmp_path / name).read_bytes() == (BUILTIN_TASKS_DIR / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp_path / "awqforge_mc.jsonl").read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert {r["label"] for r in rows} == {0, 1, 2, 3}
    text = " ".join(BUNDLED_EVAL_TEXT.read_text().split())
    assert all(f"{r['context']} {r['choices'][r['label']]}" in text for r in rows[:50])


def test_local_tasks_run_through_lm_eval(fp_model, tiny_tokenizer):
    _, model = fp_model
    seen = []
    scores = run_tasks(
        model,
        tiny_tokenizer,
        [TaskRequest("awqforge_mc", limit=12), TaskRequest("awqforge_cloze", limit=10, num_fewshot=1)],
        on_task=seen.append,
    )
    assert seen == ["awqforge_mc", "awqforge_cloze"]
    mc, cloze = scores
    assert (mc.task, mc.metric, mc.n_samples) == ("awqforge_mc", "acc", 12)
    assert (cloze.task, cloze.metric, cloze.n_samples) == ("awqforge_cloze", "acc", 10)
    assert 0.0 <= mc.score <= 1.0 and mc.stderr is not None and mc.stderr >= 0
    assert "acc_norm" in mc.extra and "perplexity" in cloze.extra
    assert mc.tokens > 0 and cloze.tokens > 0 and mc.time_s > 0
    # 4 choices x 12 examples, each a (context + continuation) sequence: at least that many tokens run
    assert mc.tokens >= 48 * 20
    again = run_tasks(model, tiny_tokenizer, [TaskRequest("awqforge_mc", limit=12)])
    assert again[0].score == mc.score  # same model, same seed: the same answer
    rows = compare(scores, scores)
    assert [r["recovery"] for r in rows if r["fp"]] == [1.0] * len([r for r in rows if r["fp"]])


def test_a_task_folder_reads_its_data_next_to_its_yaml(fp_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "mytasks"
    folder.mkdir()
    rows = [{"q": f"Item {i} is", "choices": ["red", "blue"], "gold": i % 2} for i in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "colors.yaml").write_text(
        "task: my_colors\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tmp_path / "elsewhere").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path / "elsewhere")  # the data is found next to the YAML, not in the working directory
    try:
        (score,) = run_tasks(fp_model[1], tiny_tokenizer, [str(folder)])
    finally:
        os.chdir(cwd)
    assert (score.task, score.n_samples) == ("my_colors", 8)
    # the definition digest covers the data: a changed file is another task (another FP cache key)
    before = resolve_tasks([str(folder)])[0]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    after = resolve_tasks([str(folder)])[0]
    assert before.definition != after.definition
    assert before.cache_key("m") != after.cache_key("m") != after.cache_key("n")


def test_unreachable_data_and_unknown_tasks_fail_readably(fp_model, tiny_tokenizer, tmp_path):
    (tmp_path / "gone.yaml").write_text(
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: missing.jsonl\n"
        'test_split: test\noutput_type: loglikelihood\ndoc_to_text: "{{a}}"\ndoc_to_target: "{{b}}"\n'
    )
    with pytest.raises(TaskEvalError, match=r"task gone: its data could not be loaded"):
        run_tasks(fp_model[1], tiny_tokenizer, [str(tmp_path / "gone.yaml")])
    with pytest.raises(TaskEvalError, match="does not exist"):
        resolve_tasks([str(tmp_path / "nothing-here")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskEvalError, match="holds no lm-eval task definition"):
        resolve_tasks([str(tmp_path / "empty")])


def test_cancel_stops_inside_a_task(fp_model, tiny_tokenizer):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3  # a few forward calls in

    with pytest.raises(JobCancelled):
        run_tasks(fp_model[1], tiny_tokenizer, [TaskRequest("awqforge_mc", limit=200)], cancel=cancel)
    assert len(calls) == 4
    calls.clear()  # and in the side-by-side generations: before every new token
    with pytest.raises(JobCancelled):
        generate(fp_model[1], tiny_tokenizer, ["The License", "Once"], max_new_tokens=50, cancel=cancel)
    assert len(calls) == 4
    assert len(generate(fp_model[1], tiny_tokenizer, ["Once"], max_new_tokens=3, cancel=lambda: False)) == 1


def test_cancel_stops_while_lm_eval_builds_the_requests(fp_model, tiny_tokenizer):
    """lm-eval builds and tokenizes every request before its first forward (seconds to minutes): a cancel
    then stops it there, no forward run."""
    forwards = []
    handle = fp_model[1].register_forward_pre_hook(lambda *_: forwards.append(1))
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2  # after the task's data is loaded, at its second example

    try:
        with pytest.raises(JobCancelled):
            run_tasks(fp_model[1], tiny_tokenizer, [TaskRequest("awqforge_mc", num_fewshot=5)], cancel=cancel)
    finally:
        handle.remove()
    assert len(calls) == 3 and forwards == []


def test_the_registry_index_is_built_once_per_process(monkeypatch):
    """A registry task is resolved when the job starts and again when it runs (and the API checks names):
    lm-eval's full task index is built for the first of them only."""
    import lm_eval.tasks

    from awqforge import tasks_eval
    from awqforge.pipeline import _resolve_eval_tasks

    built = []

    class CountingTaskManager(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            if kwargs.get("include_defaults", True):
                built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    tasks_eval.registry_manager.cache_clear()
    try:
        spec = JobSpec(model="org/m", eval={"tasks": [{"name": "hellaswag", "limit": 4}]})
        (item,) = _resolve_eval_tasks(spec, allowed_roots=None)  # at the job's start
        assert (item.task, item.config) == ("hellaswag", "hellaswag")
        # at its run: evaluate_models' own resolver, the manager simple_evaluate gets; then the API's check
        assert [t.task for t in resolve_tasks(["hellaswag"], tasks_eval.TaskResolver())] == ["hellaswag"]
        assert tasks_eval.TaskResolver().manager() is tasks_eval.registry_manager()
        assert "hellaswag" in tasks_eval.known_task_names()
        assert len(built) == 1
    finally:
        tasks_eval.registry_manager.cache_clear()  # not the counting subclass for later tests


def test_gate_names_the_task_and_the_figures():
    rows = [
        {"task": "a", "metric": "acc", "fp": 0.5, "quantized": 0.45, "recovery": 0.9},
        {"task": "b", "metric": "acc", "fp": 0.4, "quantized": 0.4, "recovery": 1.0},
    ]
    assert check_gate(None, rows, 10.0, 11.0) == []
    assert check_gate({"min_recovery": 0.9}, rows, None, None) == []
    (reason,) = check_gate({"min_recovery": 0.95}, rows, None, None)
    assert reason == "task a: recovery 0.900 < 0.95 (acc FP 0.5000, quantized 0.4500)"
    (reason,) = check_gate({"min_avg_recovery": 0.96}, rows, None, None)
    assert reason.startswith("average recovery 0.950 over 2 tasks < 0.96")
    (reason,) = check_gate({"max_perplexity_increase": 0.05}, [], 10.0, 11.0)
    assert "perplexity rose 10.0%" in reason and "FP 10.000, quantized 11.000" in reason
    assert recovery(0.5, 0.25) == 0.5 and recovery(10.0, 20.0, higher_is_better=False) == 0.5


def _spec(model: Path, **eval_extra) -> JobSpec:
    return JobSpec(
        model=str(model),
        method="rtn",
        quant={"bits": 4, "group_size": 64},
        formats=["awq"],
        eval={"seq_len": 64, "max_seqs": 2, **eval_extra},
        device="cpu",
    )


def test_pipeline_reports_tasks_gate_card_and_reuses_fp_scores(fp_model, tmp_path):
    folder, _ = fp_model
    tasks = [{"name": "awqforge_mc", "limit": 10}, {"name": "awqforge_cloze", "limit": 10}]
    cache = FPScoreCache()
    events = []
    spec = _spec(folder, tasks=tasks, prompts=["The License"], max_new_tokens=4, gate={"min_recovery": 5.0})
    result = run_quantization(spec, tmp_path / "a", fp_task_cache=cache, progress=events.append)

    report = json.loads(result.report_path.read_text())
    ev = report["evaluation"]
    assert [r["task"] for r in ev["tasks"]] == ["awqforge_mc", "awqforge_cloze"]
    for r in ev["tasks"]:
        assert {"task", "metric", "fp", "quantized", "stderr", "recovery"} <= set(r)
        assert r["recovery"] == pytest.approx(r["quantized"] / r["fp"]) if r["fp"] else r["recovery"] is None
        assert r["fp_cached"] is False
    assert ev["generations"][0]["prompt"] == "The License"
    assert set(ev["generations"][0]) == {"prompt", "fp", "quantized"}
    # a gate nobody can meet: the job's artifacts are written, and the result says why they fall short
    assert result.quality_failure.startswith("quality gate not met: task awqforge_")
    assert ev["gate"]["passed"] is False and ev["gate"]["reasons"]
    assert (result.artifacts["awq"] / "model.safetensors").is_file()
    card = (result.artifacts["awq"] / "README.md").read_text()
    assert "| task | metric | FP | quantized | recovery |" in card
    assert "| awqforge_mc | acc |" in card and "did not pass its quality gate" in card
    assert "**Prompt:** The License" in card
    steps = [e for e in events if e.stage == "evaluate" and e.message.startswith("tasks:")]
    assert steps and steps[-1].step == steps[-1].n_steps == 5  # 2 tasks x 2 models + generations
    # the job's ETA at the end of the perplexity windows still holds the tasks (the plan's model)
    windows = [e for e in events if e.stage == "evaluate" and "quantized pass" in e.message]
    assert windows[-1].step == windows[-1].n_steps and windows[-1].eta_s > 0

    # the same model, tasks and settings again: the FP scores come from the cache, the report says so
    again = run_quantization(_spec(folder, tasks=tasks, prompts=[]), tmp_path / "b", fp_task_cache=cache)
    ev2 = json.loads(again.report_path.read_text())["evaluation"]
    assert ev2["fp_cache_used"] == ["awqforge_cloze", "awqforge_mc"]
    assert [r["fp"] for r in ev2["tasks"]] == [r["fp"] for r in ev["tasks"]]
    assert all(r["fp_cached"] for r in ev2["tasks"]) and again.quality_failure is None
    assert ev2["generations"] == []


def test_pipeline_refuses_unknown_tasks_before_quantizing(fp_model, tmp_path):
    from awqforge.errors import InputError

    with pytest.raises(InputError, match="no lm-eval task definition|does not exist"):
        run_quantization(_spec(fp_model[0], tasks=[{"name": str(tmp_path / "none.yaml")}]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_card_without_tasks_has_no_task_section():
    info = ModelCardInfo(base_model="org/m", fp_perplexity=10.0, quant_perplexity=11.0)
    text = render_card(
        info,
        fmt="awq",
        bits=4,
        group_size=64,
        zero_point=True,
        unquantized=[],
        source_meta={},
        has_chat_template=False,
    )
    assert "Tasks (lm-evaluation-harness)" not in text and "quality gate" not in text


def test_cli_quantize_with_eval_tasks_prints_the_table(fp_model, tmp_path, capsys):
    from awqforge.cli import main

    folder, _ = fp_model
    argv = [
        "quantize", str(folder), "--method", "rtn", "--group-size", "64", "--device", "cpu",
        "--eval-seq-len", "64", "--eval-max-seqs", "1", "--out", str(tmp_path / "out"),
        "--eval-task", "awqforge_mc", "--eval-task", str(BUILTIN_TASKS_DIR / "awqforge_cloze.yaml"),
        "--eval-limit", "6",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out[out.index("task ") :].splitlines()
    assert lines[0].split() == ["task", "metric", "FP", "quantized", "recovery"]
    assert lines[1].split()[:2] == ["awqforge_mc", "acc"] and lines[2].split()[:2] == [
        "awqforge_cloze",
        "acc",
    ]
    report = json.loads((tmp_path / "out" / "awq" / "quant_report.json").read_text())
    assert [t["n_samples"] for t in report["evaluation"]["tasks"]] == [6, 6]
