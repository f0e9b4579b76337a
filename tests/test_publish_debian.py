"""Bundle and push of the Debian fixture's store path (recipes/debian.toml), end to end.

Two homes build the recipe (different TMPDIR and umask) and bundle it: the
bundles are byte-identical, and ``zstd -d | tar -x`` gives back rootfs.ext4
and manifest.json bit for bit. Both homes push to a registry with token auth:
one manifest digest, the second push uploads nothing (the bundle, over the
chunk size, went up in chunks the first time). Times and sizes are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.debian import DebianImage
from tests.support.oci import Pusher
from tests.support.registry import RegistryServer, write_docker_config

REPO = Path(__file__).resolve().parents[1]
COPY = ("recipes", "templates", "agents")

pytestmark = pytest.mark.slow


def cli(top: Path, *args: str, umask: int = 0o022, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    (top / "tmp").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "banger_build", *args, "--home", str(top / "home")],
        cwd=top, capture_output=True, text=True, check=False, timeout=900, umask=umask,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(top / "tmp"), **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), time.monotonic() - started


def test_debian_bundle_and_push(
    debian_image_and_agent: DebianImage, tmp_path: Path, token_registry: RegistryServer
) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    for name in COPY:
        shutil.copytree(REPO / name, project / name, symlinks=True,
                        ignore=shutil.ignore_patterns("*.lock"))  # fmt: skip
    recipe = str(project / "recipes" / "debian.toml")
    server = token_registry
    config = write_docker_config(
        tmp_path / "docker", {server.host: (server.username, server.password)}
    )
    env = {"DOCKER_CONFIG": str(config.parent)}
    target = f"{server.host}/banger/debian:bookworm"
    made = []
    for n, umask in ((1, 0o022), (2, 0o077)):
        top = tmp_path / f"machine{n}"
        path, build_s = cli(
            top, recipe, "--no-link", "--mirror", debian_image_and_agent.mirror, umask=umask
        )
        bundle, bundle_s = cli(top, "bundle", path, umask=umask)
        ref, push_s = cli(top, "push", path, target, umask=umask, env=env)
        again, again_s = cli(top, "push", path, target, umask=umask, env=env)
        made.append((Path(path), top / bundle, ref))
        size = (top / bundle).stat().st_size
        print(f"home {n}: build {build_s:.1f} s, bundle {size / 1e6:.1f} MB in {bundle_s:.1f} s, "
              f"push {push_s:.1f} s, again {again_s:.1f} s")  # fmt: skip
        assert again == ref
    (path1, bundle1, ref1), (path2, bundle2, ref2) = made
    assert path1.name == path2.name and ref1 == ref2
    assert bundle1.read_bytes() == bundle2.read_bytes()

    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(f"zstd -dc {bundle1} | tar -x -C {out} -f -", shell=True, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rootfs.ext4"]
    for name in ("manifest.json", "rootfs.ext4"):
        assert subprocess.run(["cmp", str(out / name), str(path1 / name)]).returncode == 0

    pusher = Pusher(server.url, "banger/debian", (server.username, server.password))
    digest = ref1.partition("@")[2]
    manifest = pusher.request(
        "GET", f"/v2/banger/debian/manifests/{digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()  # fmt: skip
    assert manifest["layers"][0]["size"] == bundle1.stat().st_size
    key = json.loads((path1 / "manifest.json").read_text())["key"]
    tags = pusher.request("GET", "/v2/banger/debian/tags/list").json()["tags"]
    assert sorted(tags) == sorted(["bookworm", f"sk-{key}"])
