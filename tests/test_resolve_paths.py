"""The one local-path resolver (awqforge.resolve.resolve_local_path): roots enforced after `..` and symlinks,
hub-id-shaped values never read from disk, messages that reveal nothing of the server's disk."""

from __future__ import annotations

import pytest

from awqforge.errors import InputError
from awqforge.resolve import (
    PathNotAllowed,
    is_local_reference,
    resolve_local_path,
    resolve_model,
    resolve_spec_paths,
)
from awqforge.spec import JobSpec


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.txt").write_text("hello")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text('{"field_a": 1, "field_b": 2}\n')
    (root / "link-out").symlink_to(tmp_path / "outside")
    (root / "link-in").symlink_to(root / "sub")
    return root, tmp_path / "outside"


def test_inside_the_roots_is_the_real_path(roots):
    root, _ = roots
    assert resolve_local_path(root / "sub" / "ok.txt", [root]) == (root / "sub" / "ok.txt").resolve()
    assert resolve_local_path(f"{root}/link-in/ok.txt", [root]) == (root / "sub" / "ok.txt").resolve()
    assert resolve_local_path(f"{root}/sub/../sub/ok.txt", [root]).name == "ok.txt"
    assert resolve_local_path("sub/ok.txt", [root], base=root).name == "ok.txt"
    # a path that does not exist yet, inside the roots, is still inside
    assert resolve_local_path(f"{root}/sub/missing", [root]).name == "missing"


@pytest.mark.parametrize(
    "name",
    [
        "link-out/secret.jsonl",
        "link-out/missing.jsonl",
        "../outside/secret.jsonl",
        "sub/../../outside",
        "/etc/passwd",
    ],
)
def test_outside_the_roots_is_refused_alike(roots, name):
    root, outside = roots
    raw = name if name.startswith("/") else f"{root}/{name}"
    with pytest.raises(PathNotAllowed) as err:
        resolve_local_path(raw, [root], what="eval.text")
    message = str(err.value)
    # the same words whether the file exists or not, and nothing of the disk
    assert message.startswith("eval.text: local paths are not allowed")
    for leak in (str(outside), str(root), "secret", "field_a", "passwd", "exist"):
        assert leak not in message


def test_relative_escape_from_base_is_refused(roots):
    root, _ = roots
    with pytest.raises(PathNotAllowed):
        resolve_local_path("../../../../etc/passwd", [root], base=root / "sub")
    with pytest.raises(InputError, match="NUL"):
        resolve_local_path(f"{root}/a\x00b", [root])


def test_no_roots_means_any_path_for_the_cli(roots):
    _, outside = roots
    assert resolve_local_path(outside / "secret.jsonl", None) == (outside / "secret.jsonl").resolve()


def test_hub_id_shaped_values_are_never_local(tmp_path, monkeypatch):
    (tmp_path / "tests" / "service").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_local_reference("tests/service")
    assert is_local_reference("./tests/service") and is_local_reference("/x") and is_local_reference("~/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # asked of the hub (offline here, not cached), never read from ./tests/service
    with pytest.raises(Exception) as err:
        resolve_model("tests/service")
    assert "cache" in str(err.value) and str(tmp_path / "tests") not in str(err.value)


def test_resolve_model_enforces_the_roots(roots):
    root, outside = roots
    with pytest.raises(PathNotAllowed):
        resolve_model(str(outside), allowed_roots=[root])
    with pytest.raises(PathNotAllowed):
        resolve_model(f"{root}/link-out", allowed_roots=[root])


def test_every_path_field_of_a_spec_goes_through_the_resolver(roots):
    root, outside = roots
    spec = JobSpec(
        model=f"{root}/link-in",
        calibration={"source": f"file:{root}/sub/ok.txt"},
        eval={"text": f"file:{root}/sub/../sub/ok.txt"},
    )
    out = resolve_spec_paths(spec, [root])
    assert out.model == str((root / "sub").resolve())
    assert out.calibration.source == f"file:{(root / 'sub' / 'ok.txt').resolve()}"
    assert out.eval.text == out.calibration.source
    hub = resolve_spec_paths(JobSpec(model="org/name", eval={"text": "hf:wikitext"}), [root])
    assert hub.model == "org/name" and hub.eval.text == "hf:wikitext"
    for bad in (
        {"model": str(outside)},
        {"model": "org/name", "calibration": {"source": f"file:{root}/link-out/secret.jsonl"}},
        {"model": "org/name", "eval": {"text": f"file:{root}/../outside/secret.jsonl"}},
    ):
        with pytest.raises(PathNotAllowed):
            resolve_spec_paths(JobSpec(**bad), [root])


def test_spec_refuses_plain_paths_as_eval_text():
    for text in ("/etc/passwd", "../../../../etc/passwd", "etc/passwd"):
        with pytest.raises(ValueError, match="evaluation text"):
            JobSpec(model="org/name", eval={"text": text})
