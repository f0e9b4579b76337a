"""Flatten rules and hostile layers, checked on real tar layers and a real ext4."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from banger_build.errors import LayerError
from banger_build.flatten import LayerInput
from banger_build.spool import Spool
from banger_build.tree import Tree
from tests.support import image as support_image
from tests.support.ext4read import Seen, read_image
from tests.support.image import flatten_layers
from tests.support.tarlayer import MTIME, member, write_layer

EPOCH = 1_600_000_000
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12  # cap_net_raw+ep


def flatten(tmp: Path, layers: list[LayerInput]) -> tuple[Tree, Spool]:
    return flatten_layers(tmp, layers, epoch=EPOCH)


def build_image(tmp: Path, layers: list[LayerInput], *, key: str = "k" * 32) -> dict[str, Seen]:
    return read_image(support_image.build_image(tmp, layers, key=key, epoch=EPOCH))


# -- the rules, on a real image ------------------------------------------------


def test_every_entry_type_and_its_metadata_reach_the_image(tmp_path: Path) -> None:
    layer = write_layer(
        tmp_path,
        [
            member("etc", "dir", mode=0o755),
            member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
            member("usr/bin/su", data=b"\x7fELF su", mode=0o4755),
            member("usr/bin/wall", data=b"wall", mode=0o2755, gid=5),
            member("tmp", "dir", mode=0o1777),
            member("bin/ping", data=b"ping", mode=0o755, xattrs={"security.capability": CAP}),
            member("home/user", "dir", mode=0o700, uid=1000, gid=1000),
            member(
                "home/user/.profile", data=b"x", mode=0o600, uid=1000, gid=1000, mtime=1234567890
            ),
            member("lib", "symlink", linkname="usr/lib"),
            member("usr/lib", "dir"),
            member("usr/bin/link", "hardlink", linkname="usr/bin/su"),
            member("dev", "dir"),
            member("dev/null", "chr", mode=0o666, dev=(1, 3)),
            member("dev/sda", "blk", mode=0o660, gid=6, dev=(8, 0)),
            member("run/initctl", "fifo", mode=0o600),
            member("etc/long-symlink", "symlink", linkname="/usr/share/" + "x" * 100),
        ],
    )
    img = build_image(tmp_path, [layer])

    def check(path: str, kind: str, mode: int, uid: int = 0, gid: int = 0) -> Seen:
        seen = img[path]
        assert (seen.type, seen.mode & 0o7777, seen.uid, seen.gid) == (kind, mode, uid, gid), path
        return seen

    check("etc/shadow", "reg", 0o640, 0, 42)
    su = check("usr/bin/su", "reg", 0o4755)
    check("usr/bin/wall", "reg", 0o2755, 0, 5)
    check("tmp", "dir", 0o1777)
    assert check("bin/ping", "reg", 0o755).xattrs == {"security.capability": CAP}
    check("home/user", "dir", 0o700, 1000, 1000)
    assert check("home/user/.profile", "reg", 0o600, 1000, 1000).mtime == 1234567890
    assert img["lib"].type == "symlink" and img["lib"].target == "usr/lib"
    assert img["etc/long-symlink"].target == "/usr/share/" + "x" * 100
    link = img["usr/bin/link"]
    assert link.ino == su.ino and su.links == 2
    assert check("dev/null", "chr", 0o666).rdev == (1, 3)
    assert check("dev/sda", "blk", 0o660, 0, 6).rdev == (8, 0)
    check("run/initctl", "fifo", 0o600)
    # every inode's times come from the headers (or the epoch for implicit dirs)
    assert img["etc/shadow"].mtime == img["etc/shadow"].atime == img["etc/shadow"].ctime == MTIME
    assert img["run"].mtime == EPOCH  # implicit parent


def test_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower = write_layer(
        tmp_path,
        [
            member("etc", "dir"),
            member("etc/motd", data=b"lower"),
            member("etc/keep", data=b"keep"),
            member("var/cache/apt", "dir"),
            member("var/cache/apt/pkgcache.bin", data=b"cache"),
            member("opq", "dir"),
            member("opq/old", data=b"old"),
            member("opq/sub", "dir"),
            member("opq/sub/deep", data=b"deep"),
        ],
    )
    upper = write_layer(
        tmp_path,
        [
            member("etc/.wh.motd"),
            member("var/.wh.cache"),
            member("opq/new-before", data=b"before"),
            member("opq/.wh..wh..opq"),
            member("opq/sub/new", data=b"new"),
            member("etc/.wh.absent"),  # whiteout of something that never existed: fine
        ],
    )
    img = build_image(tmp_path, [lower, upper])
    assert "etc/motd" not in img and "etc/keep" in img
    assert "var/cache" not in img and "var" in img
    assert "opq/old" not in img and "opq/sub/deep" not in img
    assert {"opq/new-before", "opq/sub", "opq/sub/new"} <= set(img)
    assert not any(".wh." in p for p in img)


def test_whiteout_does_not_remove_what_its_own_layer_adds(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, [member("a", data=b"lower")])
    upper = write_layer(tmp_path, [member("a", data=b"upper"), member(".wh.a")])
    img = build_image(tmp_path, [lower, upper])
    assert img["a"].sha256 == hashlib.sha256(b"upper").hexdigest()


def test_replacements_between_types(tmp_path: Path) -> None:
    lower = write_layer(
        tmp_path,
        [
            member("was-file", data=b"f"),
            member("was-dir/child", data=b"c"),
            member("was-link", "symlink", linkname="target"),
            member("dir-stays", "dir", mode=0o755),
            member("dir-stays/child", data=b"kept"),
            member("shared", data=b"original"),
            member("hard", "hardlink", linkname="shared"),
        ],
    )
    upper = write_layer(
        tmp_path,
        [
            member("was-file", "dir", mode=0o700),
            member("was-dir", data=b"now a file"),
            member("was-link", data=b"now a file"),
            member("dir-stays", "dir", mode=0o750, uid=7),
            member("shared", data=b"replaced"),
        ],
    )
    img = build_image(tmp_path, [lower, upper])
    assert img["was-file"].type == "dir" and img["was-file"].mode & 0o777 == 0o700
    assert img["was-dir"].type == "reg" and "was-dir/child" not in img
    assert img["was-link"].type == "reg"
    assert img["dir-stays"].mode & 0o777 == 0o750 and img["dir-stays"].uid == 7
    assert "dir-stays/child" in img  # directories merge
    # the hard link keeps the old inode's content when its sibling is replaced
    assert img["hard"].ino != img["shared"].ino
    assert img["hard"].links == 1 and img["shared"].links == 1


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_give_the_same_tree(tmp_path: Path, compression: str) -> None:
    layer = write_layer(tmp_path, [member("a/b", data=b"x" * 100_000)], compression)
    img = build_image(tmp_path, [layer])
    assert img["a/b"].sha256 == hashlib.sha256(b"x" * 100_000).hexdigest()


def test_awkward_but_safe_names_are_carried(tmp_path: Path) -> None:
    names = [
        "with space",
        'quo"te',
        "it's",
        "-rf",
        "!bang",
        "#hash",
        "üñí",
        "back\\slash",
        "semi;colon",
        "$(touch pwned)",
    ]
    layer = write_layer(
        tmp_path,
        [
            *(member(f"d/{n}", data=n.encode()) for n in names),
            *(member(f"f/{n}", "fifo") for n in names),
        ],
    )
    img = build_image(tmp_path, [layer])
    for n in names:
        assert img[f"d/{n}"].type == "reg"
        assert img[f"f/{n}"].type == "fifo"
    assert not Path("pwned").exists()


def test_unreadable_modes_are_staged_readable_and_restored(tmp_path: Path) -> None:
    layer = write_layer(
        tmp_path,
        [
            member("locked", "dir", mode=0o000),
            member("locked/secret", data=b"s", mode=0o000),
        ],
    )
    img = build_image(tmp_path, [layer])
    assert img["locked"].mode & 0o7777 == 0 and img["locked/secret"].mode & 0o7777 == 0


# -- hostile layers --------------------------------------------------------------


HOSTILE = [
    ("dotdot", [member("../escape", data=b"x")], "path-escape"),
    ("dotdot-inner", [member("a/../../escape", data=b"x")], "path-escape"),
    ("newline", [member("etc/evil\nname", data=b"x")], "unsafe-name"),
    ("carriage-return", [member("evil\rname", data=b"x")], "unsafe-name"),
    ("long-name", [member("a" * 256, data=b"x")], "name-too-long"),
    ("empty-symlink", [member("link", "symlink", linkname="")], "corrupt"),
    ("whiteout-of-dot", [member("d", "dir"), member("d/.wh..")], "bad-whiteout"),
    ("whiteout-of-dotdot", [member("d", "dir"), member("d/.wh...")], "bad-whiteout"),
    ("whiteout-of-nothing", [member("d", "dir"), member("d/.wh.")], "bad-whiteout"),
    (
        "through-escaping-symlink",
        [member("up", "symlink", linkname="../../../.."), member("up/tmp/x", data=b"x")],
        "through-symlink",
    ),
    ("symlink-newline", [member("link", "symlink", linkname="x\n!id")], "unsafe-name"),
    (
        "through-symlink",
        [
            member("evil", "symlink", linkname="/tmp"),
            member("evil/planted", data=b"x"),
        ],
        "through-symlink",
    ),
    ("hardlink-escape", [member("h", "hardlink", linkname="../../etc/passwd")], "path-escape"),
    ("hardlink-missing", [member("h", "hardlink", linkname="nope")], "hardlink-target"),
    (
        "hardlink-dir",
        [member("d", "dir"), member("h", "hardlink", linkname="d")],
        "hardlink-target",
    ),
    ("through-file", [member("f", data=b"x"), member("f/child", data=b"y")], "not-a-directory"),
    (
        "whiteout-through-symlink",
        [
            member("evil", "symlink", linkname="/etc"),
            member("evil/.wh.passwd"),
        ],
        "through-symlink",
    ),
    ("uid-out-of-range", [member("f", data=b"x", uid=2**32 - 1)], "bad-owner"),
    ("long-symlink-target", [member("l", "symlink", linkname="a/" * 2048)], "link-too-long"),
    ("bad-xattr-name", [member("f", data=b"x", xattrs={"evil name": b"v"})], "unsafe-xattr"),
]


@pytest.mark.parametrize("members,reason", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_layer_is_refused(tmp_path: Path, members: list, reason: str) -> None:  # type: ignore[type-arg]
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    layer = write_layer(tmp_path, members)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(LayerError) as info:
        flatten(work, [layer])
    err = info.value
    assert err.reason == reason
    assert err.layer == str(layer.digest) and str(layer.digest) in str(err)
    assert err.path is not None and repr(err.path) in str(err)
    assert os.listdir(outside) == [] and sorted(os.listdir(tmp_path)) == before


def test_symlink_targets_are_data_stored_as_written(tmp_path: Path) -> None:
    """Escaping, absolute, dangling and looping targets are legal (the kernel resolves
    '..' at / to /; docker and umoci take them): stored byte for byte."""
    targets = {
        "up": "../../../..",
        "lib/x": "../../../../etc/shadow",
        "abs": "/../../outside",
        "dangling": "no/such/file",
        "loop": "loop",
        "dot": ".",
    }
    layer = write_layer(tmp_path, [member(p, "symlink", linkname=t) for p, t in targets.items()])
    img = build_image(tmp_path, [layer])
    for path, target in targets.items():
        assert img[path].type == "symlink" and img[path].target == target, path


def test_a_write_through_a_symlink_names_the_path_reached_through_it(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, [member("up", "symlink", linkname="../../../..")])
    upper = write_layer(tmp_path, [member("up/tmp/x", data=b"x")])
    with pytest.raises(LayerError) as info:
        flatten(tmp_path / "w", [lower, upper])
    err = info.value
    assert err.reason == "through-symlink" and err.path == "up/tmp/x"
    assert "'up/tmp' would be reached through it" in str(err) and "'up'" in str(err)


def test_symlink_from_an_earlier_layer_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    lower = write_layer(tmp_path, [member("evil", "symlink", linkname=str(outside))])
    upper = write_layer(tmp_path, [member("evil/planted", data=b"x")])
    with pytest.raises(LayerError) as info:
        flatten(tmp_path / "w", [lower, upper])
    assert info.value.reason == "through-symlink" and info.value.layer == str(upper.digest)
    assert list(outside.iterdir()) == []


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member("a", data=b"x")])
    wrong = LayerInput(layer.digest, layer.path, type(layer.digest)("0" * 64))
    with pytest.raises(LayerError) as info:
        flatten(tmp_path / "w", [wrong])
    assert info.value.reason == "diff-id-mismatch"


@pytest.mark.parametrize("cut", [10, 600, -30])
def test_corrupt_or_truncated_layer(tmp_path: Path, cut: int) -> None:
    layer = write_layer(tmp_path, [member("a", data=os.urandom(4096)), member("b", data=b"y")])
    blob = layer.path.read_bytes()
    layer.path.write_bytes(blob[:cut])
    with pytest.raises(LayerError) as info:
        flatten(tmp_path / "w", [layer])
    assert info.value.reason in ("corrupt", "diff-id-mismatch")


def test_times_are_kept_in_ext4s_range_and_clamped_outside(tmp_path: Path) -> None:
    layer = write_layer(
        tmp_path,
        [
            member("y2106", data=b"x", mtime=2**32 + 5),
            member("future", data=b"x", mtime=2**33),
            member("past", mtime=-5),
            member("beyond", mtime=2**35),
            member("before", mtime=-(2**32)),
            member("frac", pax={"mtime": "1700000000.123456789"}),
            member("negfrac", pax={"mtime": "-1.25"}),
        ],
    )
    img = build_image(tmp_path, [layer])
    assert (img["y2106"].mtime, img["y2106"].mtime_ns) == (2**32 + 5, 0)
    assert img["future"].mtime == 2**33 and img["past"].mtime == -5
    assert (img["beyond"].mtime, img["beyond"].mtime_ns) == (2**34 - 2**31 - 1, 999_999_999)
    assert (img["before"].mtime, img["before"].mtime_ns) == (-(2**31), 0)
    assert (img["frac"].mtime, img["frac"].mtime_ns) == (1_700_000_000, 123_456_789)
    assert (img["negfrac"].mtime, img["negfrac"].mtime_ns) == (-2, 750_000_000)
    assert img["frac"].atime == img["frac"].ctime == img["frac"].mtime  # as before: all three
