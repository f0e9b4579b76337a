"""The named limits and hostile layers past them, on real tar layers.

Each refusal names its reason, the layer digest and the path; where a bound
sits at what ext4 or mke2fs can carry, the largest accepted case is built
into a real image and checked with e2fsck.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from banger_build.errors import BangerError, LayerError
from banger_build.flatten import LayerInput
from banger_build.limits import Limits
from banger_build.tarstream import MAX_FILE_SIZE, MAX_HEADER, MAX_HEADER_CHAIN
from banger_build.tree import Tree
from tests.support.ext4read import Seen, read_at, read_image
from tests.support.image import build_image, flatten_layers
from tests.support.oci import tar_bytes
from tests.support.tarlayer import (
    MTIME,
    gnu_tar_layer,
    gzip_bomb,
    layer_from_tar,
    member,
    sparse_member,
    write_layer,
)

EPOCH = 1_600_000_000
MiB = 1 << 20


def flatten(tmp: Path, layers: list[LayerInput], limits: Limits | None = None) -> Tree:
    tree, spool = flatten_layers(tmp, layers, limits, EPOCH)
    spool.close()
    return tree


def build(tmp: Path, layers: list[LayerInput], *, contents: bool = True) -> dict[str, Seen]:
    return read_image(build_image(tmp, layers, epoch=EPOCH), contents=contents)


def refused(
    tmp: Path, layers: list[LayerInput], reason: str, path: str | None, limits: Limits | None = None
) -> LayerError:
    """Flatten must refuse the last layer for ``reason``, naming it and ``path``."""
    with pytest.raises(LayerError) as info:
        flatten(tmp, layers, limits)
    err = info.value
    assert err.reason == reason, str(err)
    assert err.layer == str(layers[-1].digest) and str(layers[-1].digest) in str(err)
    assert err.path == path
    if path is not None:
        assert repr(path) in str(err)
    return err


def nested(depth: int, name: str = "d") -> str:
    return "/".join([name] * depth)


# -- the uncompressed size of the image, while streaming --------------------------


def test_a_gzip_bomb_stops_at_the_image_size_bound(tmp_path: Path) -> None:
    """4 GiB of content in a 4 MiB layer: reading stops at the bound, not at the end."""
    bomb = gzip_bomb(tmp_path, "bomb", 4 << 30)
    assert bomb.path.stat().st_size < 8 * MiB
    limit = 64 * MiB
    err = refused(tmp_path, [bomb], "image-too-large", "bomb", Limits(max_image_size=limit))
    assert "64MiB" in str(err) and "--max-image-size" in str(err)
    (spool,) = tmp_path.glob("spool-*")
    assert spool.stat().st_size <= limit  # what was written stopped at the bound


def test_the_bound_counts_all_layers_of_the_image(tmp_path: Path) -> None:
    first = write_layer(tmp_path, [member("a", data=os.urandom(600_000))], "none")
    second = write_layer(tmp_path, [member("b", data=os.urandom(600_000))], "none")
    limits = Limits(max_image_size=1_000_000)
    flatten(tmp_path / "one", [first], limits)  # each alone fits
    refused(tmp_path / "both", [first, second], "image-too-large", "b", limits)


def test_zeros_are_not_written_and_the_image_is_the_same(tmp_path: Path) -> None:
    """A GiB of zeros (a 1 MiB layer) costs no disk in the spool and no blocks in the
    image: the file is a hole of its full size."""
    layer = gzip_bomb(tmp_path, "zeros", 1 << 30, fill=0)
    img = build(tmp_path, [layer], contents=False)
    (spool,) = tmp_path.glob("spool-*")
    assert spool.stat().st_size == 0
    assert img["zeros"].size == 1 << 30
    assert read_at(tmp_path / "rootfs.ext4", "zeros", (1 << 30) - 5, 5) == bytes(5)
    assert (tmp_path / "rootfs.ext4").stat().st_blocks * 512 < 64 * MiB


# -- sparse members ----------------------------------------------------------------


def _sparse_source(root: Path, size: int) -> dict[int, bytes]:
    root.mkdir()
    pieces = {0: b"head", 5 * MiB + 3: b"middle" * 1000, size - 4: b"tail"}
    with open(root / "sparse", "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return pieces


@pytest.mark.parametrize(
    "options",
    [
        ("--format=gnu", "-S"),
        ("--format=pax", "-S"),  # PAX sparse 1.0
        ("--format=pax", "-S", "--sparse-version=0.1"),
        ("--format=pax", "-S", "--sparse-version=0.0"),
    ],
    ids=["gnu", "pax-1.0", "pax-0.1", "pax-0.0"],
)
def test_sparse_members_stay_sparse(tmp_path: Path, options: tuple[str, ...]) -> None:
    size = 8 << 30  # 8 GiB apparent, 6 KiB of data
    pieces = _sparse_source(tmp_path / "src", size)
    layer = gnu_tar_layer(tmp_path, tmp_path / "src", *options)
    assert layer.path.stat().st_size < 64 * 1024
    img = build(tmp_path, [layer], contents=False)
    (spool,) = tmp_path.glob("spool-*")
    assert spool.stat().st_size < MiB  # only the data was kept
    image = tmp_path / "rootfs.ext4"
    for offset, data in pieces.items():
        assert read_at(image, "sparse", offset, len(data)) == data
    assert read_at(image, "sparse", 4096 * 3, 8) == bytes(8)  # a hole reads as zeros
    assert img["sparse"].size == size
    assert image.stat().st_size < 256 * MiB  # sized by the data, not the apparent size


def test_distinct_xattr_sets_are_bounded_and_shared_ones_kept_once(tmp_path: Path) -> None:
    same = [member(f"s{i}", "fifo", xattrs={"user.v": b"v" * 1000}) for i in range(50)]
    tree = flatten(tmp_path / "same", [write_layer(tmp_path, same)], Limits(max_xattr_total=2000))
    assert len({id(n.inode.xattrs) for _, n in tree.walk() if n.inode.xattrs}) == 1
    distinct = [member(f"d{i}", "fifo", xattrs={"user.v": b"%04d" % i * 250}) for i in range(3)]
    layer = write_layer(tmp_path, distinct)
    err = refused(tmp_path / "no", [layer], "xattr-too-large", "d2", Limits(max_xattr_total=2100))
    assert "distinct xattr sets" in str(err)


def test_data_ranges_of_all_files_are_bounded(tmp_path: Path) -> None:
    """16 bytes of memory each: a layer of sparse files cannot make it grow unbounded."""
    pieces = [(i * 8192, b"x") for i in range(10)]
    layer = write_layer(
        tmp_path, [sparse_member(f"s{n}", pieces, 100_000) for n in range(3)], "none"
    )
    flatten(tmp_path / "ok", [layer], Limits(max_segments=30))
    err = refused(tmp_path / "no", [layer], "too-many-segments", "s2", Limits(max_segments=25))
    assert "25" in str(err)


@pytest.mark.parametrize(
    "segments,size,reason",
    [
        ([(100, b"x"), (50, b"y")], 1000, "corrupt"),  # out of order
        ([(990, b"0123456789abc")], 1000, "corrupt"),  # past the end
        ([(0, b"x")], MAX_FILE_SIZE + 1, "file-too-large"),
    ],
    ids=["out-of-order", "past-the-end", "beyond-ext4"],
)
def test_hostile_sparse_maps_are_refused(
    tmp_path: Path, segments: list[tuple[int, bytes]], size: int, reason: str
) -> None:
    layer = write_layer(tmp_path, [sparse_member("s", segments, size)])
    refused(tmp_path, [layer], reason, "s")


def test_a_sparse_map_too_long_is_refused(tmp_path: Path) -> None:
    """PAX sparse 1.0 keeps its map in the data; its length is read before the map."""
    raw = _pax10_sparse("s", count=10**9, lines=b"0\n1\n")
    refused(tmp_path, [layer_from_tar(tmp_path, raw)], "corrupt", None)


def _pax10_sparse(name: str, *, count: int, lines: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    data = f"{count}\n".encode() + lines
    info.size, info.mode, info.mtime = 512, 0o644, MTIME
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": "1",
    }
    return tar_bytes([(info, data.ljust(512, b"\0"))])


# -- depth, path length and the mke2fs path bug ------------------------------------


def test_depth_past_the_bound_is_refused_and_at_the_bound_builds(tmp_path: Path) -> None:
    limit = Limits().max_depth
    deep = write_layer(tmp_path, [member(nested(limit - 1) + "/f", data=b"deep")])
    img = build(tmp_path / "ok", [deep], contents=False)
    assert img[nested(limit - 1) + "/f"].type == "reg"
    too_deep = write_layer(tmp_path, [member(nested(limit) + "/f", data=b"x")])
    refused(tmp_path / "no", [too_deep], "too-deep", nested(limit) + "/f")


def test_depth_counts_implicit_directories_too(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member(nested(9) + "/f", "dir")])
    refused(tmp_path, [layer], "too-deep", nested(9) + "/f", Limits(max_depth=9))


def _long_path(length: int) -> str:
    """A relative path whose "/"-rooted form is ``length`` bytes (255-byte components)."""
    parts = []
    left = length
    while left > 256:
        parts.append("p" * 255)
        left -= 256
    parts.append("f" * (left - 1))
    return "/".join(parts)


def test_the_longest_path_builds_even_below_a_long_build_directory(tmp_path: Path) -> None:
    """4095 bytes (PATH_MAX less its NUL) in the image, below a staging directory whose
    own path is long: staging is written relative to its fd, never by full path."""
    path = _long_path(4095)
    assert len(path) + 1 == 4095
    deep_tmp = tmp_path / ("w" * 200) / ("w" * 200)
    deep_tmp.mkdir(parents=True)
    img = build(deep_tmp, [write_layer(tmp_path, [member(path, data=b"far")])])
    assert img[path].sha256 is not None and img[path].size == 3


def test_a_path_past_path_max_is_refused(tmp_path: Path) -> None:
    path = _long_path(4096)
    layer = write_layer(tmp_path, [member(path, data=b"x")])
    err = refused(tmp_path, [layer], "path-too-long", path)
    assert "4096 bytes" in str(err)


def test_a_path_of_2040_bytes_builds(tmp_path: Path) -> None:
    """mke2fs 1.47.0 -d aborted on exactly this path length (a heap overrun); the
    writer has no path buffer: it builds, as a file and as a directory above one."""
    path = _long_path(2040)
    below = path + "/child"
    img = build(tmp_path, [write_layer(tmp_path, [member(path, data=b"x")])])
    assert img[path].type == "reg"
    img = build(tmp_path / "2", [write_layer(tmp_path, [member(below, data=b"y")])])
    assert img[path].type == "dir" and img[below].type == "reg"


# -- links, entries, layers ----------------------------------------------------------


def test_the_65001st_name_of_an_inode_is_refused(tmp_path: Path) -> None:
    """ext4's EXT4_LINK_MAX, on a real layer: refused before the host says EMLINK."""
    links = Limits().max_links
    members = [member("f", data=b"x")]
    members += [member(f"l/{i}", "hardlink", linkname="f") for i in range(links)]
    layer = write_layer(tmp_path, members)
    err = refused(tmp_path, [layer], "too-many-links", f"l/{links - 1}")
    assert "65000" in str(err)


