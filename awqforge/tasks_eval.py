"""Task evaluation with lm-evaluation-harness: the FP and the quantized model on the same tasks, side by side.

The tasks run through the real `lm_eval.simple_evaluate` over its Hugging Face wrapper (`HFLM`), handed the
model this process already holds; nothing here re-implements a metric. A task is named as lm-eval knows it
(`hellaswag`), as one of the bundled local tasks (`awqforge_mc`, `awqforge_cloze`: awqforge/data/tasks/, built
from the bundled evaluation text, no download), or by a folder or YAML file of lm-eval task definitions.
Relative `data_files` in a local task's YAML are read from the YAML's own folder (lm-eval would read them from
the working directory).

Per task: the primary metric (the first of the task's metric list), the FP and the quantized score, the
quantized score's stderr, and recovery = quantized / FP (FP / quantized for a metric where lower is better,
so that below 1 always means worse), with the time and the tokens each model spent. lm_eval, transformers
and torch are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from awqforge.errors import InputError, JobCancelled
from awqforge.limits import TASK_BATCH_SIZE

BUILTIN_TASKS_DIR = Path(__file__).parent / "data" / "tasks"
BUILTIN_TASKS = ("awqforge_mc", "awqforge_cloze")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Quantization of neural networks reduces",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
)


class TaskEvalError(InputError):
    """A task that cannot be evaluated (unknown name, unreadable definition, data that cannot be reached)."""


@dataclass
class TaskRequest:
    """One task to run: lm-eval name, bundled task or path; `limit` examples (None: all), few-shot, seed."""

    name: str
    limit: int | None = None
    num_fewshot: int | None = None
    seed: int = 0

    @classmethod
    def of(cls, obj) -> TaskRequest:
        if isinstance(obj, TaskRequest):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        get = obj.get if isinstance(obj, dict) else lambda k, d=None: getattr(obj, k, d)
        return cls(get("name"), get("limit"), get("num_fewshot"), get("seed", 0) or 0)

    def settings(self) -> dict:
        return {"limit": self.limit, "num_fewshot": self.num_fewshot, "seed": self.seed}


@dataclass
class TaskScore:
    """One model's result on one task."""

    task: str
    metric: str
    score: float
    stderr: float | None
    higher_is_better: bool
    n_samples: int
    time_s: float
    tokens: int
    definition: str = ""  # sha256 of the task's resolved definition (the FP cache key uses it)
    extra: dict = field(default_factory=dict)  # the task's other metrics

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "metric": self.metric,
            "score": self.score,
            "stderr": self.stderr,
            "higher_is_better": self.higher_is_better,
            "n_samples": self.n_samples,
            "time_s": self.time_s,
            "tokens": self.tokens,
            "definition": self.definition,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskScore:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def is_task_path(name: str) -> bool:
    """A task given as a path (a folder or YAML file of task definitions) rather than a name."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".yaml", ".yml"))


# -- the bundled local tasks ------------------------------------------------------------------------------


def build_local_tasks(text: str, out_dir: str | Path, *, n_examples: int = 560, seed: int = 1234) -> dict:
    """Write the bundled tasks (lm-eval YAML + jsonl) built from `text`, deterministic for a given text and seed.

    awqforge_mc: a 20-word context and four 6-word continuations, one of them the text's own (the others
    taken from elsewhere in the text), metric acc. awqforge_cloze: a 24-word context and the text's next word
    (LAMBADA-style), metric acc (the word is the greedy continuation), also perplexity.
    Returns {task: number of examples}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    rng = random.Random(seed)

    mc_rows, span = [], 26
    starts = list(range(0, len(words) - span, span))
    for i, s in enumerate(starts[:n_examples]):
        context = " ".join(words[s : s + 20])
        true = " ".join(words[s + 20 : s + 26])
        others = [o for o in starts if abs(o - s) > span]
        distractors = []
        while len(distractors) < 3:
            o = rng.choice(others) + 20
            cand = " ".join(words[o : o + 6])
            if cand != true and cand not in distractors:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [true] + distractors[label:]
        mc_rows.append({"id": i, "context": context, "choices": choices, "label": label})

    cloze_rows, pos = [], 0
    while len(cloze_rows) < n_examples and pos + 25 < len(words):
        target = words[pos + 24]
        if re.fullmatch(r"[A-Za-z]{3,}", target):
            cloze_rows.append(
                {"id": len(cloze_rows), "context": " ".join(words[pos : pos + 24]), "target": target}
            )
            pos += 25
        else:
            pos += 1

    for name, rows in (("awqforge_mc", mc_rows), ("awqforge_cloze", cloze_rows)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "awqforge_mc.yaml").write_text(_MC_YAML)
    (out / "awqforge_cloze.yaml").write_text(_CLOZE_YAML)
    return {"awqforge_mc": len(mc_rows), "awqforge_cloze": len(cloze_rows)}


