"""Artifacts written with the installed transformers, loaded with another one (the project's floor, 5.4).

    python bench/bench_floor_load.py --python /tmp/tf54-venv/bin/python
    python bench/bench_floor_load.py --python $VENV/bin/python --out bench/results/floor_load.md

The engine may run one transformers and the user's server another. Per case, a tiny random checkpoint
(tests/tiny_models.py, tiny_families.py, tiny_multimodal.py) is quantized here (AWQ, W4 g32 symmetric,
compressed-tensors) and its logits are taken with AWQForge's loader; `--python` (an interpreter with the other
transformers, torch and compressed-tensors; it does not need AWQForge) loads each artifact with transformers'
default loading in a subprocess. "yes": its logits within 1% of ours (max difference relative to the largest
logit). The AWQ format is not in the set: transformers loads it only through gptqmodel, in any version.
The exit status is 1 when an artifact does not load where its source checkpoint does and nothing in NEEDS
explains it (CI: scripts/test_floor.sh runs this against the floor's virtualenv).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# (case, "module.builder" in tests/, model type); tiny_multimodal's load with AutoModelForImageTextToText
CASES = [
    ("llama (dense)", "tiny_models.build_tiny_model", "llama"),
    ("qwen3_moe (MoE, registry)", "tiny_models.build_tiny_model", "qwen3_moe"),
    ("mixtral (MoE, registry, renamed)", "tiny_models.build_tiny_model", "mixtral"),
    ("qwen3_5_text (hybrid)", "tiny_families.build_family_model", "qwen3_5_text"),
    ("qwen3_next (hybrid, MoE)", "tiny_families.build_family_model", "qwen3_next"),
    ("nemotron_h (hybrid, MoE)", "tiny_families.build_family_model", "nemotron_h"),
    ("gemma3 (multimodal)", "tiny_multimodal.build_tiny_multimodal", "gemma3"),
    ("mistral3 (multimodal)", "tiny_multimodal.build_tiny_multimodal", "mistral3"),
]
TOLERANCE = 1e-2
# Cases no layout we could write makes an older transformers read, with the first release that reads them
# (bench/README.md): before 5.13 nothing dequantizes compressed-tensors MoE experts (transformers fuses them on
# load; the packed per-expert tensors are left unread and the experts keep their random init).
NEEDS = {"MoE": ((5, 13), "quantized MoE experts are read from transformers 5.13 on")}


def load_with_this_transformers(jobs_file: Path, out_file: Path) -> None:
    """The subprocess: each artifact through transformers' default loading; logits or the error, per case."""
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    jobs = json.loads(jobs_file.read_text())
    ids = torch.load(jobs["ids"])
    out = {"transformers": transformers.__version__, "logits": {}, "errors": {}, "source_errors": {}}
    for case, (checkpoint, artifact, auto_class) in jobs["artifacts"].items():
        for folder, errors in ((checkpoint, out["source_errors"]), (artifact, out["errors"])):
            try:
                model = getattr(transformers, auto_class).from_pretrained(folder, dtype=torch.float32).eval()
                with torch.no_grad():
                    logits = model(input_ids=ids).logits.float()
            except Exception as exc:  # reported per case
                errors[case] = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        if case not in out["errors"]:
            out["logits"][case] = logits
    torch.save(out, out_file)


def write_artifacts(folder: Path, cases: list[tuple]) -> dict:
    """Checkpoints, artifacts and our loader's logits for `cases`."""
    import importlib

    import torch
    from conftest import train_tiny_tokenizer
    from tiny_models import tiny_input_ids

    import awqforge
    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    tokenizer = train_tiny_tokenizer()
    ids = tiny_input_ids(2, 16, seed=3)
    artifacts, ours = {}, {}
    for i, (case, builder, model_type) in enumerate(cases):
        ckpt = folder / f"ckpt-{i}"
        module, _, name = builder.partition(".")
        getattr(importlib.import_module(module), name)(model_type).save_pretrained(ckpt)
        multimodal = module == "tiny_multimodal"
        auto_class = "AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM"
        tokenizer.save_pretrained(ckpt)
        spec = JobSpec(
            model=str(ckpt),
            method="awq",
            quant={"bits": 4, "group_size": 32, "zero_point": False},
            calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
            formats=["compressed-tensors"],
            eval={"enabled": False},
            device="cpu",
            n_grid=4,
        )
        artifact = run_quantization(spec, folder / f"out-{i}").artifacts["compressed-tensors"]
        with torch.no_grad():
            ours[case] = awqforge.load_quantized(artifact, dtype=torch.float32)(input_ids=ids).logits.float()
        artifacts[case] = (str(ckpt), str(artifact), auto_class)
    torch.save(ids, folder / "ids.pt")
    return {"ids": str(folder / "ids.pt"), "artifacts": artifacts, "ours": ours}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="interpreter with the transformers to load with")
    ap.add_argument("--out", type=Path, help="write the table here (markdown)")
    ap.add_argument("--load", nargs=2, type=Path, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        load_with_this_transformers(*args.load)
        return 0
    if not args.python:
        ap.error("--python is required")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        made = write_artifacts(folder, CASES)
        jobs = folder / "jobs.json"
        jobs.write_text(json.dumps({"ids": made["ids"], "artifacts": made["artifacts"]}))
        cmd = [args.python, str(Path(__file__).resolve()), "--load", str(jobs), str(folder / "theirs.pt")]
        subprocess.run(cmd, check=True)
        theirs = torch.load(folder / "theirs.pt")
    lines = [
        f"Written with transformers {transformers.__version__} (torch {torch.__version__}), loaded with "
        f"transformers {theirs['transformers']} (`{args.python}`): AWQ W4 g32 symmetric, compressed-tensors",
        "",
        "| case | loads with the other transformers | max diff vs our loader | cosine |",
        "|---|---|---|---|",
    ]
    failed = 0
    version = tuple(int(p) for p in theirs["transformers"].split(".")[:2])
    for case, *_ in CASES:
        mine = made["ours"][case]
        got = theirs["logits"].get(case)
        needs = [why for key, (first, why) in NEEDS.items() if key in case and version < first]
        diff = cos = None
        if got is not None:
            diff = float((got - mine).abs().max() / mine.abs().max())
            cos = float(torch.nn.functional.cosine_similarity(got.flatten(), mine.flatten(), dim=0))
        if diff is not None and diff < TOLERANCE:
            verdict = "yes"
        elif case in theirs["source_errors"]:  # the config.json is the source's: not the artifact's doing
            verdict = f"no (the source checkpoint does not load either: {theirs['source_errors'][case]})"
        elif needs:
            verdict = f"no (expected: {needs[0]})"
        else:
            failed += 1
            verdict = f"no ({theirs['errors'].get(case, 'logits differ')})"
        figures = f"{diff:.2e} | {cos:.4f}" if diff is not None else " | "
        lines.append(f"| {case} | {verdict} | {figures} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
