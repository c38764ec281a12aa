"""Contract tests of our use of the huggingface_hub client: our resolve and publish code, unmodified, through
the real client against tests/service/hub_server.py (the Hub's endpoints, with injected faults)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .hub_server import HubServer


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub server with users alice (org acme) and bob; the client pointed at it as HF_ENDPOINT does."""
    from huggingface_hub import constants

    from app.core.config import settings

    server = HubServer().start()
    server.add_user("hf_alice", "alice", orgs=("acme",))
    server.add_user("hf_bob", "bob")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(settings, "PUBLISH_BACKOFF_S", 0.05)
    yield server
    server.stop()


def _checkpoint(**files: bytes) -> dict[str, bytes]:
    base = {
        "config.json": json.dumps({"model_type": "llama"}).encode(),
        "tokenizer.json": b"{}",
        "generation_config.json": b"{}",
    }
    return {**base, **{k.replace("__", "."): v for k, v in files.items()}}


def test_revision_resolves_to_a_commit_and_only_safe_files_come_down(hub):
    from awqforge.resolve import download_from_hub

    first = hub.add_repo(
        "acme/m",
        _checkpoint(
            model__safetensors=b"v1" * 100,
            pytorch_model__bin=b"pickle",
            optimizer__pt=b"pickle",
            **{"images/logo.png": b"png"},
        ),
    )
    hub.repos["acme/m"].refs["v1.0"] = first
    second = hub.add_repo("acme/m", _checkpoint(model__safetensors=b"v2" * 100))
    assert first != second

    folder, sha = download_from_hub("acme/m", None)  # default: main, resolved to its commit
    assert sha == second and folder.name == second
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    folder, sha = download_from_hub("acme/m", "v1.0")  # a tag
    assert sha == first and (folder / "model.safetensors").read_bytes() == b"v1" * 100
    assert not (folder / "pytorch_model.bin").exists() and not (folder / "images").exists()
    assert download_from_hub("acme/m", first)[1] == first  # a commit
    # No pickle was ever requested from the hub.
    assert hub.count("GET", r"\.(bin|pt)$") == 0 and hub.count("HEAD", r"\.(bin|pt)$") == 0


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (_checkpoint(pytorch_model__bin=b"x"), "only PyTorch pickle weights (pytorch_model.bin)"),
        (_checkpoint(model__safetensors=b"x", modeling_custom__py=b"code"), "never runs remote code"),
        (
            {
                "config.json": json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "m.M"}}).encode(),
                "model.safetensors": b"x",
            },
            "needs remote code",
        ),
    ],
)
def test_repos_we_refuse_fail_at_resolve_with_the_reason(hub, files, reason):
    from awqforge.errors import InputError
    from awqforge.resolve import download_from_hub

    hub.add_repo("acme/bad", files)
    with pytest.raises(InputError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        download_from_hub("acme/bad", None)
    assert hub.count("GET", r"/resolve/.*\.safetensors$") == 0  # failed before any weight came down


def test_gated_private_and_missing_are_told_apart(hub):
    from awqforge.errors import InputError
    from awqforge.resolve import download_from_hub

    hub.add_repo("acme/gated", _checkpoint(model__safetensors=b"w"), gated=True)
    hub.gated_access["acme/gated"] = {"bob"}
    hub.add_repo("acme/private", _checkpoint(model__safetensors=b"w"), private=True)

    with pytest.raises(InputError, match="gated.*give source.token"):
        download_from_hub("acme/gated", None)
    hub.add_user("hf_carol", "carol")
    with pytest.raises(InputError, match=r"gated and this token has no access \(403\)"):
        download_from_hub("acme/gated", None, "hf_carol")
    assert hub.count("GET", r"acme/gated/resolve/", 403) + hub.count("HEAD", r"acme/gated/resolve/", 403) >= 1
    assert download_from_hub("acme/gated", None, "hf_bob")[1]  # granted: 200

    with pytest.raises(InputError, match=r"not found on the Hub \(404\), or private: give source.token"):
        download_from_hub("acme/private", None)  # anonymous: the hub answers 401
    with pytest.raises(InputError, match="or this token cannot read it"):
        download_from_hub("acme/private", None, "hf_bob")  # bob may not see acme's private repo
    assert (download_from_hub("acme/private", None, "hf_alice")[0] / "model.safetensors").exists()

    with pytest.raises(InputError, match=r"revision 'nope' not found in acme/private \(404\)"):
        download_from_hub("acme/private", "nope", "hf_alice")
    with pytest.raises(InputError, match="not found on the Hub"):
        download_from_hub("acme/none", None, "hf_alice")


def _artifact(tmp_path: Path, name: str, content: str) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(content)
    (d / "model.safetensors").write_bytes(content.encode() * 10)
    (d / "README.md").write_text(f"---\nlicense: apache-2.0\nbase_model: acme/m\n---\n# {name}\n")
    return d


def _commits(hub, repo_id: str) -> int:
    """Commits after the one a new repo starts with."""
    return len(hub.repos[repo_id].commits) - 1


def test_publish_one_commit_private_idempotent(hub, tmp_path):
    from worker.hub import HuggingFaceHub

    remote = HuggingFaceHub("hf_alice", hub.url)
    folders = {"awq": _artifact(tmp_path, "awq", "a"), "compressed-tensors": _artifact(tmp_path, "ct", "c")}
    out = remote.publish(folders, "acme/m-awq", private=True, tenant="t")
    repo = hub.repos["acme/m-awq"]
    assert repo.private is True and _commits(hub, "acme/m-awq") == 1  # all files and the card: one commit
    files = repo.files_at("main")[1]
    assert {"awq/config.json", "compressed-tensors/model.safetensors", "README.md"} <= set(files)
    assert out.revision == repo.refs["main"] and out.commit_url.endswith(f"/commit/{out.revision}")
    assert out.committed

    again = remote.publish(folders, "acme/m-awq", private=True, tenant="t")  # same files: no new commit
    assert not again.committed and again.revision == out.revision and _commits(hub, "acme/m-awq") == 1
    assert hub.count("POST", "/commit/") == 1

    (folders["awq"] / "config.json").write_text("changed")
    third = remote.publish(folders, "acme/m-awq", private=True, tenant="t")
    assert third.committed and _commits(hub, "acme/m-awq") == 2


def test_publish_never_flips_visibility_and_needs_rights(hub, tmp_path):
    from worker.hub import HuggingFaceHub, PublishRefused

    folders = {"": _artifact(tmp_path, "awq", "a")}
    HuggingFaceHub("hf_alice", hub.url).publish(folders, "acme/pub", private=False, tenant="t")
    with pytest.raises(PublishRefused, match="exists as public; it is not changed to private"):
        HuggingFaceHub("hf_alice", hub.url).publish(folders, "acme/pub", private=True, tenant="t")
    assert hub.repos["acme/pub"].private is False and _commits(hub, "acme/pub") == 1

    with pytest.raises(PublishRefused, match=r"refused .* \(403\)"):  # bob may not write into acme
        HuggingFaceHub("hf_bob", hub.url).publish(folders, "acme/pub", private=False, tenant="t")
    with pytest.raises(PublishRefused, match=r"\(401\): no token: give publish.token"):
        HuggingFaceHub(None, hub.url).publish(folders, "bob/x", private=True, tenant="t")
    assert _commits(hub, "acme/pub") == 1 and "bob/x" not in hub.repos


def test_publish_retries_5xx_and_429_with_retry_after(hub, tmp_path):
    from worker.hub import HuggingFaceHub

    folders = {"": _artifact(tmp_path, "awq", "a")}
    hub.fail("GET", r"^/api/models/acme/r$", 502)
    hub.fail("POST", r"^/api/repos/create$", 429, **{"Retry-After": "1"})
    hub.fail("POST", r"/commit/main$", 503, times=2)
    out = HuggingFaceHub("hf_alice", hub.url).publish(folders, "acme/r", private=True, tenant="t")
    assert out.committed and _commits(hub, "acme/r") == 1
    assert (
        hub.count("POST", r"^/api/repos/create$", 429) == 1
        and hub.count("POST", r"^/api/repos/create$", 200) == 1
    )
    assert hub.count("POST", r"/commit/main$", 503) == 2 and hub.count("POST", r"/commit/main$", 200) == 1

    hub.fail("POST", r"/commit/main$", 500, times=100)  # never recovers: the error surfaces
    (folders[""] / "config.json").write_text("b")
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError):
        HuggingFaceHub("hf_alice", hub.url, attempts=3).publish(folders, "acme/r", private=True, tenant="t")
    assert _commits(hub, "acme/r") == 1


