"""The spine, end to end: recipes/debian.toml, unprivileged, through a mirror.

The real Debian image (debootstrap, two layers, see tests/support/debian.py)
is served by a real docker-registry as docker.io/library/debian:bookworm's
mirror, with the recipe's guest agent (agent_ref, pushed by `banger-build file
push`; the project has no agents/). banger-build runs as uid 65534 from a venv
of Debian's python3. The image it builds is read back with debugfs and
compared, path by path, with an independent replay of the tar headers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from banger_build.guest import DESTS
from tests.support.agent import agent_file, push_agents
from tests.support.debian import SPECIAL, expected_tree, group_id
from tests.support.ext4read import fsck, read_image, sha256_file
from tests.support.oci import push_layout
from tests.support.registry import RegistryServer
from tests.support.treecheck import tree_mismatches, unexpected_paths
from tests.support.unpriv import Unpriv

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = {"etc/hostname", "etc/hosts", "etc/fstab"}
GUEST_FILES = {d.lstrip("/") for d in DESTS}
INJECTED = RECIPE_FILES | GUEST_FILES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(debian_oci_layout: Path, unpriv_venv: object, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Build recipes/debian.toml as 65534 (cold), then again with the registry stopped."""
    user: Unpriv = unpriv_venv.user()  # type: ignore[attr-defined]
    (user.home / ".git").mkdir()  # a project, as the checkout is: ../templates lies inside it
    user.copy_in(REPO / "recipes", "recipes")
    user.copy_in(REPO / "templates", "templates")
    recipe = user.home / "recipes" / "debian.toml"
    args = [str(recipe), "--mirror"]
    with RegistryServer() as server:
        push_layout(server.url, "library/debian", "bookworm", debian_oci_layout)
        push_agents(server.host)
        started = time.monotonic()
        cold = user.run([*args, f"docker.io={server.url}"], timeout=900)
        cold_s = time.monotonic() - started
    started = time.monotonic()
    warm = user.run([*args, f"docker.io={server.url}"], timeout=60)
    warm_s = time.monotonic() - started
    yield {
        "user": user,
        "cold": cold,
        "warm": warm,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "recipe": recipe,
        "layout": debian_oci_layout,
    }
    user.cleanup()


def test_builds_into_the_users_store(built: dict) -> None:  # type: ignore[type-arg]
    user: Unpriv = built["user"]
    path = Path(built["cold"].stdout.strip())
    assert path.parent == user.cache / "banger-build" / "store"
    assert path.name.endswith("-debian-bookworm")
    assert (path / "rootfs.ext4").stat().st_uid == user.uid
    assert (user.home / "result").resolve() == path  # default out-link in the cwd
    lock = built["recipe"].with_suffix(".lock").read_text()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["image"]["manifest"] in lock
    assert manifest["outputs"]["rootfs.ext4"]["sha256"] == sha256_file(path / "rootfs.ext4")
    print(f"cold build {built['cold_s']:.1f}s, warm {built['warm_s']:.2f}s")


def test_second_run_is_a_cache_hit_with_the_registry_stopped(built: dict) -> None:  # type: ignore[type-arg]
    assert built["warm"].stdout == built["cold"].stdout
    assert built["warm_s"] < 1.5, built["warm_s"]  # setpriv + interpreter start included
    assert "making ext4" not in built["warm"].stderr and "cached" in built["warm"].stderr


def test_every_path_matches_the_tar_headers(built: dict) -> None:  # type: ignore[type-arg]
    image = Path(built["cold"].stdout.strip()) / "rootfs.ext4"
    assert fsck(image).returncode == 0, fsck(image).stdout
    seen = read_image(image)
    expected = expected_tree(built["layout"])
    mismatches = tree_mismatches(seen, expected, INJECTED)
    assert mismatches == [], "\n".join(mismatches[:30])
    extra = unexpected_paths(seen, expected, INJECTED)
    assert extra == set(), sorted(extra)[:20]
    root = seen[""]
    assert (root.type, root.uid, root.gid, root.mode & 0o7777) == ("dir", 0, 0, 0o755)
    assert not any(s.uid == 65534 for p, s in seen.items() if expected.get(p, s).uid != 65534)


def test_the_facts_users_rely_on(built: dict) -> None:  # type: ignore[type-arg]
    image = Path(built["cold"].stdout.strip()) / "rootfs.ext4"
    seen = read_image(image, contents=False)
    su = seen["usr/bin/su"]
    assert (su.type, su.uid, su.gid, su.mode & 0o7777) == ("reg", 0, 0, 0o4755)
    shadow = seen["etc/shadow"]
    shadow_gid = group_id(built["layout"], "shadow")
    assert shadow_gid != 0
    assert (shadow.uid, shadow.gid, shadow.mode & 0o7777) == (0, shadow_gid, 0o640)
    assert SPECIAL.whiteout_victim not in seen
    assert not any(p.startswith(SPECIAL.opaque_dir + "/") and p != SPECIAL.opaque_new for p in seen)
    a, b = SPECIAL.hardlink
    assert seen[a].ino == seen[b].ino and seen[a].links == 2
    assert seen[SPECIAL.setuid].mode & 0o7777 == 0o4755
    assert (seen[SPECIAL.owned].uid, seen[SPECIAL.owned].gid) == SPECIAL.owned_ids
    assert "security.capability" in seen[SPECIAL.capability].xattrs
    for path in RECIPE_FILES:
        assert (seen[path].uid, seen[path].gid, seen[path].mode & 0o7777) == (0, 0, 0o644)
    for path in GUEST_FILES:
        assert (seen[path].uid, seen[path].gid) == (0, 0), path
    agent = read_image(image)["usr/local/bin/banger-vsock-agent"]  # from the registry
    assert agent.sha256 == sha256_file(agent_file("amd64")) and agent.mode & 0o7777 == 0o755
