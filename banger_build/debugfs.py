"""Driving debugfs safely: scripts in, parsed listings out.

debugfs is a shell-escape hazard (a script line starting with ``!`` runs
through system()) and exits 0 when its commands fail. So:

- scripts are built only from inode numbers, fixed keywords, numbers and
  names that ``quote()`` accepts (no NUL/CR/LF, at most 255 bytes), and each
  line is checked against debugfs's 8 KiB line buffer;
- any stderr line other than the version banner is a failure;
- every run gets the clean environment and the fixed E2FSPROGS_FAKE_TIME.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import ToolError
from banger_build.run import run, tool_env
from banger_build.tree import NAME_MAX

_MAX_LINE = 4096  # well below debugfs's 8191-byte line limit
_BANNER = re.compile(rb"^debugfs \d+\.\d+(\.\d+)? \(.*\)$")
_ECHO = b"debugfs: "


class UnsafeScript(ValueError):
    """A debugfs script line that could be misread; never sent to debugfs."""


def quote(name: bytes) -> bytes:
    """Quote a single directory-entry name for a debugfs command line."""
    if not name or b"\x00" in name or b"\n" in name or b"\r" in name:
        raise UnsafeScript(f"name {name!r} cannot be carried in a debugfs script")
    if len(name) > NAME_MAX or b"/" in name:
        raise UnsafeScript(f"name {name!r} is not a single ext4 directory entry")
    return b'"' + name.replace(b'"', b'""') + b'"'


def ino(number: int) -> bytes:
    if number <= 0:
        raise UnsafeScript(f"invalid inode number {number}")
    return b"<%d>" % number


def check_line(line: bytes) -> bytes:
    if b"\n" in line or b"\r" in line or b"\x00" in line:
        raise UnsafeScript(f"script line with a control character: {line[:80]!r}")
    if line.lstrip().startswith(b"!") or len(line) >= _MAX_LINE:
        raise UnsafeScript(f"unsafe debugfs script line: {line[:80]!r}")
    return line


def fake_time_env(epoch: int) -> dict[str, str]:
    # 0 means "now" to e2fsprogs; the epoch is never 0 by construction.
    return tool_env({"E2FSPROGS_FAKE_TIME": str(max(1, epoch))})


def run_script(
    image: Path,
    lines: Iterable[bytes],
    *,
    epoch: int,
    write: bool,
    cwd: Path | None = None,
    output: bool = True,
) -> bytes:
    """Run a debugfs script; return stdout (``b""`` unless ``output``); raise on any error line.

    The script is checked line by line as it is written to a temp file (in
    ``cwd`` when given), which becomes debugfs's stdin: a script of any length
    costs no memory. debugfs echoes every line to stdout; without ``output``
    that echo is discarded instead of held.
    """
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", os.path.abspath(image)]
    with tempfile.TemporaryFile(dir=cwd, prefix="debugfs-script-") as script:
        for line in lines:
            script.write(check_line(line) + b"\n")
        script.seek(0)
        proc = run(
            argv,
            stdin=script,
            stdout=None if output else subprocess.DEVNULL,
            env=fake_time_env(epoch),
            cwd=cwd,
        )
    errors = [line for line in proc.stderr.splitlines() if line.strip() and not _BANNER.match(line)]
    if errors:
        text = b"\n".join(errors[:20]).decode("utf-8", "replace")
        raise ToolError(
            f"debugfs reported errors on {image.name}:\n{text}",
            argv=argv,
            returncode=proc.returncode,
            stderr=proc.stderr.decode("utf-8", "replace"),
        )
    return proc.stdout or b""


@dataclass(frozen=True, slots=True)
class DirEntry:
    ino: int
    mode: int
    uid: int
    gid: int
    name: bytes
    size: int | None


def parse_ls(stdout: bytes) -> dict[int, list[DirEntry]]:
    """Parse the output of a script of ``ls -p <ino>`` commands, per directory inode.

    Each command is echoed as ``debugfs: ls -p <N>``; entries look like
    ``/ino/mode/uid/gid/name/size/`` (names cannot contain '/' or newlines).
    """
    out: dict[int, list[DirEntry]] = {}
    current: list[DirEntry] | None = None
    for line in stdout.split(b"\n"):
        if line.startswith(_ECHO):
            m = re.fullmatch(rb"debugfs: ls -p <(\d+)>", line)
            current = out.setdefault(int(m.group(1)), []) if m else None
            continue
        if not line or current is None:
            continue
        if not (line.startswith(b"/") and line.endswith(b"/")):
            raise ToolError(f"unexpected debugfs ls output: {line[:120]!r}")
        head = line[1:-1].split(b"/", 4)
        name, _, size = head[4].rpartition(b"/")
        if int(head[0]) == 0:
            continue  # unused slots (lost+found is pre-filled with them)
        current.append(
            DirEntry(
                ino=int(head[0]),
                mode=int(head[1], 8),
                uid=int(head[2]),
                gid=int(head[3]),
                name=name,
                size=int(size) if size else None,
            )
        )
    return out


def parse_allocated(stdout: bytes) -> list[int]:
    """Inode numbers printed by ``mknod`` ("Allocated inode: N"), in order."""
    return [int(m) for m in re.findall(rb"Allocated inode: (\d+)", stdout)]