_MC_YAML = """\
# Built by awqforge.tasks_eval.build_local_tasks from awqforge/data/eval_en.txt: pick the text's own
# continuation among four. Relative data_files are read from this folder.
task: awqforge_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: awqforge_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_CLOZE_YAML = """\
# Built by awqforge.tasks_eval.build_local_tasks from awqforge/data/eval_en.txt: the text's next word after
# 24 words (LAMBADA-style). Relative data_files are read from this folder.
task: awqforge_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: awqforge_cloze.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


# -- resolving a task request into lm-eval task configs -----------------------------------------------------


def _load_yaml(path: Path) -> dict:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # lm-eval before the task index rewrite
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(str(path), mode="full")
    return load_yaml(path, resolve_func=True)


def _local_configs(path: Path) -> list[tuple[str, dict, str]]:
    """(task name, config with data_files made absolute, sha256 of the definition) of every task YAML in a
    folder (recursively) or of one YAML file."""
    files = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
    found = []
    for f in files:
        if f.suffix not in (".yaml", ".yml"):
            continue
        try:
            cfg = _load_yaml(f)
        except Exception as exc:  # noqa: BLE001 - any YAML error is the definition's fault
            raise TaskEvalError(f"task definition {f} cannot be read: {exc}") from None
        if not isinstance(cfg.get("task"), str):
            continue  # an include-only file or a group: not a task of its own
        digest = hashlib.sha256(f.read_bytes())
        kwargs = cfg.get("dataset_kwargs") or {}
        files_cfg = kwargs.get("data_files")
        if files_cfg is not None:
            kwargs = dict(kwargs)
            kwargs["data_files"] = _absolute_files(files_cfg, f.parent, digest)
            cfg = {**cfg, "dataset_kwargs": kwargs}
        found.append((cfg["task"], cfg, digest.hexdigest()))
    if not found:
        raise TaskEvalError(f"{path} holds no lm-eval task definition (a YAML file with a `task:` key)")
    return found


def _absolute_files(files, base: Path, digest):
    if isinstance(files, dict):
        return {k: _absolute_files(v, base, digest) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute_files(v, base, digest) for v in files]
    p = Path(str(files)).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_file():  # the data is part of the definition: a changed file is another task
        digest.update(p.read_bytes())
    return str(p)


@functools.lru_cache(maxsize=1)
def registry_manager():
    """lm-eval's TaskManager over its whole registry, built once per process: indexing every task YAML takes
    seconds to a minute, and a job would otherwise build it when its tasks are resolved and again when they
    run (and the next job in the same worker once more). The index is read-only once built."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


class TaskResolver:
    """Turns task requests into lm-eval configs; the registry's index is built only if a name needs it."""

    def manager(self):
        return registry_manager()

    def resolve(self, req: TaskRequest) -> list[tuple[str, object, str]]:
        """[(task name, config dict or registry name, definition digest)] of one request."""
        name = req.name
        if name in BUILTIN_TASKS:
            return [c for c in _local_configs(BUILTIN_TASKS_DIR / f"{name}.yaml")]
        if is_task_path(name):
            path = Path(name).expanduser()
            if not path.exists():
                raise TaskEvalError(f"task path {name} does not exist")
            return _local_configs(path)
        manager = self.manager()
        if name not in manager.all_tasks:
            raise TaskEvalError(
                f"{name!r} is not an lm-eval task, group or tag, a bundled task ({', '.join(BUILTIN_TASKS)}) "
                "or a path to task definitions"
            )
        import lm_eval

        return [(name, name, f"lm-eval {lm_eval.__version__}")]


