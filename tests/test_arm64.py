"""arm64 end to end on this amd64 host (issue 11, deliverable 2).

The real arm64 Debian image (debootstrap --arch=arm64 through qemu-user,
tests/support/debian_arm64.py) and the amd64 one sit behind one multi-arch
OCI index in the test registry (tests/support/multiarch.py). From that one
reference, recipes that differ only in ``platform`` build both images; each
image is what its own manifest's layers say, with the guest agent of its
architecture (recipes/debian.toml's agent_ref names an index of one per
architecture, tests/support/agent.py). The arm64 build is reproducible as root
and as uid 65534 (from the installed package, whose built-in arm64 agent gives
the same key). The arm64 image
then boots, with Debian's arm64 cloud kernel, in qemu-system-aarch64 -M virt
under TCG, to the guest probe (tests/support/guestprobe.py): the guest set's
units ran, the network unit configured the address boot gave it, the
aarch64 agent runs, the vsock modules of modules-load.d are loaded from the
image's modules, and the login prompt ended the boot.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from banger_build.guest import DESTS
from banger_build.machines import kernel_arch
from tests.support import guestprobe
from tests.support.agent import AGENT_REFERENCE, GuestAgents
from tests.support.bootkernel import BootKernel
from tests.support.debian import expected_tree, image_file
from tests.support.e2e import run_cli
from tests.support.ext4read import fsck, read_image, sha256_file
from tests.support.multiarch import AMD64, ARM64, MultiArchDebian
from tests.support.unpriv import UnprivVenv

REPO = Path(__file__).resolve().parents[1]
AGENTS = REPO / "agents" / "out"
ELF_MACHINE = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64

pytestmark = pytest.mark.slow


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int(struct.unpack_from("<H", data, 0x12)[0])


def multi_recipe(top: Path, ref: str) -> Path:
    """recipes/debian.toml with the multi-arch reference (the platform stays linux/amd64)."""
    (top / ".git").mkdir(parents=True)
    recipes = top / "recipes"
    recipes.mkdir()
    text = (REPO / "recipes" / "debian.toml").read_text()
    old = 'ref = "docker.io/library/debian:bookworm"\n'
    assert old in text
    recipe = recipes / "multi.toml"
    recipe.write_text(text.replace(old, f'ref = "{ref}"\n'))
    return recipe


@pytest.fixture(scope="module")
def both(
    multiarch_debian: MultiArchDebian,
    guest_agents: GuestAgents,
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """The multi-arch reference built as root for linux/amd64 (the recipe) and, with
    --platform, for linux/arm64; both in one home."""
    top = tmp_path_factory.mktemp("multi")
    recipe = multi_recipe(top, multiarch_debian.reference)
    home = top / "home"
    paths, seconds = {}, {}
    for platform, extra in ((AMD64, []), (ARM64, ["--platform", "linux/arm64"])):
        started = time.monotonic()
        code, out, err = run_cli(
            home, str(recipe), "--no-link", "--mirror", multiarch_debian.mirror, *extra
        )
        seconds[platform] = time.monotonic() - started
        assert code == 0, err
        paths[platform] = Path(out.strip())
    print(f"builds: amd64 {seconds[AMD64]:.1f} s, arm64 {seconds[ARM64]:.1f} s")
    return {"recipe": recipe, "paths": paths, "home": home}


def test_one_reference_builds_both_platforms(both: Any, multiarch_debian: MultiArchDebian) -> None:
    paths = both["paths"]
    manifests = {p: json.loads((paths[p] / "manifest.json").read_text()) for p in paths}
    assert manifests[AMD64]["image"]["platform"] == "linux/amd64"
    assert manifests[ARM64]["image"]["platform"] == "linux/arm64"
    for platform in (AMD64, ARM64):  # the index's entry for each platform, no other
        assert manifests[platform]["image"]["manifest"] == multiarch_debian.manifests[platform]
        assert manifests[platform]["image"]["reference"] == multiarch_debian.reference
    assert paths[AMD64] != paths[ARM64]
    lock = both["recipe"].with_suffix(".lock").read_text()  # one pin per platform
    assert multiarch_debian.manifests[AMD64] in lock and multiarch_debian.manifests[ARM64] in lock
    assert 'platform = "linux/arm64"' in lock and 'platform = "linux/amd64"' in lock


@pytest.mark.parametrize("platform", [AMD64, ARM64])
def test_each_image_is_its_own_layers_with_its_own_agent(
    both: Any, multiarch_debian: MultiArchDebian, platform: str
) -> None:
    arch = platform.split("/")[1]
    image = both["paths"][platform] / "rootfs.ext4"
    assert fsck(image).returncode == 0
    seen = read_image(image)
    expected = expected_tree(multiarch_debian.layouts[platform])
    injected = {d.lstrip("/") for d in DESTS} | {"etc/hostname", "etc/hosts", "etc/fstab"}
    differ = []
    for path, exp in expected.items():
        if not path or path in injected:
            continue
        got = seen.get(path)
        want = (exp.type, exp.uid, exp.gid, exp.mode, exp.sha256)
        if got is None or (got.type, got.uid, got.gid, got.mode, got.sha256) != want:
            differ.append(path)
    assert differ == [], differ[:20]
    ls = image_file(multiarch_debian.layouts[platform], "usr/bin/ls")  # == the image's
    assert elf_machine(ls) == ELF_MACHINE[arch]
    built = AGENTS / f"banger-vsock-agent-{arch}"
    assert seen["usr/local/bin/banger-vsock-agent"].sha256 == sha256_file(built)
    assert elf_machine(built.read_bytes()) == ELF_MACHINE[arch]


def test_an_unprivileged_user_builds_the_same_arm64_image_from_the_installed_package(
    both: Any, multiarch_debian: MultiArchDebian, unpriv_venv: UnprivVenv
) -> None:
    """As uid 65534, with banger-build installed in a venv, the recipe without its
    agent_ref: the built-in agent (package data there, not the checkout's
    agents/out) is the bytes the registry served, so the key is root's."""
    user = unpriv_venv.user()
    try:
        (user.home / ".git").mkdir()
        builtin = both["recipe"].parent / "builtin.toml"
        text = both["recipe"].read_text()
        assert f'agent_ref = "{AGENT_REFERENCE}"\n' in text
        builtin.write_text(text.replace(f'agent_ref = "{AGENT_REFERENCE}"\n', ""))
        recipes = user.copy_in(both["recipe"].parent, "recipes")
        proc = user.run(
            [recipes / "builtin.toml", "--no-link", "--platform", "linux/arm64",
             "--mirror", multiarch_debian.mirror],
        )  # fmt: skip
        path = Path(proc.stdout.strip())
        root_path = both["paths"][ARM64]
        assert path.name == root_path.name  # the same store key
        assert sha256_file(path / "rootfs.ext4") == sha256_file(root_path / "rootfs.ext4")
        where = user.run_cmd(
            [unpriv_venv.python, "-c", "from banger_build import guest; "
             "print(guest.builtin_agent('linux/arm64', 'arm64'))"],
        ).stdout.strip()  # fmt: skip
        assert where.startswith(str(unpriv_venv.venv)) and where.endswith(
            "agents/banger-vsock-agent-arm64"
        )
    finally:
        user.cleanup()


