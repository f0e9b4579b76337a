"""Fuzz: mutated recipes never give a traceback or a hang, and every error names its position.

Valid recipes (recipes/*.toml, examples/*.toml and the recipes the other
tests write) are mutated with a seeded generator: wrong types, unknown and
missing keys, huge/negative/odd sizes, modes, owners, destinations, hostile
paths (absolute, ``..``, outside the project, /proc/self/environ, /dev/zero,
a FIFO, a symlink loop, a directory), hostile templates (syntax errors,
sandbox escapes, ``1/0``, recursion, huge output, a memory bomb, non-UTF-8,
includes of a FIFO), and damage to the TOML text (truncation, byte flips,
stray tokens, swapped lines). Each case runs ``load_recipe`` and the
resolution of the local inputs (files hashed, templates rendered, kernel
files) under a timer. The test fails on any exception that is not a
``BangerError``, on any case that outlives its timer, and on any error
without ``file:line:col``. A sample also goes through the real CLI, which
must print one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import os
import random
import re
import shutil
import signal
import socket
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import tomli_w

from banger_build import templating
from banger_build.cli import main
from banger_build.errors import BangerError, RecipeError
from banger_build.inputs import resolve_injected, resolve_kernel
from banger_build.recipe import load_recipe
from tests.support.kmod import VSOCK_KO

REPO = Path(__file__).resolve().parents[1]
SEED = 20240808
CASES = 600
CASE_TIMEOUT = 15.0  # seconds: generous; a case takes milliseconds
SUITE_BUDGET = 50.0  # seconds for all cases together
STAND_IN_AGENT = b"\x7fELF stand-in agent\n"

# -- the project the recipes live in ---------------------------------------------------

TEST_RECIPES = {
    # tests/test_recipe.py's FULL, its sources present
    "full.toml": """\
version = 1
name = "my-image"

[image]
ref = "registry.example.com:5000/team/base:1.2"
platform = "linux/arm64/v8"

[rootfs]
size = "auto+512MiB"

[kernel]
path = "boot/vmlinux"
initrd = "boot/initrd.img"
modules = "boot/6.1.0-test"
install_modules = true

[vars]
hostname = "box"
nested = { a = [1, 2], b = { c = true } }

[[files]]
src = "files/motd"
dest = "/etc/motd"
mode = "0600"
owner = "root:adm"

[[files]]
src = "files/agent"
dest = "/usr/local/bin/agent"
mode = 0o755

[[templates]]
src = "../templates/hostname.j2"
dest = "/etc/hostname"

[[symlinks]]
dest = "/etc/issue.net"
target = "/etc/motd"
owner = "0:4"
""",
    # tests/support/e2e.py's write_recipe
    "e2e.toml": """\
[image]
ref = "127.0.0.1:5000/e2e/x:v1"

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
""",
    # tests/test_guest.py's recipe_file, with an override
    "guest.toml": """\
[image]
ref = "debian:bookworm"

[vars]
hostname = "box"
vsock_port = 52

[[files]]
src = "hello.txt"
dest = "/etc/motd"

[[templates]]
src = "hostname.j2"
dest = "/etc/hostname"

