"""Shared pieces of the end-to-end tests: a small image with every interesting entry,
a recipe that uses files, templates and symlinks, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest

from banger_build.cli import main
from tests.support.oci import Entry, make_layer, push_image
from tests.support.registry import RegistryServer

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12

BASE = [
    Entry.dir("etc"),
    Entry.file(
        "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001::/home/app:/bin/sh\n"
    ),
    Entry.file("etc/group", b"root:x:0:\nshadow:x:42:\nadm:x:4:\napp:x:1001:\n"),
    Entry.file("etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42),
    Entry.file("etc/motd", b"base motd\n"),
    Entry.dir("usr/bin"),
    Entry.file("usr/bin/su", b"\x7fELF-su", mode=0o4755),
    Entry.symlink("bin", "usr/bin"),
    Entry.dir("usr/lib/systemd/system"),
    Entry.symlink("lib", "usr/lib"),
    Entry.dir("dev"),
    Entry.chardev("dev/console", 5, 1, mode=0o600),
    Entry.dir("var/cache/apt"),
    Entry.file("var/cache/apt/junk", b"junk"),
]
UPPER = [
    Entry.whiteout("etc/motd"),
    Entry.opaque("var/cache/apt"),
    Entry.file("var/cache/apt/fresh", b"fresh"),
    Entry.file("usr/bin/ping", b"ping", mode=0o755, pax=Entry.xattr("security.capability", CAP)),
    Entry.file("root-only", b"secret", mode=0o600),
]


def push(registry: RegistryServer, repo: str, layers: list[list[Any]], tag: str = "v1") -> Any:
    return push_image(registry.url, repo, tag, [make_layer(lay) for lay in layers])


def write_recipe(directory: Path, ref: str, extra: str = "", name: str = "recipe.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hello.txt").write_text("hello from the recipe\n")
    (directory / "unit.j2").write_text("[Unit]\nDescription={{ what }} on {{ recipe.name }}\n")
    path = directory / name
    path.write_text(
        f"""
[image]
ref = "{ref}"

[vars]
what = "test unit"

[[files]]
src = "hello.txt"
dest = "/etc/hello"
mode = "0640"
owner = "root:adm"

[[templates]]
src = "unit.j2"
dest = "/lib/systemd/system/test.service"

[[symlinks]]
dest = "/etc/systemd/system/multi-user.target.wants/test.service"
target = "/lib/systemd/system/test.service"
{extra}
"""
    )
    return path


def run_cli(home: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--home", str(home)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def image_ref(registry: RegistryServer, request: pytest.FixtureRequest) -> str:
    repo = f"e2e/{request.node.name.lower().replace('_', '-')[:40].strip('-')}"
    push(registry, repo, [BASE, UPPER])
    return f"{registry.host}/{repo}:v1"
