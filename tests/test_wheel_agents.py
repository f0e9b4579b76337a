"""The guest agents as package data, and a pip-installed banger-build without them.

The project is built into a wheel by Debian's setuptools (no index, no build
isolation) from a copy of what a clone has: with the agents agents/build
made (agents/out), and without them (no compilers: the wheel still builds).
A fresh venv that pip-installed the wheel without agents builds
recipes/debian.toml, alone in a project (no agents/, no templates/), with no
tool on PATH (no gcc), against a registry serving the image and the agent
its agent_ref names. A recipe that wants the built-in agent (``[guest]``
without agent_ref) is refused by that installation in one line saying how to
get one, and built by one from the wheel with agents, with the amd64 agent
from its site-packages.
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

from tests.support.agent import AGENT_REFERENCE, agent_file
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


def project(top: Path, *, builtin_agent: bool = False) -> Path:
    """A project holding recipes/debian.toml and nothing else of the checkout
    (``builtin_agent``: without its agent_ref, so the built-in agent is wanted)."""
    (top / ".git").mkdir(parents=True)
    (top / "recipes").mkdir()
    text = (REPO / "recipes" / "debian.toml").read_text()
    line = f'agent_ref = "{AGENT_REFERENCE}"\n'
    assert line in text
    recipe = top / "recipes" / "debian.toml"
    recipe.write_text(text.replace(line, "") if builtin_agent else text)
    return recipe


def test_a_wheel_without_agents_builds_and_the_builtin_agent_is_refused(tmp_path: Path) -> None:
    whl = build_wheel(tmp_path / "src", tmp_path / "out", agents=False)
    names = zipfile.ZipFile(whl).namelist()
    assert not [n for n in names if n.startswith("banger_build/agents/")], names
    assert "banger_build/templates/guest/banger-vsock-agent.service.j2" in names
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    recipe = project(tmp_path / "project", builtin_agent=True)
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
    assert "guest.agent_ref" in line and "agents/build amd64" in line
    assert "guest.agents = false" in line


def install(top: Path, *, agents: bool) -> Path:
    """A fresh venv (Debian's python3) that pip-installed the wheel with the agents or
    without; its dependencies are copied from the project's .venv (no index)."""
    whl = build_wheel(top / "src", top / "out", agents=agents)
    names = zipfile.ZipFile(whl).namelist()
    for arch in AGENTS:
        assert (f"banger_build/agents/banger-vsock-agent-{arch}" in names) == agents
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


def agent_entry(store_path: Path) -> dict[str, str]:
    manifest = json.loads((store_path / "manifest.json").read_text())
    (entry,) = [
        f
        for f in manifest["derivation"]["files"]
        if f["dest"] == "/usr/local/bin/banger-vsock-agent"
    ]
    return dict(entry)


@pytest.mark.slow
def test_pip_install_without_agents_builds_the_debian_recipe_from_the_registry(
    debian_image_and_agent: DebianImage, tmp_path: Path
) -> None:
    venv = install(tmp_path / "wheel", agents=False)
    (package,) = venv.glob("lib/python3*/site-packages/banger_build")
    assert not list(package.glob("agents/*")), "the wheel has no agents"
    recipe = project(tmp_path / "project")
    assert not (tmp_path / "project" / "agents").exists()
    # no tool at all on PATH (no gcc): a build runs none
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [str(venv / "bin" / "banger-build"), str(recipe), "--no-link",
         "--mirror", debian_image_and_agent.mirror, "--home", str(tmp_path / "home")],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    agent = agent_file("amd64")
    assert agent_entry(path)["sha256"] == hashlib.sha256(agent.read_bytes()).hexdigest()
    lock = recipe.with_suffix(".lock").read_text()
    assert f'ref = "{AGENT_REFERENCE}"' in lock  # pinned: the next build needs no registry
    again = subprocess.run(
        [str(venv / "bin" / "banger-build"), str(recipe), "--no-link", "--offline",
         "--home", str(tmp_path / "home")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr


@pytest.mark.slow
def test_a_pip_installed_banger_build_builds_with_its_own_agent(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    installed = install(tmp_path / "wheel", agents=True)
    recipe = project(tmp_path / "project", builtin_agent=True)
    env = {"PATH": PATH, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [str(installed / "bin" / "banger-build"), str(recipe), "--no-link",
         "--mirror", debian_image.mirror, "--home", str(tmp_path / "home")],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    agent = agent_file("amd64")
    entry = agent_entry(Path(proc.stdout.strip()))
    assert entry["sha256"] == hashlib.sha256(agent.read_bytes()).hexdigest()
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "from banger_build import guest; print(guest.builtin_agent('linux/amd64', 'amd64'))"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed / "lib")), where  # site-packages, not a checkout
    assert where.endswith("site-packages/banger_build/agents/banger-vsock-agent-amd64")