def known_task_names() -> set[str]:
    """Every name lm-eval's registry knows (tasks, groups, tags); reads YAML only, imports no torch."""
    return set(registry_manager().all_tasks)


# -- running -------------------------------------------------------------------------------------------------


class _Meter:
    """Counts the tokens a model runs forward and checks for cancellation before every forward call."""

    def __init__(self, model, cancel: Callable[[], bool] | None) -> None:
        self.tokens = 0
        self.cancel = cancel

        def hook(_module, args, kwargs):
            self.check()
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and hasattr(ids, "numel"):
                self.tokens += int(ids.numel())

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise JobCancelled("the job was cancelled during task evaluation")

    def checked(self, fn: Callable) -> Callable:
        """fn, checking for cancellation first. lm-eval builds and tokenizes every request of a task before
        its first forward: 17 s for the 560 five-shot examples of awqforge_mc on a loaded CPU, minutes for a
        large registry task, and no forward to check in."""

        def call(*args, **kwargs):
            self.check()
            return fn(*args, **kwargs)

        return call

    def close(self) -> None:
        self.handle.remove()


@dataclass
class ResolvedTask:
    request: TaskRequest
    task: str  # the lm-eval task name
    config: object  # the registry name, or the config dict of a local definition
    definition: (
        str  # sha256 of the definition (and its local data), or the lm-eval version for a registry task
    )

    def cache_key(self, model_key: str) -> str:
        """The FP score's identity: the model (revision), the task's definition and its settings."""
        payload = json.dumps(
            {"model": model_key, "task": self.task, "definition": self.definition, **self.request.settings()},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def resolve_tasks(requests: Sequence, resolver: TaskResolver | None = None) -> list[ResolvedTask]:
    """Every request's lm-eval tasks (a folder may hold several); TaskEvalError names the one that fails."""
    resolver = resolver or TaskResolver()
    out = []
    for raw in requests:
        if isinstance(raw, ResolvedTask):
            out.append(raw)
            continue
        req = TaskRequest.of(raw)
        out.extend(ResolvedTask(req, name, cfg, digest) for name, cfg, digest in resolver.resolve(req))
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence,
    *,
    batch_size: int = TASK_BATCH_SIZE,
    resolver: TaskResolver | None = None,
    cancel: Callable[[], bool] | None = None,
    on_task: Callable[[str], None] | None = None,
) -> list[TaskScore]:
    """Every task (ResolvedTask, or requests resolved here) on `model`, an in-memory transformers causal LM,
    through lm_eval.simple_evaluate over HFLM. Raises TaskEvalError (readable) when a task cannot be resolved
    or its data cannot be loaded, JobCancelled when `cancel()` turns true (checked before every forward,
    every example's requests and every request's tokenization)."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    resolver = resolver or TaskResolver()
    items = [t if isinstance(t, ResolvedTask) else None for t in tasks]
    if any(i is None for i in items):
        items = resolve_tasks(tasks, resolver)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    meter = _Meter(model, cancel)
    lm.tok_encode = meter.checked(lm.tok_encode)  # per request, while lm-eval tokenizes them all
    scores: list[TaskScore] = []
    # simple_evaluate ends by collecting torch's environment report (collect_env: ~15 s of subprocesses per
    # call on a loaded CPU, twice per task); the report records the versions that matter itself.
    env_info = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = _versions_only
    # Bootstrapped stderrs (perplexity & co.) in this process: lm-eval's default pool of cpu_count processes
    # cannot start in a daemonic worker process (Celery's) and would fork one holding the model.
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        for item in items:
            req = item.request
            if on_task is not None:
                on_task(item.task)
            meter.check()
            task_obj = _load_task(resolver, item.task, item.config)
            if hasattr(task_obj, "construct_requests"):  # per example, while lm-eval builds the requests
                task_obj.construct_requests = meter.checked(task_obj.construct_requests)
            tokens0, t0 = meter.tokens, time.perf_counter()
            try:
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task_obj],
                    num_fewshot=req.num_fewshot,
                    limit=req.limit,
                    log_samples=False,
                    bootstrap_iters=1000,
                    random_seed=req.seed,
                    numpy_random_seed=req.seed,
                    torch_random_seed=req.seed,
                    fewshot_random_seed=req.seed,
                    task_manager=resolver.manager() if isinstance(item.config, str) else _empty_manager(),
                )
            except JobCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - lm-eval's own errors, made readable
                raise TaskEvalError(f"task {item.task}: lm-eval failed: {type(exc).__name__}: {exc}") from exc
            scores.append(
                _score(out, item.task, time.perf_counter() - t0, meter.tokens - tokens0, item.definition)
            )
    finally:
        lm_eval.evaluator.add_env_info = env_info
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
        meter.close()
    return scores


class FPScoreCache:
    """Where FP scores are kept across jobs (the service's is a Postgres table): get(key) -> dict | None
    (a TaskScore.to_dict()) and put(key, dict). This one holds them in memory."""

    def __init__(self) -> None:
        self.scores: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        return self.scores.get(key)

    def put(self, key: str, score: dict) -> None:
        self.scores[key] = score


def evaluate_models(
    load_fp: Callable[[], object],
    load_quantized: Callable[[], object],
    tokenizer,
    requests: Sequence,
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    fp_cache=None,
    model_key: str | None = None,
    batch_size: int = TASK_BATCH_SIZE,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The report's `evaluation` additions: {"tasks": compare() rows, "generations": [{prompt, fp,
    quantized}], "cost": {...}}. The FP model is loaded (load_fp) only when a task's FP score is not in
    `fp_cache` under `model_key` or there are prompts; each model is freed before the next is loaded."""
    import gc

    log = log or (lambda _m: None)
    resolver = TaskResolver()
    items = resolve_tasks(requests, resolver)
    prompts = list(DEFAULT_PROMPTS if prompts is None and items else (prompts or []))
    total = 2 * len(items) + (1 if prompts else 0)
    done = 0

    def step(label: str) -> None:
        if progress is not None:
            progress(label, done, total)

    started = time.perf_counter()
    fp_scores: dict[str, TaskScore] = {}
    cached: set[str] = set()
    if fp_cache is not None and model_key:
        for item in items:
            hit = fp_cache.get(item.cache_key(model_key))
            if hit:
                fp_scores[item.task] = TaskScore.from_dict(hit)
                cached.add(item.task)
                log(f"task {item.task}: FP score from the cache ({hit['metric']} {hit['score']:.4f})")
    missing = [i for i in items if i.task not in fp_scores]
    done = len(items) - len(missing)
    fp_gen: list[str] = []
    if missing or prompts:
        model = load_fp()
        try:
            for score in run_tasks(
                model,
                tokenizer,
                missing,
                batch_size=batch_size,
                resolver=resolver,
                cancel=cancel,
                on_task=lambda n: step(f"FP {n}"),
            ):
                fp_scores[score.task] = score
                done += 1
                log(f"task {score.task}: FP {score.metric} {score.score:.4f}")
                if fp_cache is not None and model_key:
                    item = next(i for i in missing if i.task == score.task)
                    fp_cache.put(item.cache_key(model_key), score.to_dict())
            if prompts:
                fp_gen = generate(model, tokenizer, prompts, max_new_tokens, cancel)
        finally:
            del model
            gc.collect()
    fp_s = time.perf_counter() - started
    model = load_quantized()
    try:
        q_scores = []
        for score in run_tasks(
            model,
            tokenizer,
            items,
            batch_size=batch_size,
            resolver=resolver,
            cancel=cancel,
            on_task=lambda n: step(f"quantized {n}"),
        ):
            q_scores.append(score)
            done += 1
            log(f"task {score.task}: quantized {score.metric} {score.score:.4f}")
        q_gen = generate(model, tokenizer, prompts, max_new_tokens, cancel) if prompts else []
    finally:
        del model
        gc.collect()
    done = total
    step("done")
    rows = compare([fp_scores[i.task] for i in items if i.task in fp_scores], q_scores, cached)
    wall = time.perf_counter() - started
    return {
        "tasks": rows,
        "generations": [
            {"prompt": p, "fp": f, "quantized": q} for p, f, q in zip(prompts, fp_gen, q_gen, strict=True)
        ],
        "fp_cache_used": sorted(cached),
        "cost": {
            "wall_s": round(wall, 3),
            "fp_s": round(fp_s, 3),
            "quantized_s": round(wall - fp_s, 3),
            "tokens": sum(
                (r["tokens"]["quantized"] or 0) + (0 if r["fp_cached"] else r["tokens"]["fp"] or 0)
                for r in rows
            ),
        },
    }


def _versions_only(storage: dict) -> None:
    import lm_eval
    import torch
    import transformers

    storage.update(
        lm_eval_version=lm_eval.__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )


@functools.lru_cache(maxsize=1)
def _empty_manager():
    """simple_evaluate is handed built Task objects; this manager (no index to build) only carries them."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def _load_task(resolver: TaskResolver, name: str, config):
    """The lm-eval Task object (its data loaded now, so that unreachable data fails here, readably)."""
    manager = resolver.manager() if isinstance(config, str) else _empty_manager()
    try:
        if hasattr(manager, "load"):
            built = manager.load([config])["tasks"]
        else:  # lm-eval before 0.4.10
            built = manager.load_task_or_group([config])
    except Exception as exc:  # noqa: BLE001 - offline hub, missing file, bad dataset: one readable line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskEvalError(
            f"task {name}: its data could not be loaded ({type(exc).__name__}: {reason[:300]})"
        ) from None
    tasks = list(built.values())
    return tasks[0] if len(tasks) == 1 and not isinstance(tasks[0], dict) else config


def _score(out: dict, name: str, wall: float, tokens: int, definition: str) -> TaskScore:
    results = out["results"]
    entry = results.get(name) or next(iter(results.values()))
    config = (out.get("configs") or {}).get(name) or {}
    metric_list = config.get("metric_list") or []
    wanted = (
        metric_list[0]["metric"] if metric_list and isinstance(metric_list[0].get("metric"), str) else None
    )
    keys = [k for k in entry if "," in k and "_stderr," not in k]
    if not keys:
        raise TaskEvalError(f"task {name}: lm-eval returned no metric")
    key = next((k for k in keys if k.split(",")[0] == wanted), keys[0])
    metric = key.split(",")[0]
    stderr = entry.get(key.replace(",", "_stderr,", 1))
    hib = (out.get("higher_is_better") or {}).get(name, {}).get(metric, True)
    n = (out.get("n-samples") or {}).get(name, {}).get("effective")
    extra = {k.split(",")[0]: _num(v) for k, v in entry.items() if k in keys and k != key}
    return TaskScore(
        task=name,
        metric=metric,
        score=_num(entry[key]),
        stderr=_num(stderr),
        higher_is_better=bool(hib if hib is not None else True),
        n_samples=int(n) if n is not None else 0,
        time_s=round(wall, 3),
        tokens=tokens,
        definition=definition,
        extra=extra,
    )


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def recovery(fp: float | None, quantized: float | None, higher_is_better: bool = True) -> float | None:
    """quantized / FP (FP / quantized where lower is better): below 1 is a loss either way."""
    if fp is None or quantized is None:
        return None
    num, den = (quantized, fp) if higher_is_better else (fp, quantized)
    return None if den == 0 else num / den


def compare(
    fp: Sequence[TaskScore], quantized: Sequence[TaskScore], cached: set[str] = frozenset()
) -> list[dict]:
    """The report's rows: {task, metric, fp, quantized, stderr, fp_stderr, recovery, ...} per task."""
    by_task = {s.task: s for s in fp}
    rows = []
    for q in quantized:
        f = by_task.get(q.task)
        rows.append(
            {
                "task": q.task,
                "metric": q.metric,
                "fp": f.score if f else None,
                "quantized": q.score,
                "stderr": q.stderr,
                "fp_stderr": f.stderr if f else None,
                "recovery": recovery(f.score if f else None, q.score, q.higher_is_better),
                "higher_is_better": q.higher_is_better,
                "n_samples": q.n_samples,
                "fp_cached": q.task in cached,
                "time_s": {"fp": f.time_s if f else None, "quantized": q.time_s},
                "tokens": {"fp": f.tokens if f else None, "quantized": q.tokens},
            }
        )
    return rows


def check_gate(
    gate, rows: Sequence[dict], fp_perplexity: float | None, quant_perplexity: float | None
) -> list[str]:
    """Why a job misses its gate (empty: it passes). `gate` has min_recovery (every task), min_avg_recovery
    (the mean over tasks) and max_perplexity_increase (relative: 0.05 = +5%), any of them None."""
    if gate is None:
        return []
    get = gate.get if isinstance(gate, dict) else lambda k: getattr(gate, k, None)
    reasons = []
    per_task = get("min_recovery")
    recs = [r for r in rows if r.get("recovery") is not None]
    if per_task is not None:
        for r in recs:
            if r["recovery"] < per_task:
                reasons.append(
                    f"task {r['task']}: recovery {r['recovery']:.3f} < {per_task} "
                    f"({r['metric']} FP {r['fp']:.4f}, quantized {r['quantized']:.4f})"
                )
    avg = get("min_avg_recovery")
    if avg is not None and recs:
        mean = sum(r["recovery"] for r in recs) / len(recs)
        if mean < avg:
            reasons.append(f"average recovery {mean:.3f} over {len(recs)} tasks < {avg}")
    ppl = get("max_perplexity_increase")
    if ppl is not None and fp_perplexity and quant_perplexity:
        rise = quant_perplexity / fp_perplexity - 1
        if rise > ppl:
            reasons.append(
                f"perplexity rose {rise:.1%} (FP {fp_perplexity:.3f}, quantized {quant_perplexity:.3f}) > {ppl:.1%}"
            )
    return reasons


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    cancel: Callable[[], bool] | None = None,
) -> list[str]:
    """Greedy continuations of each prompt (the prompt itself left out). `cancel` is checked before every
    forward (every new token): 16 prompts of 512 tokens on a large model run for hours on a CPU."""
    import torch

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    outs = []
    meter = _Meter(model, cancel)
    with torch.no_grad(), contextlib.closing(meter):
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            gen = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
            )
            outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: task, metric, FP, quantized (± stderr), recovery."""
    lines = [f"{'task':<24} {'metric':<12} {'FP':>8} {'quantized':>18} {'recovery':>9}"]
    for r in rows:
        fp = "-" if r.get("fp") is None else f"{r['fp']:.4f}"
        q = "-" if r.get("quantized") is None else f"{r['quantized']:.4f}"
        if r.get("stderr") is not None:
            q += f" ± {r['stderr']:.4f}"
        rec = "-" if r.get("recovery") is None else f"{r['recovery']:.3f}"
        lines.append(f"{r['task']:<24} {r['metric']:<12} {fp:>8} {q:>18} {rec:>9}")
    return "\n".join(lines)
