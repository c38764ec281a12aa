"""The `awqforge` command line, run as a user runs it (subprocess), plus plugin dispatch in process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from awqforge import cli
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT, BUNDLED_EVAL_TEXT


def awqforge(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "awqforge", *args], capture_output=True, text=True, timeout=timeout
    )


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
    assert "perplexity: FP" in proc.stdout and "report:" in proc.stdout
    assert "block" in proc.stderr  # the tqdm bar over blocks
    assert "evaluate" in proc.stderr and "step" in proc.stderr  # and the one over the evaluation
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