[guest]
agent = "../agents/out/banger-vsock-agent"
[guest.templates]
"banger-network-bootstrap" = "net.j2"
""",
}

HOSTILE_TEMPLATES = {
    "syntax.j2": "line one\n{% if %}\n",
    "unclosed.j2": "{% for x in y %}",
    "escape.j2": '{{ cycler.__init__.__globals__.os.popen("id").read() }}',
    "escape2.j2": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mutate.j2": "{{ recipe.update({'name': 1}) }}",
    "zerodiv.j2": "ok\n{{ 1/0 }}\n",
    "recursion.j2": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "self-include.j2": '{% include "self-include.j2" %}',
    "huge.j2": '{% for i in range(100000) %}{{ "y" * 1000 }}{% endfor %}',
    "memory.j2": '{{ "x" * 10**10 }}',
    "undefined.j2": "{{ nope.deeper }}",
    "include-fifo.j2": '{% include "fifo" %}',
    "include-out.j2": '{% include "out-link" %}',
    "include-up.j2": '{% include "../../etc/passwd" %}',
    "typeerror.j2": '{{ "%d" % "x" }}',
    "fine.j2": "{{ recipe.name }} {{ hostname | default('h') }}\n",
}
HOSTILE_BYTES = {"nonutf8.j2": b"fine\n\xff\xfe\n"}


@dataclass(frozen=True)
class Project:
    top: Path
    recipes: list[Path]  # the valid recipes, each one directory below the top


def make_project(top: Path) -> Project:
    (top / ".git").mkdir()
    for name in ("recipes", "examples", "templates"):
        shutil.copytree(REPO / name, top / name, ignore=shutil.ignore_patterns("*.lock"))
    (top / "agents" / "out").mkdir(parents=True)
    (top / "agents" / "out" / "banger-vsock-agent").write_bytes(STAND_IN_AGENT)
    tests = top / "tests"
    (tests / "files").mkdir(parents=True)
    (tests / "files" / "motd").write_text("hello\n")
    (tests / "files" / "agent").write_bytes(b"\x7fELF agent")
    (tests / "boot" / "6.1.0-test" / "kernel").mkdir(parents=True)
    (tests / "boot" / "6.1.0-test" / "kernel" / "vsock.ko").write_bytes(VSOCK_KO)
    (tests / "boot" / "vmlinux").write_bytes(b"kernel")
    (tests / "boot" / "initrd.img").write_bytes(b"initrd")
    (tests / "hello.txt").write_text("hello from the recipe\n")
    (tests / "unit.j2").write_text("[Unit]\nDescription={{ what }} on {{ recipe.name }}\n")
    (tests / "hostname.j2").write_text("{{ hostname }}\n")
    (tests / "net.j2").write_text("#!/bin/sh\necho my network {{ hostname }}\n")
    for name, text in TEST_RECIPES.items():
        (tests / name).write_text(text)
    hostile = top / "hostile"
    hostile.mkdir()
    os.mkfifo(hostile / "fifo")
    (hostile / "dir").mkdir()
    (hostile / "loop").symlink_to("loop")
    (hostile / "out-link").symlink_to("/etc/passwd")
    (hostile / "environ-link").symlink_to("/proc/self/environ")
    (hostile / "zero-link").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(hostile / "socket"))
    sock.close()
    for name, text in HOSTILE_TEMPLATES.items():
        (hostile / name).write_text(text)
    for name, data in HOSTILE_BYTES.items():
        (hostile / name).write_bytes(data)
    recipes = sorted([*(top / "recipes").glob("*.toml"), *(top / "examples").glob("*.toml")])
    return Project(top, [*recipes, *(tests / name for name in sorted(TEST_RECIPES))])


# -- mutations ---------------------------------------------------------------------------

HOSTILE_PATHS = [
    "/etc/passwd", "/etc/shadow", "../../../../etc/shadow", "/proc/self/environ",
    "/proc/self/mem", "/dev/zero", "/dev/stdin", "/sys/kernel/notes", "../hostile/fifo",
    "../hostile/dir", "../hostile/loop", "../hostile/out-link", "../hostile/environ-link",
    "../hostile/zero-link", "../hostile/socket", "../hostile", "missing", "", "a\0b",
    "x" * 5000, "../" * 50 + "etc/passwd", ".", "..", "/", "\u00e9t\u00e9/caf\u00e9",
    "../tests/files/motd", "../templates/hostname.j2",
]  # fmt: skip
TEMPLATE_PATHS = [f"../hostile/{name}" for name in [*HOSTILE_TEMPLATES, *HOSTILE_BYTES]]
VALUES: dict[str, list[Any]] = {
    "size": ["8000000TiB", "16TiB", "auto+16TiB", -1, 2**63 - 1, 0, "4097", "auto+", "1.5G",
             17592186040320, "auto+1K", "8MiB", "auto+99999999999999999999T", "9" * 30, "4gib"],
    "mode": ["0o7777", "99999", -1, 0o10000, "", "rwx", 0o644, "0644", 8, 644, 4.5, "7777"],
    "owner": ["root", ":0", "a:b:c", "4294967295:0", "x" * 40 + ":0", "nobody:nogroup",
              "0:0", "Root:0", "app:app", ""],
    "dest": ["/", "relative", "/a/../b", "/" + "x" * 300, "/etc/x\n", "/lost+found/x",
             "/etc//x", "/usr/local/bin/banger-vsock-agent", "/etc/motd", "", "/" + "a/" * 3000],
    "target": ["", "a\0", "x" * 5000, "/", "../../.."],
    "ref": ["", "Debian", "debian@sha256:1", "a" * 300, "localhost:99999/x", "x/" * 100],
    "platform": ["linux", "windows/amd64", "Linux/AMD64", "linux/arm64/v8", "/"],
    "version": [2, 0, -1, "1", 2**63 - 1],
    "name": ["", "-x", "a/b", "x" * 101, "ok-name"],
    "sha256": ["abc", "0" * 64, "g" * 64, "A" * 64],
    "agents": [1, "yes", False, True],
    "install_modules": [True, "yes", 1],
    "vsock_port": [0, "x", 2**40, True, 1024],
    "network_interface": ["eth0; reboot", 5, "", "a" * 16],
    "regenerate_ssh_host_keys": ["no", False],
    "hostname": [{"a": [1]}, 1.5, "x" * 10000, datetime.date(2024, 1, 1)],
}  # fmt: skip
#: built-in template names (``builtin:NAME``): real, unknown, escaping the package data
BUILTIN_SRCS = [
    "builtin:hostname.j2",
    "builtin:",
    "builtin:../pyproject.toml",
    "builtin:guest/../../README.md",
    "builtin:/etc/passwd",
    "builtin:nope.j2",
]
for key in ("src", "agent", "path", "initrd", "modules"):
    VALUES[key] = HOSTILE_PATHS + TEMPLATE_PATHS + BUILTIN_SRCS
WRONG_TYPES: list[Any] = [
    1, -7, 1.5, True, "s", [1], [], {}, {"a": 1}, datetime.date(2024, 1, 1),
    datetime.time(1, 2), [[[]]], {"x": {"y": [1, {"z": 2}]}}, [{"src": 1}],
]  # fmt: skip
UNKNOWN_KEYS = ["sise", "srcc", "zzz", "imge", "x y", "\u00e9", "files", "guest", "kernel", "mdoe"]
TOKENS = ["[", "]", "[[", "]]", "{", "}", '"', "'", '"""', "=", ".", ",", "#", "\n", "\\", " ",
          "\t", "\r\n", "0x", "inf", "nan", "1979-05-27", "\u00e9", "\x00", "\x7f"]  # fmt: skip
