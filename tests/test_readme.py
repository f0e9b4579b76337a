"""The README works as written: its recipe reference is the one the schema generates,
it names no file the repository lacks, and every command line it shows runs.

The commands are those of its ```sh blocks (each line), ```console blocks (each
``$ `` line, whose stdout must be the lines after it, ``<word>`` standing for any
text) and ```python blocks (each block). They run in README order in one bash,
from a copy of the checkout (its tracked and new files, the built agent, .venv
linked), starting with ``./scripts/quickstart``; only the introduction's
example runs after the quick start, which is what makes it work. Exclusions
(``EXCLUDED``, ``FAST_ONLY_EXCLUDED``) carry their reasons.

The fast test runs the quick start against a small image (served by the quick
start's own registry in place of the debootstrapped Debian) and without a
kernel; the slow one runs it exactly as a user would, booting the real Debian.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.e2e import BASE, UPPER
from tests.support.oci import canonical, make_config, make_layer, sha256

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

#: commands never run here, and why
EXCLUDED = {
    "./scripts/test -m 'not slow'": "the test suite itself (this test is part of it)",
    "./scripts/test": "the test suite itself (this test is part of it)",
    ".venv/bin/mypy": "tests/test_lint.py runs it",
    ".venv/bin/ruff check .": "tests/test_lint.py runs it",
    "scripts/gen-reference": "rewrites README.md; tests/test_recipedoc.py checks what it "
    "would write",
}
#: commands only the slow test runs, and why the fast one cannot
FAST_ONLY_EXCLUDED = {
    "banger-build boot ./result --kernel .quickstart/kernel/vmlinuz --initrd "
    ".quickstart/kernel/initrd.img": "boots the real Debian "
    "with the kernel the quick start fetches; the fast quick start serves a small image "
    "without an init and fetches no kernel",
}


@dataclass(frozen=True)
class Command:
    text: str
    line: int  # in README.md
    kind: str  # sh, console or python
    expected: tuple[str, ...] | None = None  # console: the stdout shown


def commands(text: str) -> list[Command]:
    """Every command line of the README's sh, console and python blocks, in order."""
    found: list[Command] = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        kind, body = m.group(1), m.group(2)
        first = text.count("\n", 0, m.start(2)) + 1
        lines = body.splitlines()
        if kind == "sh":
            for i, line in enumerate(lines):
                command = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment
                if command and not command.startswith("#"):
                    found.append(Command(command, first + i, kind))
        elif kind == "console":
            i = 0
            while i < len(lines):
                assert lines[i].startswith("$ "), f"README.md:{first + i}: not a $ line"
                j = i + 1
                while j < len(lines) and not lines[j].startswith("$ "):
                    j += 1
                found.append(Command(lines[i][2:], first + i, kind, tuple(lines[i + 1 : j])))
                i = j
        elif kind == "python":
            found.append(Command(body, first, kind))
    return found