def test_local_hub_repo_belongs_to_its_first_publisher(tmp_path):
    from worker.hub import LocalHub, PublishRefused

    hub = LocalHub(tmp_path / "hub")
    mine = {
        "awq": _artifact(tmp_path / "a", "awq", "A"),
        "compressed-tensors": _artifact(tmp_path / "a", "ct", "A"),
    }
    first = hub.publish(mine, "shared/m", private=True, tenant="team-a")
    repo = tmp_path / "hub" / "shared" / "m"
    before = {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert {"awq/config.json", "compressed-tensors/config.json", "README.md"} <= set(before)

    theirs = {"": _artifact(tmp_path / "b", "awq", "B")}
    with pytest.raises(PublishRefused, match="belongs to another tenant"):
        hub.publish(theirs, "shared/m", private=True, tenant="team-b")
    after = {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before  # nothing of the owner's files changed

    with pytest.raises(PublishRefused, match="exists as private; it is not changed to public"):
        hub.publish(mine, "shared/m", private=False, tenant="team-a")
    again = hub.publish(mine, "shared/m", private=True, tenant="team-a")
    assert not again.committed and again.revision == first.revision
    assert hub.repo_meta("shared/m") == {"owner": "team-a", "private": True, "revision": first.revision}
    for evil in ("../../etc", "a/../../x", ".repos/x", "onlyname"):
        with pytest.raises(ValueError):
            hub.publish(mine, evil, private=True, tenant="team-a")


def test_resolve_retries_5xx_and_429_then_succeeds(hub):
    from awqforge.resolve import download_from_hub

    sha = hub.add_repo("acme/flaky", _checkpoint(model__safetensors=b"w" * 64))
    hub.fail("GET", r"^/api/models/acme/flaky/revision/main$", 503)
    hub.fail("GET", r"^/api/models/acme/flaky/revision/main$", 429, **{"Retry-After": "1"})
    folder, got = download_from_hub("acme/flaky", None)
    assert got == sha and (folder / "model.safetensors").read_bytes() == b"w" * 64
    assert hub.count("GET", r"/revision/main$", 503) == 1 and hub.count("GET", r"/revision/main$", 429) == 1