GUEST_NAMES = ["banger-network-bootstrap", "banger-first-boot", "banger-vsock.conf"]


def key_paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a parsed document (tables, array elements and leaves)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append((*prefix, k))
            out += key_paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append((*prefix, i))
            out += key_paths(v, (*prefix, i))
    return out


def parent_of(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def hostile_entry(rng: random.Random, section: str, n: int) -> Any:
    if section == "files":
        entry = {"src": rng.choice(HOSTILE_PATHS), "dest": f"/etc/fuzz-{n}"}
    elif section == "templates":
        entry = {"src": rng.choice(TEMPLATE_PATHS + BUILTIN_SRCS), "dest": f"/etc/fuzz-{n}"}
    elif section == "symlinks":
        entry = {"dest": f"/etc/fuzz-{n}", "target": rng.choice(VALUES["target"])}
    elif section == "kernel":
        return {rng.choice(["path", "initrd", "modules"]): rng.choice(HOSTILE_PATHS)}
    else:  # guest
        return {
            "agent": rng.choice(["../agents/out/banger-vsock-agent", *HOSTILE_PATHS]),
            "templates": {rng.choice(GUEST_NAMES): rng.choice(TEMPLATE_PATHS)},
        }
    for key in ("mode", "owner"):
        if rng.random() < 0.3:
            entry[key] = rng.choice(VALUES[key])
    return entry


def mutate_data(rng: random.Random, data: dict[str, Any]) -> None:
    """One structured mutation of a parsed recipe, in place."""
    paths = key_paths(data)
    op = rng.random()
    if op < 0.35 and paths:  # a hostile value of the right kind, or any wrong type
        path = rng.choice(paths)
        pool = VALUES.get(str(path[-1]))
        value = rng.choice(pool) if pool and rng.random() < 0.8 else rng.choice(WRONG_TYPES)
        parent_of(data, path)[path[-1]] = copy.deepcopy(value)
    elif op < 0.5:  # an unknown key somewhere
        tables = [p for p in paths if isinstance(parent_of(data, p)[p[-1]], dict)]
        target = (
            parent_of(data, (*rng.choice(tables), "x")) if tables and rng.random() < 0.7 else data
        )
        target[rng.choice(UNKNOWN_KEYS)] = copy.deepcopy(rng.choice(WRONG_TYPES))
    elif op < 0.65 and paths:  # a key removed
        path = rng.choice(paths)
        container = parent_of(data, path)
        del container[path[-1]]
    elif op < 0.9:  # a hostile entry added
        section = rng.choice(["files", "templates", "symlinks", "kernel", "guest"])
        n = rng.randrange(1000)
        if section in ("kernel", "guest"):
            data[section] = hostile_entry(rng, section, n)
        else:
            existing = data.get(section)
            entries = existing if isinstance(existing, list) else []
            entries.append(hostile_entry(rng, section, n))
            data[section] = entries
    else:  # a variable the built-in templates read, with an odd value
        name = rng.choice(["vsock_port", "network_interface", "regenerate_ssh_host_keys"])
        vars_ = data.get("vars")
        if not isinstance(vars_, dict):
            vars_ = data["vars"] = {}
        vars_[name] = copy.deepcopy(rng.choice(VALUES[name]))


def mutate_text(rng: random.Random, raw: bytes) -> bytes:
    """Damage to the TOML text itself."""
    op = rng.random()
    if op < 0.25:
        return raw[: rng.randrange(len(raw) + 1)]
    if op < 0.5:
        out = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            if out:
                out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if op < 0.8:
        text = raw.decode("utf-8", "surrogateescape")
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text) + 1)
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        return text.encode("utf-8", "surrogateescape")
    lines = raw.split(b"\n")
    a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
    if rng.random() < 0.5:
        lines[a], lines[b] = lines[b], lines[a]
    else:
        lines.insert(a, lines[b])
    return b"\n".join(lines)


