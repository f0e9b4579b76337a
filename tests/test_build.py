"""End to end: recipe -> real registry -> store path with a checked rootfs.ext4."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from banger_build.inputs import hash_tree
from tests.support.e2e import BASE, CAP, UPPER, push, run_cli, write_recipe
from tests.support.ext4read import fsck, read_image, sha256_file
from tests.support.kmod import VSOCK_KO
from tests.support.oci import Entry
from tests.support.registry import RegistryServer
from tests.support.tarlayer import member


def test_build_end_to_end(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    link = tmp_path / "result"
    code, out, err = run_cli(tmp_path / "home", str(recipe), "-o", str(link))
    assert code == 0, err
    store_path = Path(out.strip())
    assert store_path.parent == tmp_path / "home" / "store"
    assert os.readlink(link) == str(store_path)
    assert sorted(p.name for p in store_path.iterdir()) == ["manifest.json", "rootfs.ext4"]
    assert (store_path / "rootfs.ext4").stat().st_mode & 0o777 == 0o444

    manifest = json.loads((store_path / "manifest.json").read_text())
    assert manifest["outputs"]["rootfs.ext4"]["sha256"] == sha256_file(store_path / "rootfs.ext4")
    assert store_path.name == f"{manifest['key']}-{manifest['name']}"
    assert manifest["image"]["layers"][0]["digest"].startswith("sha256:")

    image = store_path / "rootfs.ext4"
    assert fsck(image).returncode == 0
    seen = read_image(image)
    assert seen["usr/bin/su"].mode == 0o104755 and seen["usr/bin/su"].uid == 0
    assert (seen["etc/shadow"].mode & 0o7777, seen["etc/shadow"].gid) == (0o640, 42)
    assert "etc/motd" not in seen
    assert "var/cache/apt/junk" not in seen and "var/cache/apt/fresh" in seen
    assert seen["usr/bin/ping"].xattrs == {"security.capability": CAP}
    assert seen["dev/console"].type == "chr" and seen["dev/console"].rdev == (5, 1)
    assert seen["root-only"].mode & 0o7777 == 0o600
    # the recipe's files: owner names resolved in the image, templates rendered,
    # destinations through the image's /lib -> usr/lib symlink
    hello = seen["etc/hello"]
    assert (hello.uid, hello.gid, hello.mode & 0o7777) == (0, 4, 0o640)
    unit = seen["usr/lib/systemd/system/test.service"]
    assert (unit.uid, unit.gid, unit.mode & 0o7777) == (0, 0, 0o644)
    wants = seen["etc/systemd/system/multi-user.target.wants/test.service"]
    assert wants.type == "symlink" and wants.target == "/lib/systemd/system/test.service"

    lock = recipe.with_suffix(".lock").read_text()
    assert manifest["image"]["manifest"] in lock


def test_second_build_is_a_cache_hit_with_the_registry_stopped(tmp_path: Path) -> None:
    with RegistryServer() as server:
        push(server, "e2e/offline", [BASE, UPPER])
        recipe = write_recipe(tmp_path / "r", f"{server.host}/e2e/offline:v1")
        code, first, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
        assert code == 0, err
    assert not server.running
    before = sorted((tmp_path / "home" / "store").iterdir())
    started = time.monotonic()
    code, second, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert second == first and elapsed < 1.0
    assert "cached" in err and "making ext4" not in err
    assert sorted((tmp_path / "home" / "store").iterdir()) == before
    assert list((tmp_path / "home" / "tmp").iterdir()) == []


def test_same_inputs_give_the_same_store_path_and_bytes(tmp_path: Path, image_ref: str) -> None:
    paths = []
    for i in range(2):
        recipe = write_recipe(tmp_path / f"r{i}", image_ref)
        code, out, err = run_cli(tmp_path / f"home{i}", str(recipe), "--no-link")
        assert code == 0, err
        paths.append(Path(out.strip()))
    assert paths[0].name == paths[1].name
    assert sha256_file(paths[0] / "rootfs.ext4") == sha256_file(paths[1] / "rootfs.ext4")
    assert (paths[0] / "manifest.json").read_bytes() == (paths[1] / "manifest.json").read_bytes()


def test_a_changed_input_changes_the_key(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, first, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    (tmp_path / "r" / "hello.txt").write_text("changed\n")
    code, second, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0 and first != second


def test_mirror_serves_docker_hub_references(tmp_path: Path, registry: RegistryServer) -> None:
    push(registry, "library/mirrored", [BASE])
    recipe = write_recipe(tmp_path / "r", "docker.io/library/mirrored:v1")
    code, out, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--mirror", f"docker.io={registry.url}"
    )
    assert code == 0, err
    assert Path(out.strip()).name.endswith("-mirrored-v1")


def test_hostile_layer_leaves_no_store_entry(tmp_path: Path, registry: RegistryServer) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = [member("evil", "symlink", linkname=str(outside)), member("evil/planted", data=b"x")]
    pushed = push(registry, "e2e/hostile", [BASE, evil])
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/e2e/hostile:v1")
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1 and out == ""
    assert pushed.layer_digests[1] in err and "evil/planted" in err
    assert "Traceback" not in err
    assert list((tmp_path / "home" / "store").iterdir()) == []
    assert list((tmp_path / "home" / "tmp").iterdir()) == []
    assert list(outside.iterdir()) == []


def test_recipe_typo_names_file_line_col_and_a_hint(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[image]\nref = "debian:bookworm"\n\n[rootfs]\nsise = "4GiB"\n')
    code, out, err = run_cli(tmp_path / "home", str(recipe))
    assert code == 1 and out == ""
    assert f"{recipe}:5:1: rootfs.sise:" in err and "did you mean 'size'" in err
    assert "Traceback" not in err


def test_too_small_size_names_the_size_needed(tmp_path: Path, registry: RegistryServer) -> None:
    push(registry, "e2e/big", [[*BASE, Entry.file("big", os.urandom(16 << 20))]])
    recipe = write_recipe(
        tmp_path / "r", f"{registry.host}/e2e/big:v1", extra='\n[rootfs]\nsize = "8MiB"\n'
    )
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1
    assert "8MiB is too small" in err and "needs at least" in err and "Traceback" not in err
    assert list((tmp_path / "home" / "store").iterdir()) == []


def test_undefined_template_variable_is_a_clear_error(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    (tmp_path / "r" / "unit.j2").write_text("line one\n{{ missing_var }}\n")
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1
    assert "unit.j2:2" in err and "missing_var" in err and "Traceback" not in err


def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", "127.0.0.1:9/nothing/here:v1")
    started = time.monotonic()
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1 and time.monotonic() - started < 10
    assert "127.0.0.1:9/nothing/here:v1" in err and "Traceback" not in err


def test_kernel_is_staged_and_modules_installed(tmp_path: Path, image_ref: str) -> None:
    kdir = tmp_path / "k"
    mods = kdir / "6.1.0-test-amd64"
    (mods / "kernel" / "net").mkdir(parents=True)
    (mods / "kernel" / "net" / "vsock.ko").write_bytes(VSOCK_KO)
    (mods / "modules.order").write_text("kernel/net/vsock.ko\n")
    (mods / "build").symlink_to("/usr/src/linux-headers-6.1.0-test-amd64")
    os.chmod(mods / "modules.order", 0o600)  # source modes do not leak into the image
    (kdir / "vmlinuz").write_bytes(b"kernel")
    recipe = write_recipe(
        tmp_path / "r",
        image_ref,
        extra=f"""
