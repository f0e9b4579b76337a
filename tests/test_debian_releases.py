"""Two real Debian releases from one recipe (issue 11, deliverable 6).

bookworm (tests/support/debian.py, OCI media types) and trixie
(tests/support/debian_trixie.py: usr-merged by Debian's own base-files, pushed
with Docker v2 schema 2 media types) are served by the session registry as
docker.io/library/debian:{bookworm,trixie}'s mirror. recipes/debian.toml
builds each, as root, cold, in a home of its own (trixie's recipe differs in
the tag and puts one more file at /sbin/). Each image is read back with
debugfs and compared, path by path, with an independent replay of its
layers' tar headers; trixie's usr-merge holds in its image (/bin, /sbin,
/lib, /lib64 stay symlinks into /usr, and what the upper layer or the recipe
puts below them lands in /usr); e2fsck -fn is clean (the suite's
BANGER_BUILD_FSCK=1 also runs it inside every build). trixie then boots to
the login prompt with the guest probe.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from banger_build.guest import DESTS
from tests.support import debian_trixie, guestprobe
from tests.support.agent import GuestAgents
from tests.support.bootkernel import BootKernel
from tests.support.debian import DebianImage, expected_tree, image_file
from tests.support.e2e import run_cli
from tests.support.ext4read import Seen, fsck, read_image, sha256_file
from tests.support.oci import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST
from tests.support.treecheck import tree_mismatches, unexpected_paths

RELEASES = ("bookworm", "trixie")
RECIPE_TOOL = "sbin/banger-recipe-tool"  # trixie's recipe writes /sbin/banger-recipe-tool
INJECTED = {"etc/hostname", "etc/hosts", "etc/fstab"} | {d.lstrip("/") for d in DESTS}

pytestmark = pytest.mark.slow


def release_recipes(top: Path) -> dict[str, Path]:
    """recipes/debian.toml as it is (bookworm), and as recipes/trixie.toml with the
    trixie tag and a [[files]] entry to /sbin/ (a project like the checkout)."""
    d = guestprobe.copy_project(top)
    text = (d / "debian.toml").read_text()
    old = 'ref = "docker.io/library/debian:bookworm"\n'
    assert old in text, "recipes/debian.toml's [image] changed"
    (d / "banger-recipe-tool").write_text("#!/bin/sh\necho put at /sbin by the recipe\n")
    trixie = d / "trixie.toml"
    trixie.write_text(
        text.replace(old, f'ref = "{debian_trixie.REFERENCE}"\n')
        + f"""
[[files]]
src = "banger-recipe-tool"
dest = "/{RECIPE_TOOL}"
mode = "0755"
"""
    )
    return {"bookworm": d / "debian.toml", "trixie": trixie}


@pytest.fixture(scope="module")
def images(
    debian_image_and_agent: DebianImage, trixie_image: DebianImage
) -> dict[str, DebianImage]:
    """Both images, their registry also serving the recipe's agent (agent_ref)."""
    return {"bookworm": debian_image_and_agent, "trixie": trixie_image}