def test_a_platform_the_index_or_image_lacks_fails_clearly(
    both: Any, multiarch_debian: MultiArchDebian, debian_image_and_agent: Any
) -> None:
    bare = both["recipe"].parent / "bare.toml"  # no guest set: no agent for riscv64 needed
    bare.write_text(both["recipe"].read_text().replace("[guest]\n", "[guest]\nagents = false\n"))
    code, _, err = run_cli(
        both["home"], str(bare), "--no-link", "--mirror", multiarch_debian.mirror,
        "--platform", "linux/riscv64",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert "no image for platform linux/riscv64 (available: linux/amd64, linux/arm64/v8)" in err
    code, _, err = run_cli(  # with the guest set, the agent is said first (the pinned index)
        both["home"], str(both["recipe"]), "--no-link", "--platform", "linux/riscv64",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert (
        f"{AGENT_REFERENCE}: no file for platform linux/riscv64 (available: linux/amd64, "
        "linux/arm64)" in err
    ), err
    # recipes/debian.toml's reference is a single linux/amd64 image: no arm64 in it
    recipe = both["recipe"].parent / "single.toml"
    recipe.write_text((REPO / "recipes" / "debian.toml").read_text())
    code, _, err = run_cli(
        both["home"], str(recipe), "--no-link", "--mirror", debian_image_and_agent.mirror,
        "--platform", "linux/arm64",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert re.search(r"image is for linux/amd64, the recipe asks for linux/arm64", err), err


def test_the_arm64_image_boots_to_the_guest_probe_in_qemu_system_aarch64(
    multiarch_debian: MultiArchDebian,
    guest_agents: GuestAgents,
    arm64_boot_kernel: BootKernel,
    tmp_path: Path,
) -> None:
    kernel = arm64_boot_kernel
    assert kernel_arch(kernel.vmlinuz) == "arm64"
    home, store_path = guestprobe.build_probe(
        tmp_path, ref=multiarch_debian.reference, platform="linux/arm64",
        mirror=multiarch_debian.mirror, kernel=kernel,
    )  # fmt: skip
    assert kernel_arch(store_path / "vmlinux") == "arm64"

    err, console, boot_s = guestprobe.boot(
        home, store_path, tmp_path / "console.log", "--ping-agent", "--timeout", "900"
    )
    print(f"arm64 TCG boot to the login prompt: {boot_s:.1f} s")
    assert "qemu-system-aarch64 -M virt -accel tcg" in err and "-cpu max" in err
    assert "an arm64 guest on a x86_64 host: TCG" in err
    assert "boot ok under tcg (arm64)" in err and "the login prompt appeared" in err
    assert " login: " in console.splitlines()[-1]
    got = guestprobe.assert_guest_set_ran(console)
    assert got["arch"] == "aarch64"
    assert got["route"].startswith("default via 10.0.2.2"), got
    guestprobe.assert_agent_ping(err, console)
