"""The modules index generator (``banger_build.depmod``) against kmod's depmod, its oracle.

depmod (Debian 12's kmod 30, from scripts/setup) runs on the same tree as
``depmod -b ROOT -C EMPTY VERSION``: no depmod.d configuration, as
``generate`` assumes. Every file must be the same: the text files byte for
byte but ``modules.symbols`` (depmod writes it in its hash table's order, we
sort it: the same lines), the ``.bin`` indexes byte for byte when depmod is
kmod 30 (whose layout we write; later versions put parents first) and key for
key with any. ``modules.weakdep`` is newer than kmod 30: only its header here.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from banger_build import depmod
from banger_build.errors import InputError
from banger_build.modindex import Index, read_index
from tests.support.kernel import KernelFiles
from tests.support.kmod import Mod, elf_module, module_tree

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def depmod_tool() -> tuple[str, int]:
    tool = shutil.which("depmod", path=PATH)
    if tool is None:
        pytest.fail("depmod is missing: install kmod (scripts/setup does)", pytrace=False)
    version = subprocess.run([tool, "-V"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"kmod version (\d+)", version)
    assert found, version
    return tool, int(found[1])


def run_depmod(tree: Path, work: Path, version: str = "6.1.0-test") -> Path:
    """What depmod writes for ``tree``: it runs on a view of it (a directory of
    symlinks to its entries, so a read-only cached tree serves), which it returns."""
    tool, _ = depmod_tool()
    out = work / "root" / "lib" / "modules" / version
    out.mkdir(parents=True)
    for entry in tree.iterdir():
        if entry.name not in depmod.GENERATED:
            (out / entry.name).symlink_to(entry)
    (work / "depmod.d").mkdir()
    subprocess.run(
        [tool, "-b", str(work / "root"), "-C", str(work / "depmod.d"), version],
        check=True, capture_output=True, env={"PATH": PATH},
    )  # fmt: skip
    return out


def assert_as_depmod(ours: dict[str, bytes], theirs: Path) -> None:
    _, kmod_version = depmod_tool()
    assert sorted(ours) == sorted(depmod.GENERATED)
    for name, data in ours.items():
        if name == "modules.weakdep":
            assert not (theirs / name).exists() or kmod_version >= 33
            if kmod_version < 33:
                continue
        want = (theirs / name).read_bytes()
        if name.startswith("modules.builtin") and want == b"":  # no list in the tree
            assert read_index(data) == {}, name  # depmod's empty file: libkmod fails on it
        elif name == "modules.symbols":
            head, *lines = data.splitlines(keepends=True)
            assert lines == sorted(lines)
            assert sorted(data.splitlines()) == sorted(want.splitlines()), name
        elif name.endswith(".bin") and kmod_version != 30:
            assert read_index(data) == read_index(want), name
        else:
            assert data == want, name


# -- the Debian kernel ----------------------------------------------------------------


def test_the_debian_kernels_indexes_are_depmods(
    debian_kernel_files: KernelFiles, tmp_path: Path
) -> None:
    tree = debian_kernel_files.modules_dir
    assert not (tree / "modules.dep").exists()  # as the package ships it
    ours = depmod.generate(tree)
    assert_as_depmod(ours, run_depmod(tree, tmp_path, debian_kernel_files.version))
    lines = ours["modules.dep"].decode().splitlines()
    assert len(lines) == len((tree / "modules.order").read_text().splitlines()) > 1000
    transport = next(ln for ln in lines if ln.startswith("kernel/net/vmw_vsock/vmw_vsock_virtio_"))
    assert transport.split() == [
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko:",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
        "kernel/net/vmw_vsock/vsock.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ]
    deps = read_index(ours["modules.dep.bin"])
    assert deps[b"vmw_vsock_virtio_transport"][0][1] == transport.encode()
    assert b"alias fs-vfat vfat\n" in ours["modules.alias"]
    # stored as libkmod looks it up: "-" as "_" (but in brackets)
    assert [v for _, v in read_index(ours["modules.alias.bin"])[b"fs_vfat"]] == [b"vfat"]
    assert b"ext4" in read_index(ours["modules.builtin.bin"])  # built into the cloud kernel


# -- made-up trees --------------------------------------------------------------------


def random_tree(root: Path, rng: random.Random) -> Path:
    """Modules needing each other's symbols (a DAG), aliases with brackets and
    dashes, soft dependencies, device nodes, compressed, 32-bit and big-endian
    ones, exports only in __ksymtab_strings, a symbol exported twice."""
    count = rng.randint(3, 14)
    names = [f"m{i}-{rng.choice(['net', 'fs', 'x'])}" for i in range(count)]
    mods: list[Mod] = []
    exports: list[list[str]] = []
    for i, name in enumerate(names):
        mine = [f"{name.replace('-', '_')}_fn{j}" for j in range(rng.randint(0, 3))]
        earlier = [s for e in exports[:i] for s in e]
        exports.append(list(mine))
        needs = rng.sample(earlier, min(len(earlier), rng.randint(0, 4)))
        if earlier and rng.random() < 0.2:  # exported again, by a module needing none
            mine.append(rng.choice(earlier))  # (so whichever owns it makes no cycle)
            needs = []
        needs += rng.sample(["printk", "kmalloc", "module_layout"], rng.randint(0, 2))
        rng.shuffle(needs)
        info = [f"name={name}", "license=GPL"]
        for _ in range(rng.randint(0, 3)):
            info.append(
                "alias="
                + rng.choice(
                    [f"pci:v{rng.randrange(99):08X}d*", f"fs-{name}", f"of:N*T*C{name}-x[ab-]*"]
                )
            )
        if rng.random() < 0.3:
            info.append(f"softdep=pre: {rng.choice(names)}")
        if rng.random() < 0.2:
            info += [f"alias=devname:{name}", f"alias=char-major-10-{rng.randrange(256)}"]
        extra: dict[str, object] = {}
        if rng.random() < 0.3:
            extra["versions"] = ["module_layout", *needs[:2], "not_needed_here"]
        if rng.random() < 0.2:
            extra.update(crc=False, ksymtab_strings=mine)
        if rng.random() < 0.2:
            extra.update(bits=32, big_endian=rng.random() < 0.5)
        suffix = rng.choice([".ko", ".ko", ".ko.xz", ".ko.zst"])
        sub = rng.choice(["kernel/drivers", "kernel/net/x", "kernel", "extra"])
        mods.append(Mod(f"{sub}/{name}{suffix}", info, mine, needs, extra))
    order = [m.path.split(".ko")[0] + ".ko" for m in mods]
    rng.shuffle(order)
    module_tree(root, mods, order=order)
    builtin = [f"kernel/fs/b{i}-{i}.ko" for i in range(rng.randint(0, 4))]
    (root / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    (root / "modules.builtin.modinfo").write_bytes(
        b"".join(
            f"b{i}_{i}.alias=fs-b{i}-x\0b{i}_{i}.license=GPL\0".encode()
            for i in range(len(builtin))
        )
    )
    return root


@pytest.mark.parametrize("seed", range(12))
def test_made_up_trees_index_as_depmod_does(seed: int, tmp_path: Path) -> None:
    tree = random_tree(tmp_path / "tree", random.Random(seed))
    assert_as_depmod(depmod.generate(tree), run_depmod(tree, tmp_path / "depmod"))


def test_a_module_under_updates_overrides_its_namesake(tmp_path: Path) -> None:
    tree = module_tree(
        tmp_path / "tree",
        [
            Mod("kernel/net/vsock.ko", ["alias=net-pf-40"], ["vsock_old"]),
            Mod("updates/dkms/vsock.ko.xz", ["alias=net-pf-40"], ["vsock_new"]),
            Mod("kernel/net/user.ko", needs=["vsock_new"]),
        ],
        order=["kernel/net/vsock.ko", "kernel/net/user.ko"],
    )
    ours = depmod.generate(tree)
    assert ours["modules.dep"] == b"kernel/net/user.ko: updates/dkms/vsock.ko.xz\n" + (
        b"updates/dkms/vsock.ko.xz:\n"
    )
    assert_as_depmod(ours, run_depmod(tree, tmp_path / "depmod"))


def test_modules_missing_from_modules_order_come_last_by_path(tmp_path: Path) -> None:
    """depmod leaves them in its hash table's order; ours does not depend on it,
    nor on the order files were made in, their modes or times."""
    mods = [Mod(f"kernel/{n}.ko") for n in ("c", "a", "b", "listed")]
    one = module_tree(tmp_path / "one", mods, order=["kernel/listed.ko"])
    two = module_tree(tmp_path / "two", list(reversed(mods)), order=["kernel/listed.ko"])
    for p in (two / "kernel").iterdir():
        os.chmod(p, 0o600)
        os.utime(p, (1, 1))
    assert depmod.generate(one)["modules.dep"] == (
        b"kernel/listed.ko:\nkernel/a.ko:\nkernel/b.ko:\nkernel/c.ko:\n"
    )
    assert depmod.generate(one) == depmod.generate(two)


def test_symlinks_and_headers_are_not_modules(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.ko"
    elsewhere.write_bytes(elf_module())
    tree = module_tree(tmp_path / "tree", [Mod("kernel/a.ko")])
    (tree / "kernel" / "link.ko").symlink_to(elsewhere)
    (tree / "build").mkdir()
    (tree / "build" / "b.ko").write_bytes(elf_module())
    (tree / "source").symlink_to(tmp_path)
    assert depmod.generate(tree)["modules.dep"] == b"kernel/a.ko:\n"


# -- refusals -------------------------------------------------------------------------


def refusal(tree: Path) -> str:
    with pytest.raises(InputError) as info:
        depmod.generate(tree, "TREE")
    assert info.value.reason == "invalid-modules"
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_dependency_cycle_is_refused(tmp_path: Path) -> None:
    tree = module_tree(
        tmp_path / "t",
        [
            Mod("kernel/a.ko", exports=["a_fn"], needs=["b_fn"]),
            Mod("kernel/b.ko", exports=["b_fn"], needs=["a_fn"]),
            Mod("kernel/c.ko", needs=["a_fn"]),
        ],
    )
    assert refusal(tree) == "modules need each other in a cycle: a, b"


def test_two_modules_of_one_name_outside_updates_are_refused(tmp_path: Path) -> None:
    tree = module_tree(tmp_path / "t", [Mod("kernel/a/x-y.ko"), Mod("extra/x_y.ko.xz")])
    assert refusal(tree).startswith("TREE: two modules named x_y: ")


def test_a_file_named_like_a_module_that_is_not_one_is_refused(tmp_path: Path) -> None:
    tree = module_tree(tmp_path / "t", [Mod("kernel/a.ko")])
    (tree / "kernel" / "b.ko").write_bytes(b"\x7fELF but no more")
    assert refusal(tree) == "TREE/kernel/b.ko: not an ELF kernel module"
    (tree / "kernel" / "b.ko").unlink()
    (tree / "kernel" / "c.ko.xz").write_bytes((tree / "kernel" / "a.ko").read_bytes()[:100])
    assert refusal(tree).startswith("TREE/kernel/c.ko.xz: cannot decompress it")
    import lzma

    (tree / "kernel" / "c.ko.xz").write_bytes(lzma.compress(elf_module())[:-30])
    assert refusal(tree).startswith("TREE/kernel/c.ko.xz: ")


def test_a_decompression_bomb_stops_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lzma

    monkeypatch.setattr(depmod, "MAX_MODULE_SIZE", 1 << 20)
    tree = module_tree(tmp_path / "t", [])
    (tree / "kernel" / "bomb.ko.xz").write_bytes(lzma.compress(bytes(64 << 20)))
    assert (
        refusal(tree)
        == "TREE/kernel/bomb.ko.xz: more than 1 MiB decompressed (not a kernel module)"
    )


def test_a_module_path_modules_dep_cannot_carry_is_refused(tmp_path: Path) -> None:
    tree = module_tree(tmp_path / "t", [Mod("kernel/a b.ko")])
    assert "a module path modules.dep cannot carry" in refusal(tree)


# -- the index format -----------------------------------------------------------------


def test_the_index_holds_every_key_and_its_values_in_priority_order() -> None:
    rng = random.Random(7)
    model: dict[bytes, list[tuple[int, int, bytes]]] = {}
    index = Index()
    alphabet = b"ab-_:*[]0"
    for n in range(3000):
        key = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        value = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        priority = rng.randrange(4)
        index.insert(key, value, priority)
        model.setdefault(key, []).append((priority, -n, value))
    got = read_index(index.to_bytes())
    assert got == {k: [(p, v) for p, _, v in sorted(vs)] for k, vs in model.items()}


def test_gzip_modules_are_read_as_the_others(tmp_path: Path) -> None:
    """Debian's kmod 30 is built without zlib (its depmod skips .ko.gz): the oracle
    here is the same tree with the modules uncompressed."""
    mods = [
        Mod("kernel/a.ko", ["alias=fs-a"], exports=["a_fn"]),
        Mod("kernel/b.ko", ["alias=char-major-10-1", "alias=devname:b"], needs=["a_fn"]),
    ]
    plain = depmod.generate(module_tree(tmp_path / "plain", mods))
    gz = [Mod(m.path + ".gz", m.modinfo, m.exports, m.needs) for m in mods]
    zipped = depmod.generate(module_tree(tmp_path / "gz", gz))
    assert zipped["modules.dep"] == b"kernel/a.ko.gz:\nkernel/b.ko.gz: kernel/a.ko.gz\n"
    for name in depmod.GENERATED:
        if not name.startswith("modules.dep"):
            assert zipped[name] == plain[name], name
