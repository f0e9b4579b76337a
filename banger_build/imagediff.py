"""Explain how two ext4 images differ: first differing files and what differs.

Used by ``check``. Every inode is read by number with debugfs (``ls -p``
breadth-first, then ``stat``, ``ea_list`` and ``dump`` in batches); each
path gets a small record, and records are compared aspect by aspect:
content, owner, mode, times, xattrs, layout (type, links, size on disk,
inode number). If every path agrees, the difference is in filesystem-wide
metadata and the superblock fields that differ are named.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from banger_build import debugfs
from banger_build.run import run

_TIMES = ("ctime", "atime", "mtime", "crtime")
#: fields reported as their own aspects, cut out of the lines that make "layout"
_NOT_LAYOUT = re.compile(r"Mode:\s+[0-7]+|User:\s+\d+|Group:\s+\d+|Inode checksum: \S+")


@dataclass(frozen=True)
class FileRecord:
    ino: int
    mode: int
    uid: int
    gid: int
    times: tuple[str, ...]
    xattrs: str
    layout: tuple[str, ...]
    content: str | None

    def aspects_differing(self, other: FileRecord) -> list[str]:
        out = []
        if self.content != other.content:
            out.append("content")
        if (self.uid, self.gid) != (other.uid, other.gid):
            out.append(f"owner {self.uid}:{self.gid} vs {other.uid}:{other.gid}")
        if self.mode != other.mode:
            out.append(f"mode {self.mode:o} vs {other.mode:o}")
        if self.times != other.times:
            out.append("times")
        if self.xattrs != other.xattrs:
            out.append("xattrs")
        if self.layout != other.layout or self.ino != other.ino:
            out.append("layout")
        return out


def _sections(stdout: bytes) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.decode("utf-8", "surrogateescape").split("\n"):
        if line.startswith("debugfs: "):
            current = out.setdefault(line[9:], [])
        elif current is not None:
            current.append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _field(text: str, pattern: str, base: int = 10) -> int:
    m = re.search(pattern, text)
    return int(m.group(1), base) if m else -1


def read_records(image: Path) -> dict[bytes, FileRecord]:
    """path (bytes, '' for the root) -> FileRecord, for every path in ``image``."""
    paths: dict[bytes, int] = {b"": 2}
    level = [(b"", 2)]
    while level:
        out = debugfs.run_script(image, (b"ls -p <%d>" % i for _, i in level), epoch=1, write=False)
        listing = debugfs.parse_ls(out)
        nxt = []
        for path, ino in level:
            for e in listing.get(ino, []):
                if e.name in (b".", b".."):
                    continue
                child = path + b"/" + e.name if path else e.name
                paths[child] = e.ino
                if e.mode & 0o170000 == 0o040000:
                    nxt.append((child, e.ino))
        level = nxt
    inos = sorted(set(paths.values()))
    stats = _sections(
        debugfs.run_script(image, (b"stat <%d>" % i for i in inos), epoch=1, write=False)
    )
    eas = _sections(
        debugfs.run_script(image, (b"ea_list <%d>" % i for i in inos), epoch=1, write=False)
    )
    contents: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="banger-diff-") as tmp:
        regular = [i for i in inos if "Type: regular" in stats.get(f"stat <{i}>", "")]
        if regular:
            debugfs.run_script(
                image, (b"dump <%d> %d" % (i, i) for i in regular), epoch=1, write=False,
                cwd=Path(tmp),
            )  # fmt: skip
            for i in regular:
                contents[i] = hashlib.sha256((Path(tmp) / str(i)).read_bytes()).hexdigest()
    records: dict[int, FileRecord] = {}
    for i in inos:
        s = stats.get(f"stat <{i}>", "")
        lines = s.splitlines()
        records[i] = FileRecord(
            ino=i,
            mode=_field(s, r"Mode:\s+([0-7]+)", 8),
            uid=_field(s, r"User:\s+(\d+)"),
            gid=_field(s, r"Group:\s+(\d+)"),
            times=tuple(ln.strip() for ln in lines if ln.strip().split(":")[0] in _TIMES),
            xattrs=eas.get(f"ea_list <{i}>", ""),
            layout=tuple(
                _NOT_LAYOUT.sub("", ln).strip() for ln in lines
                if ln.startswith(("Inode:", "Links:", "EXTENTS", "(")) or "Size:" in ln
            ),
            content=contents.get(i),
        )  # fmt: skip
    return {p: records[i] for p, i in paths.items()}


def superblock(image: Path) -> dict[str, str]:
    out = run(["dumpe2fs", "-h", str(image)], check=False).stdout.decode("utf-8", "replace")
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def explain(a: Path, b: Path, *, limit: int = 10) -> list[str]:
    """Lines naming the first differing files (by path) of images a and b."""
    ra, rb = read_records(a), read_records(b)
    lines: list[str] = []
    for path in sorted(set(ra) | set(rb)):
        shown = "/" + path.decode("utf-8", "replace")
        if path not in rb:
            lines.append(f"{shown}: only in the first image")
        elif path not in ra:
            lines.append(f"{shown}: only in the second image")
        else:
            aspects = ra[path].aspects_differing(rb[path])
            if aspects:
                lines.append(f"{shown}: {', '.join(aspects)}")
        if len(lines) >= limit:
            lines.append("...")
            return lines
    if not lines:
        sa, sb = superblock(a), superblock(b)
        diff = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        lines.append(
            "every file agrees; filesystem metadata differs: " + (", ".join(diff) or "block layout")
        )
    return lines