[kernel]
path = "{kdir / "vmlinuz"}"
modules = "{mods}"
install_modules = true
""",
    )
    code, out, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--allow-source", str(kdir)
    )
    assert code == 0, err
    path = Path(out.strip())
    assert (path / "vmlinux").read_bytes() == b"kernel" and (path / "modules").is_dir()
    seen = read_image(path / "rootfs.ext4")
    base = "usr/lib/modules/6.1.0-test-amd64"  # through the image's /lib -> usr/lib
    ko = seen[f"{base}/kernel/net/vsock.ko"]
    assert (ko.uid, ko.gid, ko.mode & 0o7777, ko.size) == (0, 0, 0o644, len(VSOCK_KO))
    assert seen[f"{base}/modules.order"].mode & 0o7777 == 0o644
    assert seen[f"{base}/build"].target == "/usr/src/linux-headers-6.1.0-test-amd64"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["derivation"]["modules_install"] == "/lib/modules/6.1.0-test-amd64"
    assert manifest["outputs"]["vmlinux"] == {"sha256": sha256_file(path / "vmlinux"), "size": 6}
    assert manifest["outputs"]["modules"]["sha256"] == hash_tree(mods)[0]  # as staged


def test_modules_with_a_name_debugfs_cannot_carry_are_refused(
    tmp_path: Path, image_ref: str
) -> None:
    mods = tmp_path / "k" / "6.1.0-test-amd64"
    (mods / "kernel").mkdir(parents=True)
    (mods / "evil\nname.ko").write_bytes(VSOCK_KO)
    (tmp_path / "k" / "vmlinuz").write_bytes(b"kernel")
    recipe = write_recipe(
        tmp_path / "r",
        image_ref,
        extra=f"""
[kernel]
path = "{tmp_path / "k" / "vmlinuz"}"
modules = "{mods}"
install_modules = true
""",
    )
    code, out, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--allow-source", str(tmp_path / "k")
    )
    assert code == 1 and out == "" and "cannot carry" in err and "Traceback" not in err
    assert list((tmp_path / "home" / "store").iterdir()) == []


def test_the_same_image_recompressed_or_repushed_gives_the_same_key_and_bytes(
    tmp_path: Path, registry: RegistryServer
) -> None:
    """The derivation knows the image by its config and diff_ids, not by how its
    layers were compressed: gzip vs zstd, two repositories, one key, one image."""
    from tests.support.oci import make_layer, push_image

    paths = []
    for compression in ("gzip", "zstd"):
        repo = f"recompressed/{compression}"
        layers = [make_layer(lay, compression=compression) for lay in (BASE, UPPER)]
        image = push_image(registry.url, repo, "v1", layers)
        recipe = write_recipe(tmp_path / compression, f"{registry.host}/{repo}:v1")
        recipe.write_text('name = "same"\n' + recipe.read_text())  # else named after the repo
        code, out, err = run_cli(tmp_path / f"home-{compression}", str(recipe), "--no-link")
        assert code == 0, err
        paths.append(Path(out.strip()))
        manifest = json.loads((paths[-1] / "manifest.json").read_text())
        assert manifest["image"]["manifest"] == image.digest  # how it was fetched
        assert "manifest" not in manifest["derivation"]["image"]
    gzip_path, zstd_path = paths
    assert gzip_path.name == zstd_path.name
    assert sha256_file(gzip_path / "rootfs.ext4") == sha256_file(zstd_path / "rootfs.ext4")