def mutations(project: Project, seed: int, count: int) -> Iterator[tuple[int, Path, bytes]]:
    """(case number, the base recipe, the mutated bytes), deterministic for a seed."""
    rng = random.Random(seed)
    bases = {p: p.read_bytes() for p in project.recipes}
    for n in range(count):
        base = project.recipes[n % len(project.recipes)]
        raw = bases[base]
        if rng.random() < 0.2:  # only a hostile template: everything else stays valid
            data = tomllib.loads(raw.decode())
            template = rng.choice(TEMPLATE_PATHS)
            if isinstance(data.get("guest"), dict) and data["guest"].get("agents", True):
                data["guest"]["templates"] = {rng.choice(GUEST_NAMES): template}
            else:
                data.setdefault("templates", []).append({"src": template, "dest": "/etc/fuzz"})
            yield n, base, tomli_w.dumps(data).encode()
            continue
        if rng.random() < 0.7:
            data = tomllib.loads(raw.decode())
            for _ in range(rng.randint(1, 3)):
                mutate_data(rng, data)
            # a value TOML cannot hold: the text damage below still applies
            with contextlib.suppress(TypeError, ValueError):
                raw = tomli_w.dumps(data).encode()
        if rng.random() < 0.35 or raw == bases[base]:
            raw = mutate_text(rng, raw)
        yield n, base, raw


# -- running a case ------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def resolve_locally(path: Path) -> None:
    recipe = load_recipe(path)
    resolve_injected(recipe)
    resolve_kernel(recipe.kernel, recipe.source_roots)


def position_problem(path: Path, exc: BangerError) -> str | None:
    """Why ``exc`` does not name its recipe position (None: it does)."""
    if isinstance(exc, RecipeError) and (exc.line is None or exc.col is None):
        return "a RecipeError without line and column"
    if not re.match(re.escape(str(path)) + r":\d+:\d+: ", str(exc)):
        return "an error that does not start with file:line:col"
    return None