@pytest.fixture(scope="module")
def builds(images: dict[str, DebianImage], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each release built cold (its own home: empty blob cache and store) as root."""
    top = tmp_path_factory.mktemp("releases")
    recipes = release_recipes(top / "project")
    paths, seconds = {}, {}
    for name in RELEASES:
        started = time.monotonic()
        code, out, err = run_cli(
            top / f"home-{name}", str(recipes[name]), "--no-link", "--mirror", images[name].mirror
        )
        seconds[name] = time.monotonic() - started
        assert code == 0, err
        paths[name] = Path(out.strip())
    print("cold builds: " + ", ".join(f"{n} {seconds[n]:.1f} s" for n in RELEASES))
    return {"paths": paths, "seconds": seconds, "recipes": recipes}


@functools.cache
def _read(image: Path) -> dict[str, Seen]:
    return read_image(image)


def seen_of(builds: Any, name: str) -> dict[str, Seen]:
    return _read(builds["paths"][name] / "rootfs.ext4")


def test_both_releases_build_from_the_recipe(builds: Any, images: dict[str, DebianImage]) -> None:
    paths = builds["paths"]
    assert paths["bookworm"] != paths["trixie"]
    for name in RELEASES:
        path = paths[name]
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["image"]["manifest"] == images[name].digest
        assert manifest["image"]["reference"] == images[name].reference
        assert manifest["outputs"]["rootfs.ext4"]["sha256"] == sha256_file(path / "rootfs.ext4")
        lock = builds["recipes"][name].with_suffix(".lock").read_text()
        assert images[name].digest in lock
        os_release = image_file(images[name].layout, "usr/lib/os-release").decode()
        assert f"VERSION_CODENAME={name}\n" in os_release


def test_trixie_is_served_and_pulled_as_docker_v2_schema_2(
    builds: Any, trixie_image: DebianImage
) -> None:
    """The registry holds the Docker manifest (not an OCI one) and answers with its
    media type; banger-build pulled exactly that manifest and its Docker layers."""
    r = requests.get(
        f"{trixie_image.registry.url}/v2/{trixie_image.repository}/manifests/{trixie_image.tag}",
        headers={"Accept": f"{DOCKER_MANIFEST}, application/vnd.oci.image.manifest.v1+json"},
        timeout=10,
    )
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"] == DOCKER_MANIFEST
    assert r.headers["Docker-Content-Digest"] == trixie_image.digest
    body = r.json()
    assert body["mediaType"] == DOCKER_MANIFEST and body["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in body["layers"]] == [DOCKER_LAYER_GZIP] * 2
    manifest = json.loads((builds["paths"]["trixie"] / "manifest.json").read_text())
    assert manifest["image"]["layers"] == [
        {"digest": layer["digest"], "media_type": DOCKER_LAYER_GZIP, "size": layer["size"]}
        for layer in body["layers"]
    ]


@pytest.mark.parametrize("name", RELEASES)
def test_each_tree_is_what_its_layers_give(
    builds: Any, images: dict[str, DebianImage], name: str
) -> None:
    image = builds["paths"][name] / "rootfs.ext4"
    checked = fsck(image)
    assert checked.returncode == 0, checked.stdout
    seen = seen_of(builds, name)
    expected = expected_tree(images[name].layout)
    injected = INJECTED | (
        {RECIPE_TOOL.replace("sbin/", "usr/sbin/")} if name == "trixie" else set()
    )
    mismatches = tree_mismatches(seen, expected, injected)
    assert mismatches == [], "\n".join(mismatches[:30])
    extra = unexpected_paths(seen, expected, injected)
    assert extra == set(), sorted(extra)[:20]
    print(f"{name}: {len(expected)} paths from the layers, all as the tar headers say")


def test_trixie_keeps_its_usr_merge(builds: Any, trixie_image: DebianImage) -> None:
    seen = seen_of(builds, "trixie")
    for name, target in debian_trixie.USR_MERGED.items():
        link = seen[name]
        assert (link.type, link.target) == ("symlink", target), (name, link)
        assert seen[target].type == "dir"
        assert not any(p.startswith(name + "/") for p in seen), name
    # written below /usr by the upper layer and by the recipe (as /sbin/...)
    merged = seen[debian_trixie.MERGED]
    assert (merged.type, merged.mode & 0o7777) == ("reg", 0o755)
    tool = seen["usr/" + RECIPE_TOOL]
    assert (tool.type, tool.uid, tool.gid, tool.mode & 0o7777) == ("reg", 0, 0, 0o755)
    assert tool.sha256 == sha256_file(builds["recipes"]["trixie"].parent / "banger-recipe-tool")
    assert seen["usr/sbin/init"].type == "symlink"  # systemd-sysv, below /usr only
    assert seen["etc/os-release"].target == "../usr/lib/os-release"


def test_trixie_upper_layer_cases_hold(builds: Any, trixie_image: DebianImage) -> None:
    """The bookworm image's layer cases, through Docker layers."""
    s = trixie_image.special
    seen = seen_of(builds, "trixie")
    assert s.whiteout_victim not in seen and s.whiteout_dir not in seen
    assert not any(p.startswith(s.whiteout_dir + "/") for p in seen)
    assert [p for p in seen if p.startswith(s.opaque_dir + "/")] == [s.opaque_new]
    a, b = s.hardlink
    assert seen[a].ino == seen[b].ino and seen[a].links == 2
    assert seen[s.setuid].mode & 0o7777 == 0o4755
    assert (seen[s.secret].mode & 0o7777, seen[s.secret].uid) == (0o600, 0)
    assert (seen[s.owned].uid, seen[s.owned].gid) == s.owned_ids
    assert "security.capability" in seen[s.capability].xattrs
    su = seen["usr/bin/su"]
    assert (su.type, su.uid, su.gid, su.mode & 0o7777) == ("reg", 0, 0, 0o4755)


def test_trixie_boots_to_the_login_prompt_with_the_guest_probe(
    trixie_image: DebianImage,
    guest_agents: GuestAgents,
    amd64_boot_kernel: BootKernel,
    tmp_path: Path,
) -> None:
    home, store_path = guestprobe.build_probe(
        tmp_path, ref=trixie_image.reference, platform="linux/amd64",
        mirror=trixie_image.mirror, kernel=amd64_boot_kernel,
    )  # fmt: skip
    err, console, boot_s = guestprobe.boot(
        home, store_path, tmp_path / "console.log", "--ping-agent", "--timeout", "600"
    )
    accel = re.search(r"boot ok under (\w+) \(amd64\)", err)
    assert accel is not None and "the login prompt appeared" in err, err
    print(f"trixie boot to the login prompt under {accel.group(1)}: {boot_s:.1f} s")
    assert "Debian GNU/Linux 13" in console
    guestprobe.assert_guest_set_ran(console)
    guestprobe.assert_agent_ping(err, console)
