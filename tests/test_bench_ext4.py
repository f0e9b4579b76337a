"""bench/bench_ext4.py's own pieces, on tiny inputs, so the bench does not rot.

The bench itself (minutes, the Debian image) is not run here: its options, the
floor's reader, the unprivileged peer's ownership pass (real mkfs.ext4 and
debugfs, read back with tests/support/ext4read), the generated 2 GiB layer's
writer at a few MiB, and the peak-RSS measurement are.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.ext4read import read_image
from tests.support.oci import Entry, make_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_ext4
from _common import measure


def test_options() -> None:
    quick = bench_ext4.parse_args(["--quick", "--json"])
    assert (quick.runs, quick.json, quick.cases) == (1, True, {"debian", "dirs"})
    full = bench_ext4.parse_args([])
    assert (full.runs, full.cases) == (3, {"debian", "dirs", "big"})
    assert bench_ext4.parse_args(["--cases", "big", "--quick"]).cases == set()
    with pytest.raises(SystemExit) as exc:
        bench_ext4.parse_args(["--cases", "debian,nope"])
    assert exc.value.code == 2


def test_rootless_owner_decodes_what_umoci_writes() -> None:
    # umoci 0.4.7 --rootless: a file of 1000:1001, and one of 0:42 (uid "no change")
    assert bench_ext4.rootless_owner(bytes.fromhex("08e80710e907")) == (1000, 1001)
    assert bench_ext4.rootless_owner(bytes.fromhex("08ffffffff0f102a")) == (0, 42)
    assert bench_ext4.rootless_owner(b"") == (0, 0)


@pytest.mark.parametrize("stdlib", [False, True], ids=["as-ours", "stdlib"])
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_floor_reads_every_file(tmp_path: Path, compression: str, stdlib: bool) -> None:
    entries = [
        Entry.dir("etc"),
        Entry.file("etc/a", b"x" * 100_000),
        Entry.file("etc/b", b"yz"),
        Entry.symlink("etc/c", "a"),
    ]
    layer = tmp_path / "layer"
    layer.write_bytes(make_layer(entries, compression))
    got = bench_ext4.read_layers([layer, layer], stdlib)
    assert got == {"members": 8, "files": 4, "bytes": 2 * 100_002}


def test_big_layer_is_what_its_digests_say(tmp_path: Path) -> None:
    size = 4 * bench_ext4.CHUNK + 12_345
    layer = bench_ext4.write_big_layer(tmp_path, size)
    blob = layer["path"].read_bytes()
    assert (
        layer["digest"]
        == f"sha256:{hashlib.sha256(blob).hexdigest()}"
        == (f"sha256:{layer['path'].name}")
    )
    raw = gzip.decompress(blob)
    assert layer["diff_id"] == f"sha256:{hashlib.sha256(raw).hexdigest()}"
    assert len(blob) > len(raw)  # stored blocks: nothing compressed
    assert bench_ext4.read_layers([layer["path"]])["bytes"] == size
    chunks = set()
    with tarfile.open(layer["path"]) as tar:
        for member in tar.getmembers()[1:]:
            f = tar.extractfile(member)
            assert f is not None
            while chunk := f.read(bench_ext4.CHUNK):
                chunks.add(chunk[:4096])
    assert len(chunks) >= 4 and bytes(4096) not in chunks  # no repeats, no holes


def test_ownership_pass_sets_every_owner(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "local" / "deep").mkdir(parents=True)
    (root / "usr" / "local" / "deep" / "owned").write_bytes(b"o")
    (root / "usr" / "root-file").write_bytes(b"r")
    os.link(root / "usr" / "local" / "deep" / "owned", root / "usr" / "link")
    os.symlink("root-file", root / "usr" / "sym")
    xattr = bench_ext4.ROOTLESS_XATTR
    os.setxattr(root / "usr" / "local" / "deep" / "owned", xattr, bytes.fromhex("08922110f721"))
    os.setxattr(root / "usr" / "local", xattr, bytes.fromhex("08ffffffff0f102a"))
    image = bench_ext4.image_file(tmp_path / "image.ext4", 16 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-d", str(root), str(image)], check=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    assert bench_ext4.ownership_pass(root, image) == 8  # /, lost+found; one for the link
    seen = read_image(image, contents=False)
    owners = {path: (s.uid, s.gid) for path, s in seen.items()}
    assert owners["usr/local/deep/owned"] == owners["usr/link"] == (4242, 4343)
    assert owners["usr/local"] == (0, 42)
    assert owners["usr/root-file"] == owners["usr/sym"] == owners["usr"] == (0, 0)
    assert owners["usr/local/deep"] == owners["lost+found"] == (0, 0)


def test_measure_reports_the_command_not_the_caller(tmp_path: Path) -> None:
    m = measure([sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * (16 << 10)"])
    assert 64 << 20 < m.peak < 96 << 20
    small = measure(["true"])
    assert small.peak < 8 << 20  # not this test process's RSS
