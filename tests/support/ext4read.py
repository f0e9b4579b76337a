"""Read an ext4 image back for assertions, with debugfs by inode number.

Independent of banger_build's own debugfs code on purpose. Not ``rdump``: as
root it drops setuid/setgid bits, splits hard links and skips devices,
fifos and xattrs (DESIGN.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass
class Seen:
    path: str
    ino: int
    mode: int  # full st_mode
    uid: int = 0
    gid: int = 0
    size: int = 0
    links: int = 0
    mtime: int = 0  # seconds, with ext4's epoch bits (1901-2446)
    atime: int = 0
    ctime: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    target: str | None = None
    sha256: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def type(self) -> str:
        m = self.mode
        for test, name in (
            (stat.S_ISREG, "reg"),
            (stat.S_ISDIR, "dir"),
            (stat.S_ISLNK, "symlink"),
            (stat.S_ISFIFO, "fifo"),
            (stat.S_ISCHR, "chr"),
            (stat.S_ISBLK, "blk"),
        ):
            if test(m):
                return name
        return "?"


def _debugfs(image: Path, script: str, cwd: str | None = None) -> bytes:
    proc = subprocess.run(
        ["debugfs", "-f", "-", str(image)],
        input=script.encode(),
        capture_output=True,
        env=ENV,
        cwd=cwd,
        check=True,
    )
    return proc.stdout


def _sections(out: bytes) -> dict[str, bytes]:
    sections: dict[str, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in out.split(b"\n"):
        if line.startswith(b"debugfs: "):
            current = sections.setdefault(line[9:].decode(), [])
        elif current is not None:
            current.append(line)
    return {k: b"\n".join(v) for k, v in sections.items()}


def read_image(image: Path, *, contents: bool = True) -> dict[str, Seen]:
    """Every path in the image -> what debugfs says about its inode ('' is /)."""
    names: dict[str, int] = {"": 2}
    level = [("", 2)]
    while level:
        out = _sections(_debugfs(image, "".join(f"ls -p <{i}>\n" for _, i in level)))
        nxt = []
        for path, ino in level:
            for line in out[f"ls -p <{ino}>"].split(b"\n"):
                if not line.startswith(b"/"):
                    continue
                f = line[1:-1].split(b"/", 4)
                name = f[4].rpartition(b"/")[0].decode("utf-8", "surrogateescape")
                if name in (".", "..") or int(f[0]) == 0:
                    continue
                child = f"{path}/{name}" if path else name
                names[child] = int(f[0])
                if int(f[1], 8) & 0o170000 == 0o040000:
                    nxt.append((child, int(f[0])))
        level = nxt
    inos = sorted(set(names.values()))
    stats = _sections(_debugfs(image, "".join(f"stat <{i}>\n" for i in inos)))
    eas = _sections(_debugfs(image, "".join(f"ea_list <{i}>\n" for i in inos)))
    info: dict[int, Seen] = {}
    for i in inos:
        s = stats[f"stat <{i}>"].decode("utf-8", "surrogateescape")
        seen = Seen(path="", ino=i, mode=0)
        m = re.search(r"Type: (\w+)(?: special)?\s+Mode:\s+(\d+)", s)
        assert m, (i, s)
        kind = {
            "regular": 0o100000,
            "directory": 0o040000,
            "symlink": 0o120000,
            "FIFO": 0o010000,
            "character": 0o020000,
            "block": 0o060000,
        }[m.group(1)]
        seen.mode = kind | int(m.group(2), 8)
        # debugfs prints ids as signed 32-bit numbers: 2^31 and above come out negative
        uid = int(re.search(r"User:\s+(-?\d+)", s).group(1))  # type: ignore[union-attr]
        gid = int(re.search(r"Group:\s+(-?\d+)", s).group(1))  # type: ignore[union-attr]
        seen.uid, seen.gid = uid & 0xFFFFFFFF, gid & 0xFFFFFFFF
        seen.size = int(re.search(r"Size: (\d+)", s).group(1))  # type: ignore[union-attr]
        seen.links = int(re.search(r"Links: (\d+)", s).group(1))  # type: ignore[union-attr]
        for t in ("mtime", "atime", "ctime"):
            # debugfs prints the raw fields: 32-bit seconds, then the extra word
            # (nanoseconds << 2 | the two epoch bits extending the seconds)
            tm = re.search(rf"\b{t}: 0x([0-9a-f]+)(?::([0-9a-f]+))?", s)
            low = int(tm.group(1), 16) if tm else 0
            extra = int(tm.group(2), 16) if tm and tm.group(2) else 0
            seconds = (low - (1 << 32) if low & 0x80000000 else low) + ((extra & 3) << 32)
            setattr(seen, t, seconds)
            setattr(seen, f"{t}_ns", extra >> 2)
        dev = re.search(r"Device major/minor number: (\d+):(\d+)", s)
        if dev:
            seen.rdev = (int(dev.group(1)), int(dev.group(2)))
        fast = re.search(r'Fast link dest: "(.*)"', s)
        if fast:
            seen.target = fast.group(1)
        for line in eas[f"ea_list <{i}>"].split(b"\n"):
            em = re.match(rb"\s*(\S+?) \((\d+)\)(?: = (.*))?$", line)
            if em:
                seen.xattrs[em.group(1).decode()] = _ea_value(image, i, em.group(1).decode())
        info[i] = seen
    with tempfile.TemporaryDirectory() as tmp:
        dumps = [i for i in inos if stat.S_ISREG(info[i].mode) and contents]
        slow_links = [i for i in inos if stat.S_ISLNK(info[i].mode) and info[i].target is None]
        if dumps or slow_links:
            _debugfs(image, "".join(f"dump <{i}> {i}\n" for i in dumps + slow_links), cwd=tmp)
        for i in dumps:
            info[i].sha256 = hashlib.sha256(Path(tmp, str(i)).read_bytes()).hexdigest()
        for i in slow_links:
            info[i].target = Path(tmp, str(i)).read_bytes().decode("utf-8", "surrogateescape")
    out: dict[str, Seen] = {}
    for path, i in names.items():
        s = info[i]
        out[path] = Seen(**{**s.__dict__, "path": path, "xattrs": dict(s.xattrs)})
    return out


def _ea_value(image: Path, ino: int, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        _debugfs(image, f"ea_get -f v <{ino}> {name}\n", cwd=tmp)
        return Path(tmp, "v").read_bytes()


def fsck(image: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, env=ENV, check=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["Seen", "fsck", "read_image", "sha256_file"]


def read_at(image: Path, path: str | int, offset: int, length: int) -> bytes:
    """Bytes of a file in the image (by path, or by inode number for names debugfs
    cannot parse), mapped block by block with debugfs ``bmap`` (a hole reads as zeros)."""
    first, last = offset // 4096, (offset + length - 1) // 4096
    spec = f"<{path}>" if isinstance(path, int) else f"/{path}"
    script = "".join(f"bmap {spec} {b}\n" for b in range(first, last + 1))
    out = _debugfs(image, script).decode()
    blocks = [int(line) for line in out.split("\n") if line.strip().isdigit()]
    assert len(blocks) == last - first + 1, out
    data = bytearray()
    with open(image, "rb") as f:
        for phys in blocks:
            data += os.pread(f.fileno(), 4096, phys * 4096) if phys else bytes(4096)
    start = offset - first * 4096
    return bytes(data[start : start + length])
