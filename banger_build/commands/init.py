"""``banger-build init [DIR]``: start a project with a recipe that builds as it is.

Writes, under DIR (default: the current directory, created if missing):

    recipes/NAME.toml         Debian bookworm, /etc/hostname, /etc/hosts and /etc/fstab
                              from the built-in templates (builtin:...), /etc/motd from
    recipes/templates/motd.j2 the project's own template; no guest set
    .gitignore                ignores the out-links (/result, /result-*): lines are
                              added to an existing one, nothing else changes

NAME is --name, else DIR's name. An existing recipe or template is never
overwritten: init refuses, names it and writes nothing. It prints the command
that builds the recipe. The image is docker.io/library/debian:bookworm, which
the quick start's registry serves (--mirror docker.io=URL).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from banger_build.errors import InputError, Reason

NAME = "init"
HELP = "write a starter recipe (recipes/NAME.toml) and a .gitignore for the out-links"

#: the out-links: result, result-2, ... (gc roots of the store, not sources)
IGNORE = ("/result", "/result-*")

RECIPE = """\
# {name}: a microVM root filesystem. Build it with
#
#   banger-build recipes/{name}.toml
#
# (the quick start's local registry: add --mirror docker.io=http://127.0.0.1:PORT).
# `banger-build render recipes/{name}.toml` shows what the templates render to.
version = 1
name = "{name}"

[image]
ref = "docker.io/library/debian:bookworm"
platform = "linux/amd64"

[rootfs]
size = "auto+256MiB"                 # what the image needs, plus 256 MiB free

[vars]                               # what the templates see, besides recipe.*
hostname = "{hostname}"

# banger's guest set (the vsock agent, network and first-boot units, with the
# agent banger-build ships for the platform): drop agents = false. Off here.
[guest]
agents = false

[[templates]]                        # built into banger-build (builtin:NAME)
src = "builtin:hostname.j2"
dest = "/etc/hostname"

[[templates]]
src = "builtin:hosts.j2"
dest = "/etc/hosts"

[[templates]]
src = "builtin:fstab.j2"
dest = "/etc/fstab"

[[templates]]                        # the project's own, relative to this file
src = "templates/motd.j2"
dest = "/etc/motd"
mode = "0644"
"""

MOTD = """\
{{ recipe.name }}: built by banger-build from {{ recipe.image }}.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory", type=Path, nargs="?", default=Path("."), metavar="DIR",
        help="the project directory (default: the current one; created if missing)",
    )  # fmt: skip
    p.add_argument(
        "--name", help="the recipe's name (default: DIR's name), also its file name"
    )  # fmt: skip


def recipe_name(directory: Path, given: str | None) -> str:
    """``given`` if it is a valid name; else DIR's name made into one."""
    if given is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", given):
            raise InputError(
                f"--name {given!r}: 1-100 characters of A-Z a-z 0-9 . _ + -, starting with "
                "a letter or digit",
                reason=Reason.BAD_ARGUMENT,
            )
        return given
    base = re.sub(r"[^A-Za-z0-9._+-]+", "-", directory.absolute().resolve().name)
    base = base.lstrip("._+-")[:100]
    return base or "microvm"


def run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    name = recipe_name(directory, args.name)
    hostname = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "microvm"
    files = {
        Path("recipes") / f"{name}.toml": RECIPE.format(name=name, hostname=hostname),
        Path("recipes") / "templates" / "motd.j2": MOTD,
    }
    existing = [str(directory / f) for f in files if (directory / f).exists()]
    if existing:
        raise InputError(
            f"not overwriting {', '.join(existing)}: init starts a project (remove them, "
            "or choose another DIR or --name)",
            reason=Reason.BAD_ARGUMENT,
        )
    try:
        for rel, text in files.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(directory / rel, "x", encoding="utf-8") as f:  # never over a file
                f.write(text)
        ignored = _ignore_out_links(directory / ".gitignore")
    except OSError as exc:
        raise InputError(f"init: {exc.filename}: {exc.strerror or exc}", reason=Reason.IO) from None
    for rel in files:
        print(f"wrote {directory / rel}")
    if ignored:
        print(f"{ignored} {directory / '.gitignore'} ({' '.join(IGNORE)}: the out-links)")
    recipe = directory / "recipes" / f"{name}.toml"
    print(f"build it:  banger-build {recipe}")
    return 0


def _ignore_out_links(path: Path) -> str:
    """Make ``path`` ignore the out-links: "wrote" it, "updated" it, or "" (it did)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        path.write_text("# out-links of banger-build\n" + "".join(f"{p}\n" for p in IGNORE))
        return "wrote"
    have = {line.strip() for line in text.splitlines()}
    missing = [p for p in IGNORE if p not in have]
    if not missing or {"result*", "/result*"} & have:
        return ""
    with path.open("a", encoding="utf-8") as f:
        f.write(
            ("" if not text or text.endswith("\n") else "\n") + "".join(f"{p}\n" for p in missing)
        )
    return "updated"
