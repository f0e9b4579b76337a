"""Substitution of the Debian fixture into an unprivileged user's empty home.

Root builds recipes/debian.toml, pushes it and signs it (``build --push
--sign-key``); then uid 65534 (no groups, a venv of Debian's python3, see
tests/support/unpriv.py) runs the same recipe from an empty home with
``--substituter``/``--trusted-key``. The path it prints is root's, every
output has root's bytes, its files are the user's, it reports
``substituted``, it built no filesystem, and neither the mirror's access log
nor the user's blob cache shows a layer of the base image; ``ls`` and
``verify`` (with root's key) say where it came from and who signed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from banger_build.cli import main
from tests.support.agent import AGENT_REPO, push_agents
from tests.support.debian import read_manifest
from tests.support.oci import push_layout
from tests.support.registry import RegistryServer
from tests.support.unpriv import Unpriv

REPO = Path(__file__).resolve().parents[1]
COPY = ("recipes", "templates", "agents")

pytestmark = pytest.mark.slow


def _digests(store_path: Path) -> dict[str, str]:
    out = {}
    for path in sorted(store_path.rglob("*")):
        if path.is_file() and not path.is_symlink():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[str(path.relative_to(store_path))] = h.hexdigest()
    return out


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _as_root(top: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "banger_build", *args, "--home", str(top / "home")],
        cwd=top, capture_output=True, text=True, check=False, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "DOCKER_CONFIG": str(top),
             "XDG_CONFIG_HOME": str(top)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_an_unprivileged_empty_home_substitutes_roots_signed_path(
    debian_oci_layout: Path, unpriv: Unpriv, tmp_path: Path
) -> None:
    image = read_manifest(debian_oci_layout)[0]
    layers = {layer["digest"] for layer in image["layers"]}
    config = image["config"]["digest"]
    with RegistryServer(access_log=True) as server:
        push_layout(server.url, "library/debian", "bookworm", debian_oci_layout)
        push_agents(server.host)
        mirror = f"docker.io={server.url}"
        cache = f"{server.host}/ci/debian"

        # root: build, push and sign
        project = tmp_path / "project"
        (project / ".git").mkdir(parents=True)
        for name in COPY:
            shutil.copytree(REPO / name, project / name, symlinks=True,
                            ignore=shutil.ignore_patterns("*.lock"))  # fmt: skip
        assert main(["key", "generate", "ci-root-1", "-o", str(tmp_path / "ci.key")]) == 0
        public = (tmp_path / "ci.key.pub").read_text().strip()
        out = _as_root(
            tmp_path, str(project / "recipes" / "debian.toml"), "--no-link", "--mirror", mirror,
            "--push", cache, "--sign-key", str(tmp_path / "ci.key"),
        )  # fmt: skip
        built = Path(out.splitlines()[0])
        assert built.name.endswith("-debian-bookworm")
        expected = _digests(built)
        assert {"rootfs.ext4", "manifest.json"} <= set(expected)

        # 65534: the same recipe, an empty home, the cache and root's public key
        (unpriv.home / ".git").mkdir()
        for name in COPY:
            unpriv.copy_in(REPO / name, name)
        for lock in (unpriv.home / "recipes").glob("*.lock"):
            lock.unlink()
        home = unpriv.cache / "banger-build"
        assert not home.exists()
        since = len(server.accesses())
        proc = unpriv.run([
            str(unpriv.home / "recipes" / "debian.toml"), "--json", "--no-link",
            "--mirror", mirror, "--substituter", cache, "--trusted-key", public,
        ])  # fmt: skip
        fetched = server.accesses()[since:]

    events = _events(proc.stdout)
    (result,) = [e for e in events if e["event"] == "result"]
    assert result["status"] == "substituted", proc.stdout
    taken = Path(result["path"])
    assert taken == home / "store" / built.name  # root's store path, in the user's store
    assert _digests(taken) == expected  # every output bit for bit
    assert os.stat(taken / "rootfs.ext4").st_uid == unpriv.uid
    timings = {e["step"] for e in events if e["event"] == "timing"}
    assert "make filesystem" not in timings and "pull layers" not in timings
    assert "substitute" in timings
    # no layer of the base image: not served to the user, not in its blob cache
    blobs = [a.path for a in fetched if a.method == "GET" and "/blobs/" in a.path]
    base = {p.rsplit("/", 1)[1] for p in blobs if p.startswith("/v2/library/debian/")}
    assert base == {config}, blobs  # the image's config (the key needs it), no layer
    assert not base & layers and any(p.startswith("/v2/ci/debian/") for p in blobs)
    assert not [p for p in blobs if p.startswith(f"/v2/{AGENT_REPO}/")]  # its digest will do
    cached = {p.name for p in (home / "blobs" / "sha256").iterdir()}
    assert not {d.partition(":")[2] for d in layers} & cached
    # the user's store says where it came from; verify trusts it with root's key only
    meta = json.loads((home / "meta" / f"{built.name}.json").read_text())
    assert meta["substituted"]["signer"] == "ci-root-1"
    assert meta["substituted"]["source"].startswith(f"{cache}@sha256:")
    (row,) = json.loads(unpriv.run(["ls", "--json"]).stdout)
    assert (row["path"], row["origin"]) == (str(taken), "substituted")
    assert row["substituted"] == {"source": meta["substituted"]["source"], "signer": "ci-root-1"}
    ok = unpriv.run(["verify", str(taken), "--trusted-key", public])
    assert ok.stdout.strip() == f"{taken}: ok (signed by ci-root-1)"
    untrusted = unpriv.run(["verify", str(taken)], check=False)
    assert untrusted.returncode == 2, untrusted.stderr
