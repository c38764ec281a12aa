"""The `awqforge` command line, run as a user runs it (subprocess), plus plugin dispatch in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from awqforge import cli
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT, BUNDLED_EVAL_TEXT


def awqforge(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "awqforge", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def offline_env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }


def test_quantize_with_no_flags_works_offline(tiny_checkpoint, tmp_path):
    """`awqforge quantize MODEL` alone, with no network, on a model whose width (96) 128 and 64 do not divide:
    the group size falls back to 32 and says so, the calibration is the bundled text, the output folder is
    named after the model."""
    ckpt = tiny_checkpoint("llama", hidden_size=96)
    proc = awqforge("quantize", str(ckpt), cwd=tmp_path, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "group size 32, the largest that divides every quantized layer's input width" in proc.stderr
    assert "the default 128 does not divide the input width 96)" in proc.stderr
    out = tmp_path / f"{ckpt.name}-awq-w4-g32"
    assert f"artifact (awq): {out / 'awq'}" in proc.stdout
    report = json.loads((out / "awq" / "quant_report.json").read_text())
    assert report["settings"]["quant"]["group_size"] == 32
    assert report["settings"]["calibration"]["source"] == "bundled"

    # 3-bit: the format follows the bit width (awq is 4-bit only)
    proc = awqforge(
        "quantize", str(ckpt), "--bits", "3", "--out", str(tmp_path / "w3"), "--method", "rtn",
        "--eval-seq-len", "64", "--eval-max-seqs", "2", cwd=tmp_path, env=offline_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"artifact (compressed-tensors): {tmp_path / 'w3' / 'compressed-tensors'}" in proc.stdout
    assert not (tmp_path / "w3" / "awq").exists()
    # no 3-bit kernel: the evaluation says it runs the reference path, and what that costs
    assert "the quantized pass runs QuantLinear's pure-torch reference path (no 3-bit kernel" in proc.stderr
    assert "estimated" in proc.stderr
    proc = awqforge(
        "eval", str(tmp_path / "w3" / "compressed-tensors"), "--seq-len", "64", "--max-seqs", "2",
        "--device", "cpu", env=offline_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reference_path"] is True and result["s_per_window"] > 0
    assert "pure-torch reference path (no 3-bit kernel" in proc.stderr and "s per window" in proc.stderr


def test_help_shows_every_default():
    parser = cli.build_parser({})
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    for name in ("quantize", "plan", "eval"):
        text = " ".join(sub.choices[name].format_help().split())
        for action in sub.choices[name]._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                assert action.help, (name, action.option_strings)
                shown = f"(default: {action.default})" in text or "default:" in action.help
                assert shown, (name, action.option_strings)
        assert "(default: None)" not in text
    top = " ".join(cli.build_parser().format_help().split())
    assert "serve run the API" in top and "_command" not in top  # a sentence, not an entry point
    quantize = " ".join(sub.choices["quantize"].format_help().split())
    assert "(default: bundled)" in quantize and "(default: 4)" in quantize
    assert "pileval (the AWQ paper's Pile validation set, from the hub)" in quantize


def test_quantize_then_eval(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "out"
    proc = awqforge(
        "quantize",
        str(ckpt),
        "--out",
        str(out),
        "--group-size",
        "64",
        "--calib",
        f"file:{BUNDLED_CALIBRATION_TEXT}",
        "--n-samples",
        "8",
        "--seq-len",
        "64",
        "--n-grid",
        "6",
        "--rounding",
        "gptq",
        "--format",
        "awq",
        "--format",
        "compressed-tensors",
        "--device",
        "cpu",
        "--eval-seq-len",
        "64",
        "--eval-max-seqs",
        "2",
        "--packing",
        "per_sample",
        "--refine-steps",
        "0",
        "--search-screen",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"artifact (awq): {out / 'awq'}" in proc.stdout
    assert f"artifact (compressed-tensors): {out / 'compressed-tensors'}" in proc.stdout
    assert "nanobind" not in proc.stderr  # triton, not needed on a CPU, is not imported (cli.skip_triton_...)
    assert "perplexity: FP" in proc.stdout and "report:" in proc.stdout
    assert "block" in proc.stderr  # the tqdm bar over blocks
    assert "evaluate" in proc.stderr and "/4 windows" in proc.stderr  # 2 windows, FP and quantized passes
    report = json.loads((out / "awq" / "quant_report.json").read_text())
    assert report["settings"]["rounding"] == "gptq" and report["method"]["rounding"].startswith("GPTQ")
    assert report["settings"]["refine_steps"] == 0 and report["calibration"]["packing"] == "per_sample"
    assert (
        report["settings"]["search_screen"] == 2 and "the best 2 scored" in report["method"]["search_screen"]
    )
    assert report["evaluation"]["cost"]["windows"] == 2

    proc = awqforge(
        "eval",
        str(out / "awq"),
        "--text",
        str(BUNDLED_EVAL_TEXT),
        "--seq-len",
        "64",
        "--max-seqs",
        "2",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["quantized"] is True and result["perplexity"] > 1 and result["n_windows"] == 2
    assert "eval: 100%" in proc.stderr and "2/2" in proc.stderr  # a bar on stderr
    assert "C++ CPU INT4 kernel" in proc.stderr and result["reference_path"] is False

    proc = awqforge("eval", str(ckpt), "--seq-len", "64", "--max-seqs", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["quantized"] is False


def test_errors_and_exit_codes(tmp_path):
    proc = awqforge("quantize", str(tmp_path), "--out", str(tmp_path / "o"), "--bits", "5")
    assert proc.returncode == 2 and "bits must be one of" in proc.stderr
    proc = awqforge("quantize", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "model" in proc.stderr
    proc = awqforge("no-such-command")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = awqforge("quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    for flag, value in (("--packing", "random"), ("--refine-steps", "11"), ("--calib", "hf:a:b:c:d:e")):
        proc = awqforge("quantize", str(tmp_path), "--out", str(tmp_path / "o"), flag, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_unexpected_failures_are_one_readable_line(tiny_checkpoint, tmp_path):
    """A failure the engine did not foresee (here: a corrupt safetensors file) is one line, not a traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint("llama").iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    proc = awqforge(
        "quantize", str(broken), "--out", str(tmp_path / "o"), "--device", "cpu", "--method", "rtn"
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "awqforge quantize: error: " in proc.stderr


def test_plugins_are_dispatched_without_importing_the_service(monkeypatch):
    calls = []

    class FakeEntryPoint:
        name, value = "serve", "app.cli:serve_command"

        def load(self):
            return lambda argv: calls.append(argv) or 7

    monkeypatch.setattr(cli, "_plugins", lambda: {"serve": FakeEntryPoint()})
    assert cli.main(["serve", "--port", "1"]) == 7
    assert calls == [["--port", "1"]]

    code = "import sys, awqforge.cli as c; c.build_parser(); print(sorted(m for m in sys.modules if m.startswith(('app', 'worker'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "awqforge" in capsys.readouterr().out


def test_describe_gives_one_readable_line():
    from awqforge.errors import InputError, NumericalError, describe

    assert describe(InputError("group size 64 does not divide 100")) == "group size 64 does not divide 100"
    assert describe(NumericalError("block 3: NaN")) == "block 3: NaN"
    assert describe(ValueError("bad\n  thing")) == "unexpected ValueError: bad thing"
    assert describe(MemoryError()).startswith("out of memory")


def test_plan_counts_the_calibration_rows_the_source_holds(tiny_checkpoint):
    """The bundled text holds fewer 512-token rows than 1024: the job would use what there is, and the plan
    counts those (the same estimate as asking for that many), not the 1024 asked for."""
    ckpt = tiny_checkpoint("llama")
    asked = awqforge("plan", str(ckpt), "--device", "cpu", "--n-samples", "1024", "--json", env=offline_env())
    assert asked.returncode == 0, asked.stderr[-3000:]
    line = next(x for x in asked.stderr.splitlines() if "calibration:" in x and "plan counts" in x)
    used = int(line.split(" holds ")[1].split()[0])
    assert 4 <= used < 1024 and "(1024 asked)" in line
    same = awqforge(
        "plan", str(ckpt), "--device", "cpu", "--n-samples", str(used), "--json", env=offline_env()
    )
    assert same.returncode == 0 and "calibration:" not in same.stderr
    a, b = json.loads(asked.stdout)["cpu"], json.loads(same.stdout)["cpu"]
    assert a["est_seconds"] == b["est_seconds"] and a["peak_bytes"] == b["peak_bytes"]


def test_plan_counts_the_evaluation_windows_the_text_holds(tiny_checkpoint):
    """The built-in evaluation text holds a limited number of 2048-token windows: a job asking for more scores
    what there is, and the plan's evaluate stage counts those (the same estimate as asking for that many)."""
    ckpt = tiny_checkpoint("llama")

    def plan(max_seqs: int):
        run = awqforge(
            "plan",
            str(ckpt),
            "--device",
            "cpu",
            "--eval-max-seqs",
            str(max_seqs),
            "--json",
            env=offline_env(),
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return run, json.loads(run.stdout)["cpu"]

    asked, a = plan(100000)
    line = next(x for x in asked.stderr.splitlines() if "evaluation:" in x and "plan counts" in x)
    held = int(line.split(" holds ")[1].split()[0])
    assert 1 <= held < 100000 and "(100000 asked)" in line
    same, b = plan(held)
    assert "evaluation:" not in same.stderr
    assert a["est_seconds_by_stage"]["evaluate"] == b["est_seconds_by_stage"]["evaluate"] > 0
    fewer, c = plan(max(1, held // 2))
    assert c["est_seconds_by_stage"]["evaluate"] < b["est_seconds_by_stage"]["evaluate"]
