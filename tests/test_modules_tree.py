"""A modules tree is checked where it enters: the recipe's ``[kernel] modules``,
``kernel push --modules`` and a kernel artifact's modules.tar. Its top holds
``modules.order`` or ``kernel/``; a directory with one ``lib/modules/<version>``
(or ``usr/lib/modules/<version>``) below is taken as that one, with a note; none
or several below is an error naming what was found. Installed, the tree gets the
generated modules.dep and indexes: root-owned, 0644, at the epoch, the same
bytes for the same modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from banger_build.errors import InputError, Reason, RecipeError
from banger_build.inputs import hash_tree, resolve_kernel
from banger_build.kmodules import ModulesTreeError, find_tree
from banger_build.oci.kernel import (
    CONFIG_TYPE,
    LAYERS,
    config_bytes,
    manifest_bytes,
    modules_tar_is_tree,
    write_modules_tar,
)
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor
from banger_build.oci.reference import Digest
from banger_build.recipe import load_recipe
from tests.support.e2e import run_cli, write_recipe
from tests.support.ext4read import read_at, read_image
from tests.support.kmod import Mod, module_tree
from tests.support.oci import Pusher
from tests.support.registry import RegistryServer

VERSION = "6.1.0-test-amd64"
MODS = [
    Mod("kernel/net/vsock.ko", ["alias=net-pf-40"], exports=["vsock_core_register"]),
    Mod("kernel/net/vmw_vsock_virtio_transport.ko.xz", needs=["vsock_core_register"]),
    Mod("kernel/fs/fuse.ko", ["alias=devname:fuse", "alias=char-major-10-229"]),
]
GENERATED = ("modules.dep", "modules.dep.bin", "modules.alias.bin", "modules.builtin.bin")


def package_root(top: Path, *versions: str, usr: bool = False) -> Path:
    """An unpacked kernel package: boot/, and lib/modules/<version> per version."""
    (top / "boot").mkdir(parents=True)
    (top / "boot" / f"vmlinuz-{VERSION}").write_bytes(b"kernel")
    for v in versions:
        module_tree(top / ("usr/lib" if usr else "lib") / "modules" / v, MODS)
    return top


# -- find_tree ------------------------------------------------------------------------


def test_a_tree_is_itself(tmp_path: Path) -> None:
    tree = module_tree(tmp_path / VERSION, MODS)
    assert find_tree(tree) == (tree, None)
    (tree / "modules.order").unlink()  # kernel/ alone marks it too
    assert find_tree(tree) == (tree, None)


@pytest.mark.parametrize(
    ("given", "below"),
    [
        ("pkg", f"lib/modules/{VERSION}"),
        ("pkg/lib/modules", VERSION),
        ("pkg/lib", f"modules/{VERSION}"),
    ],
)
def test_the_one_tree_below_is_taken_with_a_note(tmp_path: Path, given: str, below: str) -> None:
    package_root(tmp_path / "pkg", VERSION)
    tree, note = find_tree(tmp_path / given)
    assert tree == tmp_path / "pkg" / "lib" / "modules" / VERSION
    assert note == f"{tmp_path / given} is not a modules tree; using {below} below it"


def test_a_usr_merged_package_is_found_through_usr_not_its_lib_symlink(tmp_path: Path) -> None:
    pkg = package_root(tmp_path / "pkg", VERSION, usr=True)
    (pkg / "lib").symlink_to("usr/lib")  # never followed: one tree, not two
    tree, note = find_tree(pkg)
    assert tree == pkg / "usr" / "lib" / "modules" / VERSION
    assert note is not None and f"usr/lib/modules/{VERSION} below" in note


def test_several_trees_below_are_named(tmp_path: Path) -> None:
    pkg = package_root(tmp_path / "pkg", VERSION, "6.1.0-other-amd64")
    with pytest.raises(ModulesTreeError) as info:
        find_tree(pkg)
    assert info.value.reason == Reason.AMBIGUOUS_MODULES == "ambiguous-modules"
    assert info.value.message == (
        f"{pkg} holds 2 modules trees: lib/modules/6.1.0-other-amd64, lib/modules/{VERSION}; "
        "name one of them"
    )


def test_a_directory_without_modules_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "lib" / "modules" / VERSION / "extra").mkdir(parents=True)  # no order, no kernel/
    (empty / "x.ko").write_bytes(b"")  # a .ko somewhere is not a tree
    with pytest.raises(ModulesTreeError) as info:
        find_tree(empty)
    assert info.value.reason == Reason.NOT_A_MODULES_TREE == "not-a-modules-tree"
    assert info.value.message.startswith(f"{empty} is not a kernel modules tree: ")


# -- the recipe -----------------------------------------------------------------------


def line_of(recipe: Path, start: str, after: str = "[kernel]") -> int:
    """The line number of the first line starting with ``start`` after ``after``."""
    lines = recipe.read_text().splitlines()
    first = lines.index(after)
    return next(i for i, ln in enumerate(lines, 1) if i > first and ln.startswith(start))


def kernel_recipe(directory: Path, image: str, modules: Path, install: bool = True) -> Path:
    (directory / "k").mkdir(parents=True, exist_ok=True)
    (directory / "k" / "vmlinuz").write_bytes(b"kernel")
    extra = f'[kernel]\npath = "k/vmlinuz"\nmodules = "{modules}"\n'
    return write_recipe(directory, image, extra=extra + ("install_modules = true\n" * install))


def test_the_recipe_error_is_at_kernel_modules(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    recipe = kernel_recipe(tmp_path, "registry.example/x:1", tmp_path / "empty")
    kernel = load_recipe(recipe).kernel
    with pytest.raises(RecipeError) as info:
        resolve_kernel(kernel)
    assert info.value.reason == "not-a-modules-tree"
    line = line_of(recipe, "modules =")
    assert info.value.key == "kernel.modules" and info.value.line == line
    assert str(info.value).startswith(f"{recipe}:{line}:1: kernel.modules: {tmp_path / 'empty'} is")
    package_root(tmp_path / "pkg", VERSION, "6.1.0-other-amd64")
    recipe = kernel_recipe(tmp_path, "registry.example/x:1", tmp_path / "pkg")
    with pytest.raises(RecipeError) as info:
        resolve_kernel(load_recipe(recipe).kernel)
    assert info.value.reason == "ambiguous-modules" and info.value.key == "kernel.modules"


def test_a_package_root_builds_with_its_tree_and_the_generated_indexes(
    tmp_path: Path, image_ref: str
) -> None:
    pkg = package_root(tmp_path / "pkg", VERSION)
    recipe = kernel_recipe(tmp_path / "r", image_ref, pkg)
    allow = ("--allow-source", str(tmp_path))
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", *allow)
    assert code == 0, err
    tree = pkg / "lib" / "modules" / VERSION
    assert f"kernel.modules: {pkg} is not a modules tree; using lib/modules/{VERSION} below" in err
    path = Path(out.strip())
    manifest = json.loads((path / "manifest.json").read_text())
    drv = manifest["derivation"]
    assert drv["modules_install"] == f"/lib/modules/{VERSION}" and drv["modules_index"] == 1
    assert manifest["outputs"]["modules"]["sha256"] == hash_tree(tree)[0]  # the tree, staged
    seen = read_image(path / "rootfs.ext4")
    base = f"usr/lib/modules/{VERSION}"
    under = sorted(p.removeprefix(base + "/") for p in seen if p.startswith(base + "/"))
    assert "boot" not in under and "lib" not in under and "kernel/net/vsock.ko" in under
    for name in GENERATED:
        f = seen[f"{base}/{name}"]
        assert (f.uid, f.gid, f.mode & 0o7777, f.mtime) == (0, 0, 0o644, drv["epoch"]), name
    dep = read_at(path / "rootfs.ext4", f"{base}/modules.dep", 0, seen[f"{base}/modules.dep"].size)
    assert dep == (
        b"kernel/net/vsock.ko:\n"
        b"kernel/net/vmw_vsock_virtio_transport.ko.xz: kernel/net/vsock.ko\n"
        b"kernel/fs/fuse.ko:\n"
    )
    assert seen[f"{base}/modules.devname"].size == 0  # no /bin/kmod to read it


def test_the_same_modules_give_the_same_image_and_devname_with_kmod(
    tmp_path: Path, image_ref: str
) -> None:
    """Two trees with the same modules (made in another order, at other times)
    give one key and one image; an image with /bin/kmod gets modules.devname."""
    one = module_tree(tmp_path / "one" / VERSION, MODS)
    two = module_tree(tmp_path / "two" / VERSION, list(reversed(MODS)), order=[
        m.path.removesuffix(".xz") for m in MODS
    ])  # fmt: skip
    for p in two.rglob("*"):
        os.utime(p, (1, 1), follow_symlinks=False)
    kmod_line = '\n[[files]]\nsrc = "hello.txt"\ndest = "/bin/kmod"\nmode = "0755"\n'
    paths = []
    for tree in (one, two):
        recipe = kernel_recipe(tmp_path / f"r-{tree.parent.name}", image_ref, tree)
        recipe.write_text(recipe.read_text() + kmod_line)
        code, out, err = run_cli(
            tmp_path / "home", str(recipe), "--no-link", "--allow-source", str(tmp_path)
        )
        assert code == 0, err
        paths.append(Path(out.strip()))
    assert paths[0] == paths[1]  # the same key: a cache hit
    base = f"usr/lib/modules/{VERSION}"
    seen = read_image(paths[0] / "rootfs.ext4")
    devname = read_at(paths[0] / "rootfs.ext4", f"{base}/modules.devname", 0, 200)
    assert devname.rstrip(b"\0") == (
        b"# Device nodes to trigger on-demand module loading.\nfuse fuse c10:229\n"
    )
    assert seen[f"{base}/modules.devname"].size == len(devname.rstrip(b"\0"))


def test_a_module_the_generator_refuses_fails_the_build_at_kernel_modules(
    tmp_path: Path, image_ref: str
) -> None:
    tree = module_tree(tmp_path / VERSION, MODS)
    (tree / "kernel" / "broken.ko").write_bytes(b"not ELF")
    recipe = kernel_recipe(tmp_path / "r", image_ref, tree)
    code, out, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--allow-source", str(tmp_path)
    )
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"banger-build: error: {recipe}:{line_of(recipe, 'modules =')}:1: kernel.modules: "
        f"{tree}/kernel/broken.ko: not an ELF kernel module"
    )
    assert list((tmp_path / "home" / "store").iterdir()) == []


# -- kernel push and kernel artifacts -------------------------------------------------


def test_kernel_push_takes_the_tree_below_a_package_root(
    tmp_path: Path, registry: RegistryServer
) -> None:
    pkg = package_root(tmp_path / "pkg", VERSION)
    ref = f"{registry.host}/kernels/pkg:1"
    kernel = str(pkg / "boot" / f"vmlinuz-{VERSION}")
    code, out, err = run_cli(
        tmp_path / "home", "kernel", "push", ref, "--kernel", kernel, "--modules", str(pkg)
    )
    assert code == 0, err
    assert f"--modules: {pkg} is not a modules tree; using lib/modules/{VERSION} below it" in err
    tar = io.BytesIO()
    write_modules_tar(pkg / "lib" / "modules" / VERSION, tar)
    digest = "sha256:" + hashlib.sha256(tar.getvalue()).hexdigest()
    got = Pusher(registry.url, "kernels/pkg").request(
        "GET", "/v2/kernels/pkg/manifests/1", headers={"Accept": OCI_MANIFEST}
    )
    assert digest in [layer["digest"] for layer in got.json()["layers"]]
    (tmp_path / "none").mkdir()
    code, out, err = run_cli(
        tmp_path / "home", "kernel", "push", ref, "--kernel", kernel, "--modules",
        str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 1 and out == ""
    assert err.strip() == (
        f"banger-build: error: --modules {tmp_path / 'none'} is not a kernel modules tree: "
        "a lib/modules/<version> directory holds modules.order or kernel/ at its top, "
        "and none lies below it"
    )


def test_an_artifact_whose_modules_are_not_a_tree_is_refused_before_the_build(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    """As an older `kernel push --modules PACKAGE-ROOT` made them."""
    pkg = package_root(tmp_path / "pkg", VERSION)
    tar = io.BytesIO()
    write_modules_tar(pkg, tar)  # the package root, not its lib/modules/<version>
    pusher = Pusher(registry.url, "kernels/old")
    files = []
    for name, data in (("vmlinux", b"kernel"), ("modules.tar", tar.getvalue())):
        got = pusher.push_blob(data)
        files.append((name, Descriptor(LAYERS[name], Digest.parse(got["digest"]), got["size"])))
    config = pusher.push_blob(config_bytes(VERSION))
    manifest = manifest_bytes(
        Descriptor(CONFIG_TYPE, Digest.parse(config["digest"]), config["size"]), files
    )
    pusher.push_manifest("1", manifest, OCI_MANIFEST)
    recipe = write_recipe(
        tmp_path / "r", image_ref,
        extra=f'[kernel]\nref = "{registry.host}/kernels/old:1"\ninstall_modules = true\n',
    )  # fmt: skip
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 1 and out == "" and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    at = line_of(recipe, "ref =", after="[kernel]")
    assert line.startswith(f"banger-build: error: {recipe}:{at}:1: kernel.install_modules: ")
    assert "not a modules tree (no modules.order or kernel/ at the top of its modules.tar)" in line


def test_modules_tar_is_tree_reads_the_top(tmp_path: Path) -> None:
    pkg = package_root(tmp_path / "pkg", VERSION)
    for source, expected in ((pkg / "lib" / "modules" / VERSION, True), (pkg, False)):
        with open(tmp_path / "m.tar", "wb") as out:
            write_modules_tar(source, out)
        assert modules_tar_is_tree(tmp_path / "m.tar") is expected
    (tmp_path / "m.tar").write_bytes(b"x" * 1000)
    with pytest.raises(InputError) as info:
        modules_tar_is_tree(tmp_path / "m.tar")
    assert info.value.reason == "invalid-modules"
    with tarfile.open(tmp_path / "m.tar", "w") as t:  # a tar without kernel/ but a file
        data = b"kernel"
        member = tarfile.TarInfo("kernel")
        member.size = len(data)
        t.addfile(member, io.BytesIO(data))
    assert modules_tar_is_tree(tmp_path / "m.tar") is False
