"""Where a store path came from, as ``ls``, ``show`` and ``verify --json`` say it: built
here or substituted (from where, signed by whom), on real builds, pushes and
substitutions through the real ``docker-registry``, and on made-up store paths."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from banger_build.cli import main
from banger_build.signing import dsse
from banger_build.signing.keys import SecretKey
from banger_build.signing.statement import statement_for
from banger_build.signing.verify import substitution_record
from banger_build.store import META_SUBSTITUTED, StoreEntry
from tests.support.e2e import run_cli, write_recipe
from tests.support.registry import RegistryServer
from tests.support.signing import make_entry

SOURCE = "registry.example/ci/tiny@sha256:" + "1234567890ab" + "c" * 52


@pytest.fixture(autouse=True)
def no_user_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    for name in ("BANGER_BUILD_SUBSTITUTERS", "BANGER_BUILD_TRUSTED_KEYS"):
        monkeypatch.delenv(name, raising=False)


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _substituted(home: Path, name: str, key: SecretKey | None) -> StoreEntry:
    """A store path recorded as substituted from SOURCE, signed by ``key`` (None:
    accepted unsigned)."""
    entry = make_entry(home, name, built_here=False)
    envelopes = [dsse.sign(statement_for(entry), key)] if key is not None else []
    record = substitution_record(SOURCE, key.name if key else "", envelopes)
    assert entry.meta_file is not None
    entry.meta_file.write_text(json.dumps({"recipe": "/r/tiny.toml", META_SUBSTITUTED: record}))
    return entry


# -- ls -----------------------------------------------------------------------------------


def test_ls_says_which_paths_were_substituted_from_where(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = SecretKey.generate("cache-1")
    built = make_entry(home, "built-v1")
    signed = _substituted(home, "signed-v1", key)
    unsigned = _substituted(home, "unsigned-v1", None)
    unknown = make_entry(home, "copied-v1", built_here=False)

    code, out, _ = run_cli(home, "ls", "--json")
    assert code == 0
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert rows[built.path.name]["origin"] == "built"
    assert rows[built.path.name]["substituted"] is None
    assert rows[signed.path.name]["origin"] == "substituted"
    assert rows[signed.path.name]["substituted"] == {"source": SOURCE, "signer": "cache-1"}
    assert rows[unsigned.path.name]["substituted"] == {"source": SOURCE, "signer": ""}
    assert rows[unknown.path.name]["origin"] == "unknown"
    assert rows[unknown.path.name]["substituted"] is None

    code, out, _ = run_cli(home, "ls")
    assert code == 0
    lines = {e.path.name: line for e in (built, signed, unsigned, unknown)
             for line in out.splitlines() if e.path.name in line}  # fmt: skip
    short = "registry.example/ci/tiny@sha256:1234567890ab"
    assert lines[signed.path.name].endswith(f"/r/tiny.toml  <- {short} (signed by cache-1)")
    assert lines[unsigned.path.name].endswith(f"<- {short} (unsigned)")
    assert "<-" not in lines[built.path.name] and "<-" not in lines[unknown.path.name]


def test_ls_survives_a_mangled_record(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home, built_here=False)
    assert entry.meta_file is not None
    entry.meta_file.write_text(json.dumps({META_SUBSTITUTED: {"source": 7, "signer": ["x"]}}))
    code, out, _ = run_cli(home, "ls", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["origin"] == "substituted"
    assert row["substituted"] == {"source": "", "signer": ""}
    code, out, _ = run_cli(home, "ls")
    assert code == 0 and out.rstrip().endswith("<- ? (unsigned)")


# -- show and ls on real builds and a real substitution -----------------------------------


def test_show_and_ls_tell_a_built_path_from_a_substituted_one(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    secret = tmp_path / "ci.key"
    assert main(["key", "generate", "ci-1", "-o", str(secret)]) == 0
    public = (tmp_path / "ci.key.pub").read_text().strip()
    cache = f"{registry.host}/origin/cache"

    code, out, err = run_cli(tmp_path / "empty", "show", str(recipe))
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["built"], shown["origin"], shown["substituted"]) == (False, None, None)

    builder = tmp_path / "builder"
    code, out, err = run_cli(builder, str(recipe), "--no-link", "--push", cache,
                             "--sign-key", str(secret))  # fmt: skip
    assert code == 0, err
    artifact = out.splitlines()[1]
    code, out, err = run_cli(builder, "show", str(recipe))
    shown = json.loads(out)
    assert (shown["built"], shown["origin"], shown["substituted"]) == (True, "built", None)

    taker = tmp_path / "taker"
    code, out, err = run_cli(taker, str(recipe), "--no-link", "--substituter", cache,
                             "--trusted-key", public)  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(taker, "show", str(recipe))
    shown = json.loads(out)
    assert (shown["built"], shown["origin"]) == (True, "substituted")
    assert shown["substituted"] == {"source": artifact, "signer": "ci-1"}
    code, out, _ = run_cli(taker, "ls")
    name, _, digest = artifact.partition("@")
    assert out.rstrip().endswith(f"<- {name}@{digest[:19]} (signed by ci-1)")
    # the artifact itself, verified from the registry: progress, then the result
    code, out, err = run_cli(tmp_path / "v", "verify", "--json", artifact, "--trusted-key", public)
    assert (code, err) == (0, "")
    events = _events(out)
    assert {e["event"] for e in events} == {"progress", "result"}
    assert events[-1] == dict(events[-1], target=artifact, exit=0, ok=True, signers=["ci-1"])


# -- verify --json ------------------------------------------------------------------------


def test_verify_json_reports_each_finding_and_a_result_per_target(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = SecretKey.generate("cache-1")
    good = make_entry(home, "good-v1")
    signed = _substituted(home, "signed-v1", key)
    code, out, err = run_cli(home, "verify", "--json", str(good.path), str(signed.path),
                             "--trusted-key", str(key.public))  # fmt: skip
    assert (code, err) == (0, "")
    results = [e for e in _events(out) if e["event"] == "result"]
    assert [(r["target"], r["exit"], r["ok"], r["trusted_as"]) for r in results] == [
        (str(good.path), 0, True, "built locally"),
        (str(signed.path), 0, True, "signed by cache-1"),
    ]
    assert results[1]["signers"] == ["cache-1"]
    assert not [e for e in _events(out) if e["event"] == "finding"]

    # corrupted and untrusted at once (no --trusted-key): a finding each, the bits in the
    # result and the exit status
    os.chmod(signed.path, 0o755)
    os.chmod(signed.path / "rootfs.ext4", 0o644)
    (signed.path / "rootfs.ext4").write_bytes(b"changed")
    code, out, err = run_cli(home, "verify", "--json", str(signed.path))
    assert code == 3 and err == ""
    events = _events(out)
    findings = [e for e in events if e["event"] == "finding"]
    assert [(f["kind"], f["bit"]) for f in findings] == [
        ("corrupted", 1),
        ("warning", 0),  # the recorded signature is by a key not trusted here
        ("untrusted", 2),
    ]
    assert all(f["target"] == str(signed.path) and f["message"] for f in findings)
    corrupted = [f["message"] for f in findings if f["kind"] == "corrupted"]
    assert corrupted[0].startswith(f"{signed.path / 'rootfs.ext4'}: sha256 ")
    (result,) = [e for e in events if e["event"] == "result"]
    assert result == dict(result, exit=3, ok=False, corrupted=True, untrusted=True, error=False)
    assert events[-1] is result


def test_verify_json_errors_are_events_with_exit_4(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, out, err = run_cli(home, "verify", "--json", str(tmp_path), "--trusted-key", "k:AAAA")
    assert code == 4 and "error: --trusted-key" in err
    (event,) = _events(out)
    assert event["event"] == "error" and event["exit"] == 4 and "--trusted-key" in event["message"]
    code, out, err = run_cli(home, "verify", "--json", "Not A Reference!")
    assert code == 4 and err == ""
    finding, result = _events(out)
    assert finding["kind"] == "error" and "neither a path nor a reference" in finding["message"]
    assert (result["exit"], result["error"], result["ok"]) == (4, True, False)