def run_case(path: Path, check: Callable[[Path], None]) -> tuple[str, str | None]:
    """(the outcome: "ok" or the error's reason, the failure if the test must fail)."""
    try:
        with deadline(CASE_TIMEOUT):
            check(path)
    except Hang as exc:
        return "hang", str(exc)
    except BangerError as exc:
        problem = position_problem(path, exc)
        return exc.reason, f"{problem}: {exc}" if problem else None
    except Exception:  # the very thing this test looks for
        return "traceback", traceback.format_exc(limit=-8)
    return "ok", None


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return make_project(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(autouse=True)
def short_render_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # no template in the pool runs long; a stuck render must still end well inside a case
    monkeypatch.setattr(templating, "RENDER_TIMEOUT", 5.0)


def test_the_unmutated_recipes_resolve(project: Project) -> None:
    for path in project.recipes:
        resolve_locally(path)


def test_mutated_recipes_never_crash_hang_or_lose_their_position(project: Project) -> None:
    started = time.monotonic()
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    for n, base, raw in mutations(project, SEED, CASES):
        path = base.with_name(f"fuzz-{base.stem}.toml")
        path.write_bytes(raw)
        outcome, failure = run_case(path, resolve_locally)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if failure is not None:
            shown = raw[:600].decode("utf-8", "replace")
            failures.append(f"case {n} (from {base.name}): {failure}\n--- recipe ---\n{shown}")
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n\n" + "\n\n".join(
        failures[:10]
    )
    # the mutations reach every layer: syntax, schema, sources, templates, and valid recipes
    expected = {
        "ok", "syntax", "unknown-key", "type", "value", "missing-key", "source-not-allowed",
        "symlink-loop", "not-a-regular-file", "missing-input", "template-unsafe",
        "template-limit", "template-syntax", "template-error",
    }  # fmt: skip
    assert expected <= set(outcomes), outcomes
    assert elapsed < SUITE_BUDGET, f"{CASES} cases took {elapsed:.1f} s: {outcomes}"


HOSTILE_CLI = [
    ('[[files]]\nsrc = "../hostile/fifo"\ndest = "/x"\n', "not a regular file"),
    ('[[files]]\nsrc = "/dev/zero"\ndest = "/x"\n', "/dev"),
    ('[[files]]\nsrc = "/proc/self/environ"\ndest = "/x"\n', "/proc"),
    ('[[files]]\nsrc = "../hostile/loop"\ndest = "/x"\n', "symlink loop"),
    ('[[templates]]\nsrc = "../hostile/escape.j2"\ndest = "/x"\n', "sandbox"),
    ('[[templates]]\nsrc = "../hostile/recursion.j2"\ndest = "/x"\n', "recursion"),
    ('[[templates]]\nsrc = "../hostile/nonutf8.j2"\ndest = "/x"\n', "UTF-8"),
    ('[rootfs]\nsize = "8000000TiB"\n', "too large"),
    ('[image]\nref = "debian"\n', "invalid TOML"),  # [image] twice
]


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_through_the_cli_one_line_and_exit_1(project: Project, tmp_path: Path) -> None:
    recipes = project.top / "tests"
    head = '[image]\nref = "debian:bookworm"\n'
    cases = [(head + body, words) for body, words in HOSTILE_CLI]
    for n, _base, raw in mutations(project, SEED + 1, 40):  # and some of the fuzz's own
        if n % 4 == 0:
            cases.append((raw.decode("utf-8", "surrogateescape"), ""))
    failed_at_load = 0
    for i, (text, words) in enumerate(cases):
        path = recipes / f"cli-{i}.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with deadline(CASE_TIMEOUT):
            code, out, err = cli("render", str(path))
        if code == 0 and not words:
            continue  # a mutation that is still a valid recipe
        assert code == 1 and out == "", (text, code, err)
        assert err.count("\n") == 1 and err.startswith(f"banger-build: error: {path}:"), err
        assert words in err, (words, err)
        try:
            load_recipe(path)
        except RecipeError:
            # `show` stops at the same line before any registry is asked
            failed_at_load += 1
            with deadline(CASE_TIMEOUT):
                code, out, show_err = cli("show", str(path), "--home", str(tmp_path))
            assert (code, out) == (1, "") and show_err == err
    assert failed_at_load >= 3