def test_every_block_is_sh_console_python_or_inert() -> None:
    kinds = re.findall(r"^```(\w*)$", README.read_text(), re.M)
    assert set(kinds[::2]) <= {"sh", "console", "python", "text", "toml"}, kinds
    assert kinds[1::2] == [""] * (len(kinds) // 2)  # every block is closed
    shown = {c.text for c in commands(README.read_text())}
    for excluded in (*EXCLUDED, *FAST_ONLY_EXCLUDED):
        assert excluded in shown, (
            f"an exclusion for a command the README no longer shows: {excluded}"
        )


# -- running it ------------------------------------------------------------------------


def small_layout(directory: Path) -> Path:
    """An OCI image layout of the small test image (tests/support/e2e.py)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256(data)  # "sha256:<hex>"
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layers = [make_layer(entries) for entries in (BASE, UPPER)]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": put(canonical(make_config(layers)), "application/vnd.oci.image.config.v1+json"),
        "layers": [put(b, "application/vnd.oci.image.layer.v1.tar+gzip") for b in layers],
    }
    desc = put(canonical(manifest), "application/vnd.oci.image.manifest.v1+json")
    (directory / "index.json").write_bytes(canonical({"schemaVersion": 2, "manifests": [desc]}))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return directory


def checkout_copy(dest: Path) -> Path:
    """The checkout as a clone has it (tracked and new files), plus what scripts/setup
    makes (.venv, linked; the agent), so the quick start skips setup."""
    check = subprocess.run(["bash", "scripts/setup", "--check"], cwd=REPO, check=False)
    assert check.returncode == 0, "run scripts/setup: .venv is not set up for this checkout"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith(".venv"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".git").mkdir()  # a project root, as a clone is
    os.symlink(REPO / ".venv", dest / ".venv")
    (dest / "agents" / "out").mkdir(parents=True, exist_ok=True)
    for agent in (REPO / "agents" / "out").glob("banger-vsock-agent-*"):
        shutil.copy2(agent, dest / "agents" / "out")
    return dest


def ordered(cmds: list[Command]) -> list[Command]:
    """README order, but the introduction's example (before "## Quick start") after the
    quick start's block: it shows what a build prints once the quick start ran."""
    quick = README.read_text().count("\n", 0, README.read_text().index("## Quick start")) + 1
    intro = [c for c in cmds if c.line < quick]
    rest = [c for c in cmds if c.line >= quick]
    env = next(i for i, c in enumerate(rest) if c.text == ". .quickstart/env")
    return [*rest[: env + 1], *intro, *rest[env + 1 :]]


def run_readme(tmp_path: Path, env: dict[str, str], skip: dict[str, str]) -> Path:
    copy = checkout_copy(tmp_path / "clone")
    logs = tmp_path / "logs"
    logs.mkdir()
    cmds = [c for c in ordered(commands(README.read_text())) if c.text not in skip]
    assert not [c for c in cmds if c.text in EXCLUDED], "an excluded command would run"
    script = ["cd " + str(copy)]
    for n, c in enumerate(cmds):
        body = c.text if c.kind != "python" else f".venv/bin/python - <<'PYTHON'\n{c.text}PYTHON"
        script.append(f"{{\n{body}\n}} >{logs}/{n}.out 2>{logs}/{n}.err </dev/null")
        script.append(f"echo $? >{logs}/{n}.rc")
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BANGER_BUILD_")},
        "PYTHONPATH": str(copy),  # the copy's code, whichever checkout .venv was made from
        **env,
    }
    subprocess.run(["bash", "-c", "\n".join(script)], env=full_env, timeout=3600, check=True)
    for n, c in enumerate(cmds):
        out = (logs / f"{n}.out").read_text()
        err = (logs / f"{n}.err").read_text()
        rc = int((logs / f"{n}.rc").read_text())
        where = f"README.md:{c.line}: {c.text[:200]}"
        assert rc == 0, f"{where}\nexit {rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        if c.expected is not None:
            pattern = "\n".join(
                ".+?".join(re.escape(p) for p in re.split(r"<[\w-]+>", line)) for line in c.expected
            )
            assert re.fullmatch(pattern, out.rstrip("\n")), f"{where}\n--- stdout\n{out}"
    return copy


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    env = {
        "BANGER_QUICKSTART_LAYOUT": str(small_layout(tmp_path / "layout")),
        "BANGER_QUICKSTART_KERNEL": "0",
    }
    copy = run_readme(tmp_path, env, {**EXCLUDED, **FAST_ONLY_EXCLUDED})
    assert (copy / "out" / "debian").resolve() == (copy / "result").resolve()
    assert (copy / "out" / "example-2").is_symlink()
    listed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "banger_build", "ls", "--json", "--home",
             str(copy / ".quickstart" / "home")],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(copy)},
        ).stdout
    )  # fmt: skip
    names = {p["name"] for p in listed}
    assert {"debian-bookworm", "debian-custom", "demo"} <= names


@pytest.mark.slow
def test_the_readme_runs_as_written_with_the_real_quick_start(tmp_path: Path) -> None:
    """The quick start as a user runs it (the debootstrapped Debian and the kernel
    come from their caches), then every command, the boot included."""
    run_readme(tmp_path, {}, EXCLUDED)
