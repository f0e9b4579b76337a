"""Sanity tests of the test fixtures themselves: the Debian image and its oracle
(tests/support/debian.py), and the unprivileged runner (tests/support/unpriv.py).

The fast tests pack small trees made here and check the packer and the
oracle against them; the slow ones check the real debootstrapped image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest
import requests

from tests.support import debian
from tests.support.debian import SPECIAL, LayerEntry, expected_tree, layer_members

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)


# ------------------------------------------------------------------ fast: oracle


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    linkname: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, bytes] | None = None,
) -> LayerEntry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return LayerEntry(info, data if kind == tarfile.REGTYPE else None)


D = tarfile.DIRTYPE


def test_oracle_replays_whiteouts_opaque_dirs_links_and_types(tmp_path: Path) -> None:
    lower = [
        entry("a", D, mode=0o755),
        entry("a/x", data=b"x"),
        entry("a/sub", D, mode=0o700),
        entry("a/sub/y", data=b"y"),
        entry("b", data=b"gone"),
        entry("c", data=b"file that becomes a dir"),
        entry("d", D),
        entry("d/deep", D),
        entry("d/deep/z", data=b"z"),
        entry("e", data=b"shared"),
        entry("e2", tarfile.LNKTYPE, linkname="e"),
        entry("dev", D),
        entry("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        entry("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0)),
        entry("fifo", tarfile.FIFOTYPE, mode=0o600),
        entry("lnk", tarfile.SYMTYPE, mode=0o777, linkname="a/x"),
        entry("su", data=b"su", mode=0o4755),
        entry("sgid", D, mode=0o2775, gid=50),
    ]
    upper = [
        entry("a", D, mode=0o750, uid=7),  # metadata changes, content kept (until opaque)
        entry("a/.wh..wh..opq"),
        entry("a/new", data=b"new", uid=1000, gid=1000, mode=0o600),
        entry(".wh.b"),
        entry("c", D, mode=0o711),
        entry("c/inside", data=b"i"),
        entry(".wh.d"),
        entry("e3", tarfile.LNKTYPE, linkname="e"),  # link to a lower file
        entry("cap", data=b"c", mode=0o755, xattrs={"security.capability": debian.CAP_NET_RAW_EP}),
        entry("implicit/parent/file", data=b"p"),
    ]
    layout = tmp_path / "layout"
    debian.write_layout(layout, [lower, upper])
    tree = expected_tree(layout)

    assert "b" not in tree and "d" not in tree and "d/deep/z" not in tree
    assert sorted(p for p in tree if p.startswith("a/")) == ["a/new"]
    assert tree["a"].mode == stat.S_IFDIR | 0o750 and tree["a"].uid == 7
    assert tree["a/new"].mode == stat.S_IFREG | 0o600 and tree["a/new"].uid == 1000
    assert tree["c"].type == "dir" and tree["c/inside"].sha256 == hashlib.sha256(b"i").hexdigest()
    assert {tree[p].hardlink_group for p in ("e", "e2", "e3")} == {"e"}
    assert tree["e3"].nlink == 3 and tree["e"].sha256 == hashlib.sha256(b"shared").hexdigest()
    assert tree["dev/null"].type == "chr" and tree["dev/null"].rdev == (1, 3)
    assert tree["dev/null"].mode == stat.S_IFCHR | 0o666
    assert tree["dev/sda"].mode == stat.S_IFBLK | 0o660 and tree["dev/sda"].gid == 6
    assert tree["fifo"].mode == stat.S_IFIFO | 0o600
    assert tree["lnk"].linkname == "a/x" and tree["lnk"].size == 3
    assert tree["su"].mode == stat.S_IFREG | 0o4755
    assert tree["sgid"].mode == stat.S_IFDIR | 0o2775
    assert tree["cap"].xattrs == {"security.capability": debian.CAP_NET_RAW_EP}
    assert tree["implicit/parent"].type == "dir"
    assert tree["su"].mtime == 1_600_000_000
    assert debian.image_file(layout, "e2") == b"shared"


def test_oracle_rejects_tampered_layers(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    info = debian.write_layout(layout, [[entry("f", data=b"data")]])
    blob = layout / "blobs" / "sha256" / info["layers"][0].split(":")[1]
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="does not match"):
        expected_tree(layout)


def test_apt_mirror_comes_from_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANGER_DEBIAN_MIRROR", raising=False)
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert debian.apt_mirror(apt) == debian.DEFAULT_MIRROR
    (apt / "sources.list").write_text("deb [arch=amd64] http://list.example/debian bookworm main\n")
    assert debian.apt_mirror(apt) == "http://list.example/debian"
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debian.apt_mirror(apt) == "http://mirror.example/debian"
    monkeypatch.setenv("BANGER_DEBIAN_MIRROR", "http://override.example/debian")
    assert debian.apt_mirror(apt) == "http://override.example/debian"


def _fake_debootstrap_tree(root: Path) -> None:
    """The few paths the upper layer needs, plus every kind of entry."""
    for d in (
        "etc",
        "usr/share/doc/sed/examples",
        "usr/share/doc/adduser/examples/sub",
        "usr/local/bin",
        "usr/local/lib",
        "usr/local/share",
        "usr/bin",
        "dev",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("motd\n")
    (root / "etc/shadow").write_text("root:*:1::::::\n")
    os.chown(root / "etc/shadow", 0, 42)
    os.chmod(root / "etc/shadow", 0o640)
    (root / "usr/share/doc/sed/README").write_text("sed\n")
    (root / "usr/share/doc/adduser/examples/sub/f").write_text("f\n")
    (root / "usr/bin/su").write_bytes(b"\x7fELF su")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/perl").write_bytes(b"perl")
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36.0")
    os.symlink("usr/bin", root / "bin")
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo", 0o600)
    os.chmod(root / "dev/fifo", 0o600)
    (root / "usr/bin/ping").write_bytes(b"ping")
    # tmp on a filesystem without xattrs: the fixture still works
    with contextlib.suppress(OSError):
        os.setxattr(root / "usr/bin/ping", "security.capability", debian.CAP_NET_RAW_EP)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files + [""]:
            os.utime(
                os.path.join(dirpath, name), (1_650_000_000, 1_650_000_000), follow_symlinks=False
            )


def test_pack_is_deterministic_and_matches_the_tree(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (chown, mknod), like the real image build")
    root = tmp_path / "root"
    _fake_debootstrap_tree(root)
    first = debian.pack_layout(root, tmp_path / "one")
    second = debian.pack_layout(root, tmp_path / "two")
    assert first["manifest_digest"] == second["manifest_digest"]
    assert first["hardlinks"] == 1 and first["devices"] == 1
    for name in ("one", "two"):
        blobs = sorted(p.name for p in (tmp_path / name / "blobs/sha256").iterdir())
        assert all(not b.startswith(".") for b in blobs)
    tree = expected_tree(tmp_path / "one")
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            gone = rel in (SPECIAL.whiteout_victim, SPECIAL.whiteout_dir) or rel.startswith(
                (SPECIAL.whiteout_dir + "/", SPECIAL.opaque_dir + "/")
            )
            if gone:
                assert rel not in tree
                continue
            e = tree[rel]
            if rel == SPECIAL.opaque_dir:
                assert e.type == "dir"
                continue
            assert (e.mode, e.uid, e.gid, e.mtime) == (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                int(st.st_mtime),
            ), rel
            if stat.S_ISREG(st.st_mode):
                assert e.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert tree["usr/bin/perl5.36.0"].hardlink_group == "usr/bin/perl"
    assert tree["dev/null"].rdev == (1, 3)
    assert tree["bin"].linkname == "usr/bin"
    if os.listxattr(root / "usr/bin/ping"):
        assert tree["usr/bin/ping"].xattrs == {"security.capability": debian.CAP_NET_RAW_EP}
    _check_special(tree)


def _check_special(tree: dict[str, debian.Expected]) -> None:
    s = SPECIAL
    assert s.whiteout_victim not in tree
    assert not any(p == s.whiteout_dir or p.startswith(s.whiteout_dir + "/") for p in tree)
    assert [p for p in tree if p.startswith(s.opaque_dir + "/")] == [s.opaque_new]
    assert tree[s.setuid].mode == stat.S_IFREG | 0o4755 and tree[s.setuid].uid == 0
    assert tree[s.secret].mode == stat.S_IFREG | 0o600
    assert (tree[s.secret].uid, tree[s.secret].gid) == (0, 0)
    assert (tree[s.owned].uid, tree[s.owned].gid) == s.owned_ids
    assert tree[s.owned].mode == stat.S_IFREG | 0o640
    a, b = (tree[p] for p in s.hardlink)
    assert a.hardlink_group == b.hardlink_group == s.hardlink[0] and a.nlink == b.nlink == 2
    assert a.sha256 == b.sha256
    assert tree[s.capability].xattrs == {"security.capability": debian.CAP_NET_RAW_EP}


# ----------------------------------------------------------- slow: the real image


@pytest.mark.slow
def test_layout_is_an_oci_image_with_two_gzip_layers(debian_oci_layout: Path) -> None:
    layout = debian_oci_layout
    assert (layout / "oci-layout").is_file() and (layout / "index.json").is_file()
    assert layout == debian.debian_layout()  # cached: same path, no rebuild
    manifest, config = debian.read_manifest(layout)
    assert len(manifest["layers"]) >= 2
    assert all(d["mediaType"] == debian.MT_LAYER_GZIP for d in manifest["layers"])
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for desc in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / desc["digest"].split(":")[1]
        assert blob.stat().st_size == desc["size"]
        assert blob.read_bytes()[:4] == b"\x1f\x8b\x08\x00"  # gzip, no name, mtime 0 follows
        assert blob.read_bytes()[4:8] == b"\0\0\0\0"


@pytest.mark.slow
def test_upper_layer_has_the_special_entries(debian_oci_layout: Path) -> None:
    upper = {m.name.rstrip("/"): m for m in layer_members(debian_oci_layout, -1)}
    lower = {m.name.rstrip("/"): m for m in layer_members(debian_oci_layout, 0)}
    s = SPECIAL
    victim_dir, _, victim = s.whiteout_victim.rpartition("/")
    assert f"{victim_dir}/.wh.{victim}" in upper
    assert lower[s.whiteout_victim].isreg()  # it exists below, so the whiteout means something
    wdir, _, wname = s.whiteout_dir.rpartition("/")
    assert f"{wdir}/.wh.{wname}" in upper and lower[s.whiteout_dir].isdir()
    assert f"{s.opaque_dir}/.wh..wh..opq" in upper and upper[s.opaque_dir].isdir()
    below = [n for n in lower if n.startswith(s.opaque_dir + "/")]
    assert len(below) >= 3 and any(lower[n].isdir() for n in below)
    assert s.opaque_new in upper and s.opaque_new not in lower
    suid = upper[s.setuid]
    assert suid.isreg() and suid.mode == 0o4755 and (suid.uid, suid.gid) == (0, 0)
    secret = upper[s.secret]
    assert secret.isreg() and secret.mode == 0o600 and (secret.uid, secret.gid) == (0, 0)
    a, b = (upper[p] for p in s.hardlink)
    assert a.isreg() and b.islnk() and b.linkname == s.hardlink[0]
    assert "SCHILY.xattr.security.capability" in upper[s.capability].pax_headers
    # The lower layer carries debootstrap's own hard links and device nodes.
    assert any(m.islnk() for m in lower.values())
    assert lower["dev/null"].ischr() and (
        lower["dev/null"].devmajor,
        lower["dev/null"].devminor,
    ) == (1, 3)


@pytest.mark.slow
def test_expected_tree_of_the_real_image(debian_oci_layout: Path) -> None:
    tree = expected_tree(debian_oci_layout)
    assert len(tree) > 5000
    su = tree["usr/bin/su"]
    assert (su.type, su.uid, su.gid, su.mode) == ("reg", 0, 0, stat.S_IFREG | 0o4755)
    shadow_gid = debian.group_id(debian_oci_layout, "shadow")
    assert shadow_gid != 0
    shadow = tree["etc/shadow"]
    assert (shadow.type, shadow.uid, shadow.gid, shadow.mode) == (
        "reg",
        0,
        shadow_gid,
        stat.S_IFREG | 0o640,
    )
    assert tree["bin"].type == "symlink" and tree["bin"].linkname == "usr/bin"
    assert tree["usr/sbin/init"].linkname == "/lib/systemd/systemd"  # systemd-sysv
    assert tree["usr/bin/ip"].type == "reg"  # iproute2
    assert any(e.nlink > 1 for e in tree.values())
    assert "etc/resolv.conf" not in tree  # no host nameserver baked in
    _check_special(tree)


@pytest.mark.slow
def test_debian_image_is_served_by_the_registry(debian_image: debian.DebianImage) -> None:
    url = f"{debian_image.registry.url}/v2/library/debian/manifests/bookworm"
    r = requests.get(url, headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    assert r.status_code == 200, r.text
    assert f"sha256:{hashlib.sha256(r.content).hexdigest()}" == debian_image.digest
    assert r.headers.get("Docker-Content-Digest") == debian_image.digest
    manifest = r.json()
    assert len(manifest["layers"]) >= 2
    for desc in [manifest["config"], *manifest["layers"]]:
        head = requests.head(
            f"{debian_image.registry.url}/v2/library/debian/blobs/{desc['digest']}", timeout=30
        )
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == desc["size"]
    assert debian_image.mirror == f"docker.io={debian_image.registry.url}"
    assert debian_image.reference == "docker.io/library/debian:bookworm"


# ------------------------------------------------------------- the unpriv runner


@pytest.mark.slow
def test_unpriv_runs_as_nobody_with_its_own_dirs(unpriv) -> None:  # type: ignore[no-untyped-def]
    assert unpriv.run_cmd(["id", "-u"]).stdout.strip() == "65534"
    assert unpriv.run_cmd(["id", "-G"]).stdout.strip() == "65534"  # no supplementary groups
    env = unpriv.run_cmd(["sh", "-c", "echo $HOME $XDG_CACHE_HOME $TMPDIR"]).stdout.split()
    assert env == [str(unpriv.home), str(unpriv.cache), str(unpriv.tmp)]
    for d in (unpriv.home, unpriv.cache, unpriv.tmp):
        assert d.stat().st_uid == unpriv.uid
    unpriv.run_cmd(["touch", f"{unpriv.tmp}/x", f"{unpriv.home}/y"])
    assert unpriv.run_cmd(["ls", "/root"], check=False).returncode != 0
    imp = unpriv.run_cmd(
        [unpriv.venv.python, "-c", "import banger_build; print(banger_build.__file__)"]
    )
    assert imp.stdout.startswith(str(unpriv.venv.venv))  # the installed copy, not the repo
    copy = unpriv.copy_in(Path(__file__).parents[1] / "recipes")
    assert (copy / "debian.toml").is_file() and copy.stat().st_uid == unpriv.uid
    unpriv.run_cmd(["cat", str(copy / "debian.toml")])
