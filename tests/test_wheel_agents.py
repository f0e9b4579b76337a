"""The guest agents as package data: what a pip-installed banger-build uses.

The project is built into a wheel by Debian's setuptools (no index, no build
isolation) from a copy of what a clone has: with the agents agents/build
made (agents/out), and without them (no compilers: the wheel still builds).
With them, a fresh venv that pip-installed the wheel builds
recipes/debian.toml, alone in a project (no agents/, no templates/), with
the amd64 agent from its site-packages. Without them, the same recipe is
refused in one line saying how to get the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.debian import DebianImage
from tests.support.unpriv import PATH, SYSTEM_PYTHON, _copy_dependencies

REPO = Path(__file__).resolve().parents[1]
AGENTS = ("amd64", "arm64")


def build_wheel(src: Path, out: Path, *, agents: bool) -> Path:
    """A wheel of the project as a clone has it (agents/out with its README), with
    the built agents or without."""
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    for name in ("banger_build", "templates"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "agents" / "out").mkdir(parents=True)
    shutil.copy(REPO / "agents" / "out" / "README", src / "agents" / "out")
    if agents:
        for arch in AGENTS:
            shutil.copy2(
                REPO / "agents" / "out" / f"banger-vsock-agent-{arch}", src / "agents" / "out"
            )
    subprocess.run(
        ["/usr/bin/python3", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    (whl,) = out.glob("*.whl")
    return whl


def project(top: Path) -> Path:
    """A project holding recipes/debian.toml and nothing else of the checkout."""
    (top / ".git").mkdir(parents=True)
    (top / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "debian.toml", top / "recipes")
    return top / "recipes" / "debian.toml"


def test_a_wheel_without_agents_builds_and_the_recipe_says_how_to_get_one(tmp_path: Path) -> None:
    whl = build_wheel(tmp_path / "src", tmp_path / "out", agents=False)
    names = zipfile.ZipFile(whl).namelist()
    assert not [n for n in names if n.startswith("banger_build/agents/")], names
    assert "banger_build/templates/guest/banger-vsock-agent.service.j2" in names
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    recipe = project(tmp_path / "project")
    proc = subprocess.run(
        [sys.executable, "-m", "banger_build", str(recipe), "--offline", "--no-link",
         "--home", str(tmp_path / "home")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        env={"PATH": PATH, "PYTHONPATH": str(site), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, proc.stderr
    guest_line = recipe.read_text().splitlines().index("[guest]") + 1
    assert line.startswith(
        f"banger-build: error: {recipe}:{guest_line}:1: guest: no built-in guest agent for "
        f"linux/amd64 in this installation (looked in {site / 'banger_build' / 'agents'}"
    ), line
    assert "agents/build amd64" in line and "guest.agents = false" in line


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (Debian's python3) that pip-installed the wheel with the agents;
    its dependencies are copied from the project's .venv (no index)."""
    top = tmp_path_factory.mktemp("wheel")
    whl = build_wheel(top / "src", top / "out", agents=True)
    names = zipfile.ZipFile(whl).namelist()
    for arch in AGENTS:
        assert f"banger_build/agents/banger-vsock-agent-{arch}" in names
    venv = top / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True, timeout=300)
    assert _copy_dependencies(venv), "no .venv to take the dependencies from (scripts/setup)"
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-deps", "-q",
         str(whl)],
        check=True, capture_output=True, timeout=300,
        env={"PATH": PATH, "HOME": str(top), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    return venv


@pytest.mark.slow
def test_a_pip_installed_banger_build_builds_the_debian_recipe_with_its_own_agent(
    installed: Path, debian_image: DebianImage, tmp_path: Path
) -> None:
    recipe = project(tmp_path / "project")
    env = {"PATH": PATH, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [str(installed / "bin" / "banger-build"), str(recipe), "--no-link",
         "--mirror", debian_image.mirror, "--home", str(tmp_path / "home")],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((Path(proc.stdout.strip()) / "manifest.json").read_text())
    agent = REPO / "agents" / "out" / "banger-vsock-agent-amd64"
    (entry,) = [
        f
        for f in manifest["derivation"]["files"]
        if f["dest"] == "/usr/local/bin/banger-vsock-agent"
    ]
    assert entry["sha256"] == hashlib.sha256(agent.read_bytes()).hexdigest()
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "from banger_build import guest; print(guest.builtin_agent('linux/amd64', 'amd64'))"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed / "lib")), where  # site-packages, not a checkout
    assert where.endswith("site-packages/banger_build/agents/banger-vsock-agent-amd64")
