"""A kernel as an OCI artifact: `kernel push`, `[kernel] ref`, the `[[kernel]]` lock pin."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from banger_build.errors import RecipeError
from banger_build.lockfile import KernelPin, Lock
from banger_build.oci.blobs import BlobCache
from banger_build.oci.kernel import ARTIFACT_TYPE, LAYERS, write_modules_tar
from banger_build.oci.reference import Digest, Reference
from banger_build.recipe import load_recipe
from tests.support.e2e import BASE, UPPER, push, run_cli, write_recipe
from tests.support.ext4read import read_image
from tests.support.kmod import VSOCK_KO
from tests.support.registry import RegistryServer

VERSION = "6.1.0-test-amd64"


def make_modules(root: Path) -> Path:
    mods = root / VERSION
    (mods / "kernel" / "net").mkdir(parents=True)
    (mods / "kernel" / "net" / "vsock.ko").write_bytes(VSOCK_KO)
    (mods / "modules.order").write_text("kernel/net/vsock.ko\n")
    (mods / "build").symlink_to("/usr/src/linux-headers-6.1.0-test-amd64")
    return mods


def push_kernel(
    home: Path,
    ref: str,
    kdir: Path,
    kernel: bytes = b"kernel",
    initrd: bytes | None = b"initrd",
    modules: Path | None = None,
) -> str:
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "vmlinuz").write_bytes(kernel)
    args = ["kernel", "push", ref, "--kernel", str(kdir / "vmlinuz")]
    if initrd is not None:
        (kdir / "initrd").write_bytes(initrd)
        args += ["--initrd", str(kdir / "initrd")]
    if modules is not None:
        args += ["--modules", str(modules)]
    code, out, err = run_cli(home, *args)
    assert code == 0, err
    digest = out.strip()
    Digest.parse(digest)
    return digest


def kernel_recipe(directory: Path, image: str, kernel: str, extra: str = "") -> Path:
    return write_recipe(directory, image, extra=f'\n[kernel]\nref = "{kernel}"\n{extra}')


def test_push_then_build_stages_the_artifact_and_pins_it(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    kref = f"{registry.host}/kernels/basic:6.1"
    digest = push_kernel(tmp_path / "home", kref, tmp_path / "k")
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref)
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    assert (path / "vmlinux").read_bytes() == b"kernel"
    assert (path / "initrd.img").read_bytes() == b"initrd"
    lock = Lock.load(recipe.with_suffix(".lock"))
    assert lock.kernels == (KernelPin(kref, Digest.parse(digest)),)
    assert f"pinned kernel {kref} to {digest}" in err
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["derivation"]["kernel"]) == {"vmlinux", "initrd.img"}


def test_pushed_manifest_is_an_annotated_kernel_artifact(
    tmp_path: Path, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    digest = push_kernel(
        home,
        f"{registry.host}/kernels/shape:1",
        tmp_path / "k",
        modules=make_modules(tmp_path / "m"),
    )
    cached = BlobCache(home / "blobs").get(Digest.parse(digest))
    assert cached is not None  # push_manifest keeps what it pushed
    body = json.loads(cached.read_bytes())
    assert body["artifactType"] == ARTIFACT_TYPE
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in body["layers"]]
    assert titles == ["vmlinux", "initrd.img", "modules.tar"]
    assert [layer["mediaType"] for layer in body["layers"]] == list(LAYERS.values())


def test_push_is_deterministic(tmp_path: Path, registry: RegistryServer) -> None:
    mods = make_modules(tmp_path / "a")
    first = push_kernel(
        tmp_path / "home", f"{registry.host}/kernels/det:1", tmp_path / "k", modules=mods
    )
    # other modes, times and place: the same artifact
    other = make_modules(tmp_path / "b")
    os.chmod(other / "modules.order", 0o600)
    os.utime(other / "kernel" / "net" / "vsock.ko", (12345, 12345))
    second = push_kernel(
        tmp_path / "home2", f"{registry.host}/kernels/det:2", tmp_path / "k2", modules=other
    )
    assert first == second
    one, two = io.BytesIO(), io.BytesIO()
    write_modules_tar(mods, one)
    write_modules_tar(other, two)
    assert one.getvalue() == two.getvalue()
    with tarfile.open(fileobj=io.BytesIO(one.getvalue())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [
        "build",
        "kernel",
        "kernel/net",
        "kernel/net/vsock.ko",
        "modules.order",
    ]
    assert all((m.uid, m.gid, m.mtime) == (0, 0, 0) for m in members.values())
    assert members["modules.order"].mode == 0o644 and members["kernel"].mode == 0o755
    assert members["build"].linkname == "/usr/src/linux-headers-6.1.0-test-amd64"


def test_second_build_is_a_cache_hit_with_the_registry_stopped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with RegistryServer() as server:
        push(server, "e2e/kernel-offline", [BASE, UPPER])
        kref = f"{server.host}/kernels/offline:1"
        push_kernel(tmp_path / "pusher", kref, tmp_path / "k")
        recipe = kernel_recipe(tmp_path / "r", f"{server.host}/e2e/kernel-offline:v1", kref)
        code, first, err = run_cli(home, str(recipe), "--no-link")
        assert code == 0, err
    assert not server.running
    code, second, err = run_cli(home, str(recipe), "--no-link")
    assert code == 0, err
    assert second == first
    assert "cached" in err and "making ext4" not in err and "resolving" not in err


def test_locked_without_a_kernel_pin_names_kernel_ref(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    kref = f"{registry.host}/kernels/locked:1"
    push_kernel(tmp_path / "home", kref, tmp_path / "k")
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref)
    code, _, err = run_cli(tmp_path / "home", "lock", str(recipe))
    assert code == 0, err
    lock_path = recipe.with_suffix(".lock")
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--locked")
    assert code == 0, err
    replace(Lock.load(lock_path), kernels=()).save(lock_path)
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--locked")
    assert code == 1
    assert "kernel.ref" in err and "not locked" in err and "Traceback" not in err


def test_update_kernel_moves_the_pin(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    kref = f"{registry.host}/kernels/moving:latest"
    old = push_kernel(home, kref, tmp_path / "k", kernel=b"old kernel")
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref)
    code, out, err = run_cli(home, str(recipe), "--no-link")
    assert code == 0, err
    assert (Path(out.strip()) / "vmlinux").read_bytes() == b"old kernel"
    new = push_kernel(home, kref, tmp_path / "k", kernel=b"new kernel")
    assert new != old
    # the pin holds: the moved tag is not followed by a plain build
    code, out, err = run_cli(home, str(recipe), "--no-link")
    assert code == 0 and (Path(out.strip()) / "vmlinux").read_bytes() == b"old kernel"
    code, _, err = run_cli(home, "update", str(recipe), "kernel")
    assert code == 0, err
    assert Lock.load(recipe.with_suffix(".lock")).kernels == (KernelPin(kref, Digest.parse(new)),)
    assert f"(was {old})" in err
    code, out, err = run_cli(home, str(recipe), "--no-link")
    assert code == 0, err
    assert (Path(out.strip()) / "vmlinux").read_bytes() == b"new kernel"


def test_install_modules_from_an_artifact(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    kref = f"{registry.host}/kernels/modules:1"
    push_kernel(
        tmp_path / "home", kref, tmp_path / "k", initrd=None, modules=make_modules(tmp_path / "m")
    )
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref, "install_modules = true\n")
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    assert (path / "modules.tar").is_file() and not (path / "initrd.img").exists()
    seen = read_image(path / "rootfs.ext4")
    base = f"usr/lib/modules/{VERSION}"  # through the image's /lib -> usr/lib
    ko = seen[f"{base}/kernel/net/vsock.ko"]
    assert (ko.uid, ko.gid, ko.mode & 0o7777, ko.size) == (0, 0, 0o644, len(VSOCK_KO))
    assert seen[f"{base}/build"].target == "/usr/src/linux-headers-6.1.0-test-amd64"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["derivation"]["modules_install"] == f"/lib/modules/{VERSION}"


def test_install_modules_needs_an_artifact_with_modules(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    kref = f"{registry.host}/kernels/nomodules:1"
    push_kernel(tmp_path / "home", kref, tmp_path / "k")
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref, "install_modules = true\n")
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1
    assert "kernel.install_modules" in err and "no modules" in err


@pytest.mark.parametrize(
    ("kernel", "reason", "line", "key"),
    [
        ('path = "k"\nref = "r.example/k:1"\n', "conflicting-keys", 6, "kernel"),
        ("install_modules = false\n", "missing-key", 4, "kernel.path"),
        ('ref = "r.example/k:1"\ninitrd = "i"\n', "conflicting-keys", 6, "kernel.initrd"),
        ('ref = "r.example/k:1"\nmodules = "m"\n', "conflicting-keys", 6, "kernel.modules"),
    ],
)
def test_kernel_table_needs_exactly_one_of_path_or_ref(
    tmp_path: Path, kernel: str, reason: str, line: int, key: str
) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f'[image]\nref = "debian:bookworm"\n\n[kernel]\n{kernel}')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (info.value.reason, info.value.line, info.value.key) == (reason, line, key)


def test_kernel_ref_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[image]\nref = "debian:bookworm"\n\n[kernel]\nref = "r.example/k:1"\n')
    kernel = load_recipe(path).kernel
    assert kernel is not None and kernel.path is None
    assert str(kernel.ref) == "r.example/k:1" and kernel.ref_where is not None


def test_lock_kernel_pins_round_trip(tmp_path: Path) -> None:
    digest = Digest("a" * 64)
    lock = Lock().with_kernel(Reference.parse("r.example/k:1"), digest)
    lock = lock.with_kernel(Reference.parse("r.example/a:1"), Digest("b" * 64))
    path = tmp_path / "x.lock"
    lock.save(path)
    assert Lock.load(path) == lock
    assert lock.to_bytes() == Lock.load(path).to_bytes()
    assert "[[kernel]]" in path.read_text()
    path.write_text(
        path.read_text() + f'\n[[kernel]]\nref = "r.example/k:1"\ndigest = "sha256:{"c" * 64}"\n'
    )
    with pytest.raises(RecipeError) as info:
        Lock.load(path)
    assert "pinned twice" in str(info.value)


def test_gc_keeps_a_rooted_paths_kernel_artifact_blobs(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    kref = f"{registry.host}/kernels/gc:1"
    digest = push_kernel(home, kref, tmp_path / "k", modules=make_modules(tmp_path / "m"))
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref)
    code, _, err = run_cli(home, str(recipe), "-o", str(tmp_path / "result"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "result" / "manifest.json").read_text())
    artifact = manifest["kernel_artifact"]
    assert artifact["manifest"] == digest and artifact["reference"] == kref
    code, _, err = run_cli(home, "gc")
    assert code == 0, err
    cache = BlobCache(home / "blobs")
    wanted = [artifact["manifest"], artifact["config"]] + [
        f"sha256:{k['sha256']}" for k in manifest["derivation"]["kernel"].values()
    ]
    assert len(wanted) == 5
    assert all(cache.get(Digest.parse(d)) is not None for d in wanted)


def test_check_of_a_store_path_uses_the_recorded_kernel_artifact(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    """The recipe's kernel ref moved to another artifact since: `check STORE-PATH`
    rebuilds with the one the path records (by manifest digest)."""
    kref = f"{registry.host}/kernels/recorded:6.1"
    push_kernel(tmp_path / "home", kref, tmp_path / "k", modules=make_modules(tmp_path / "m"))
    recipe = kernel_recipe(tmp_path / "r", image_ref, kref, extra="install_modules = true\n")
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    other = f"{registry.host}/kernels/other:6.1"
    push_kernel(tmp_path / "home", other, tmp_path / "k2", kernel=b"another kernel")
    recipe.write_text(recipe.read_text().replace(kref, other))
    code, out, err = run_cli(tmp_path / "home", "check", str(path))
    assert code == 0 and f"ok: {path} is reproducible" in out, err