def test_links_at_a_lower_bound_build(tmp_path: Path) -> None:
    members = [member("f", data=b"x")]
    members += [member(f"l{i}", "hardlink", linkname="f") for i in range(9)]
    layer = write_layer(tmp_path, members)
    flatten(tmp_path / "ok", [layer], Limits(max_links=10))
    refused(tmp_path / "no", [layer], "too-many-links", "l8", Limits(max_links=9))


def test_entries_per_directory_are_bounded(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member(f"d/{i}", data=b"") for i in range(11)])
    flatten(tmp_path / "ok", [layer], Limits(max_dir_entries=11))
    refused(tmp_path / "no", [layer], "dir-too-large", "d/10", Limits(max_dir_entries=10))


def test_a_hundred_thousand_entries_in_one_directory_build(tmp_path: Path) -> None:
    """Once quadratic in mke2fs -d (9.6 min); the writer is linear. e2fsck -fn passes
    (build asserts it) and every name is listed by debugfs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(100_000):
            info = tarfile.TarInfo(f"big/entry-{i:06d}")
            info.mtime = MTIME
            tar.addfile(info, io.BytesIO(b""))
    layer = layer_from_tar(tmp_path, raw.getvalue(), "none")
    seen = build(tmp_path, [layer], contents=False)
    assert sum(1 for p in seen if p.startswith("big/")) == 100_000


def test_entries_of_the_image_are_bounded_implicit_directories_included(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member("a/b/c/d/e/f", data=b"")])
    flatten(tmp_path / "ok", [layer], Limits(max_entries=7))  # the root and six
    refused(tmp_path / "no", [layer], "too-many-entries", "a/b/c/d/e/f", Limits(max_entries=6))


def test_removed_entries_free_their_place(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, [member(f"d/{i}", data=b"") for i in range(5)])
    upper = write_layer(tmp_path, [member(".wh.d"), member("e/0", data=b""), member("e/1")])
    flatten(tmp_path, [lower, upper], Limits(max_entries=7))


def test_layers_of_an_image_are_bounded(tmp_path: Path) -> None:
    layers = [write_layer(tmp_path, [member(f"f{i}", data=b"")]) for i in range(3)]
    flatten(tmp_path / "ok", layers, Limits(max_layers=3))
    refused(tmp_path / "no", layers, "too-many-layers", None, Limits(max_layers=2))


# -- xattrs ----------------------------------------------------------------------------


def test_a_5000_byte_xattr_name_is_refused_up_front(tmp_path: Path) -> None:
    name = "user." + "n" * 4995
    layer = write_layer(tmp_path, [member("f", data=b"x", xattrs={name: b"v"})])
    err = refused(tmp_path, [layer], "xattr-too-large", "f")
    assert "5000 bytes" in str(err)


def test_the_largest_xattr_value_builds_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    """One 4 KiB xattr block holds a 4040-byte value for ``user.x`` (32-byte header,
    16-byte entry, the name "x" padded to 4, a 4-byte end marker)."""
    value = bytes(range(256)) * 15 + bytes(200)  # 4040 bytes
    ok = write_layer(tmp_path, [member("f", data=b"x", xattrs={"user.x": value})])
    assert build(tmp_path / "ok", [ok])["f"].xattrs == {"user.x": value}
    big = write_layer(tmp_path, [member("f", data=b"x", xattrs={"user.x": value + b"!"})])
    refused(tmp_path / "no", [big], "xattr-too-large", "f")


def test_xattrs_of_one_inode_are_bounded_together(tmp_path: Path) -> None:
    xattrs = {f"user.{i}": bytes(1000) for i in range(4)}  # 4 x 1020 + 4 > 4064
    layer = write_layer(tmp_path, [member("f", data=b"x", xattrs=xattrs)])
    refused(tmp_path, [layer], "xattr-too-large", "f")


def test_posix_acls_are_carried_and_garbage_acls_refused(tmp_path: Path) -> None:
    acl = (
        b"\x02\x00\x00\x00"  # version 2
        + b"\x01\x00\x06\x00\xff\xff\xff\xff"  # user::rw-
        + b"\x02\x00\x06\x00\xe8\x03\x00\x00"  # user:1000:rw-
        + b"\x04\x00\x04\x00\xff\xff\xff\xff"  # group::r--
        + b"\x10\x00\x06\x00\xff\xff\xff\xff"  # mask::rw-
        + b"\x20\x00\x04\x00\xff\xff\xff\xff"  # other::r--
    )
    name = "system.posix_acl_access"
    ok = write_layer(tmp_path, [member("f", data=b"x", xattrs={name: acl})])
    assert name in build(tmp_path / "ok", [ok])["f"].xattrs
    bad = write_layer(tmp_path, [member("f", data=b"x", xattrs={name: b"garbage!"})])
    refused(tmp_path / "no", [bad], "unsafe-xattr", "f")


@pytest.mark.parametrize("name", ["user.ü", "system.evil", "user.a b"])
def test_xattr_names_debugfs_cannot_carry_are_refused(tmp_path: Path, name: str) -> None:
    layer = write_layer(tmp_path, [member("f", data=b"x", xattrs={name: b"v"})])
    refused(tmp_path, [layer], "unsafe-xattr", "f")


# -- headers and numbers tarfile would choke on -------------------------------------------


def test_device_numbers_ext4_cannot_store_are_refused(tmp_path: Path) -> None:
    ok = write_layer(tmp_path, [member("dev/x", "chr", dev=(4095, 0xFFFFF))])
    assert build(tmp_path / "ok", [ok])["dev/x"].rdev == (4095, 0xFFFFF)
    for dev in ((4096, 0), (1, 0x100000)):
        bad = write_layer(tmp_path, [member("dev/x", "chr", dev=dev)])
        refused(tmp_path / f"no{dev[0]}", [bad], "bad-device", "dev/x")


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info, data = member("f", data=b"x")
    info.pax_headers = {"comment": "c" * MAX_HEADER}
    layer = write_layer(tmp_path, [(info, data)])
    err = refused(tmp_path, [layer], "header-too-large", None)
    assert "extended header" in str(err)


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    """GNU long-name headers in a row: tarfile follows them by recursion."""
    block = tarfile.TarInfo("././@LongLink")
    block.type = tarfile.GNUTYPE_LONGNAME
    block.size = 2
    one = block.tobuf(format=tarfile.GNU_FORMAT) + b"x\0".ljust(512, b"\0")
    raw = one * (MAX_HEADER_CHAIN + 5000) + tar_bytes([member("f", data=b"x")])
    refused(tmp_path, [layer_from_tar(tmp_path, raw)], "header-too-large", None)


def test_a_huge_size_at_the_end_of_the_layer_ends_in_an_error_not_a_spin(
    tmp_path: Path,
) -> None:
    """tarfile skips an unread member's content by reading, even past the end of the
    stream: 2^80 bytes declared (base-256) and none there must not loop for ever."""
    info = tarfile.TarInfo(".wh.x")
    info.size, info.mtime = 1 << 80, MTIME
    raw = info.tobuf(format=tarfile.GNU_FORMAT)  # no content, no end-of-archive blocks
    refused(tmp_path, [layer_from_tar(tmp_path, raw)], "corrupt", None)


def test_a_non_finite_mtime_is_refused(tmp_path: Path) -> None:
    info, data = member("f", data=b"x")
    info.pax_headers = {"mtime": "nan"}
    layer = write_layer(tmp_path, [(info, data)])
    refused(tmp_path, [layer], "corrupt", "f")


def test_mutated_layers_never_escape_as_anything_but_layer_errors(tmp_path: Path) -> None:
    """Random byte flips in the blocks of a layer of every kind of entry, header
    checksums fixed up so tarfile parses what was flipped: each run flattens or
    refuses the layer with a LayerError, nothing else."""
    raw = tar_bytes(
        [
            member("etc", "dir"),
            member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", xattrs={"user.a": b"1"}),
            member("bin/sh", data=os.urandom(3000), mode=0o755),
            member("lib", "symlink", linkname="usr/lib"),
            member("bin/link", "hardlink", linkname="bin/sh"),
            member("dev/null", "chr", dev=(1, 3)),
            member("run/fifo", "fifo"),
            member("etc/.wh.gone"),
            sparse_member("var/sparse", [(10, b"a"), (5000, b"b")], 9000),
            member("long/" + "n" * 200 + "/" + "m" * 200, data=b"long"),
        ]
    )
    headers = [i for i in range(0, len(raw), 512) if raw[i : i + 512].strip(b"\0")]
    rng = random.Random(8)
    outcomes: dict[str, int] = {}
    for run in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            block = rng.choice(headers)
            data[block + rng.randrange(512)] = rng.choice((0, 0x30, 0x37, 0x80, 0xFF, 10, 47))
            if data[block + 257 : block + 262] == b"ustar":
                data[block + 148 : block + 156] = b" " * 8
                data[block + 148 : block + 156] = b"%06o\0 " % sum(data[block : block + 512])
        layer = layer_from_tar(tmp_path, bytes(data), "none")
        work = tmp_path / f"w{run}"
        try:
            flatten(work, [LayerInput(layer.digest, layer.path)])
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except LayerError as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        except BangerError as exc:  # pragma: no cover - the assertion says what escaped
            pytest.fail(f"run {run}: {type(exc).__name__} escaped: {exc}")
        layer.path.unlink()
    assert outcomes.get("ok", 0) > 0 and len(outcomes) > 2, outcomes


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["build", "check", "boot"])
def test_max_image_size_reaches_the_build_options(command: str, tmp_path: Path) -> None:
    from banger_build.cli import make_parser
    from banger_build.commands import common

    target = str(tmp_path / "r.toml")
    args = make_parser().parse_args([command, "--max-image-size", "3GiB", target])
    assert common.limits(args) == Limits(max_image_size=3 << 30)
    assert common.build_options(args).limits.max_image_size == 3 << 30
    default = make_parser().parse_args([command, target])
    assert common.build_options(default).limits == Limits()


def test_a_bad_max_image_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from banger_build.cli import make_parser

    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["build", "--max-image-size", "lots", "r.toml"])
    assert info.value.code == 2 and "invalid size 'lots'" in capsys.readouterr().err
