"""The guest agents in the test registry, where recipes/debian.toml takes its agent from.

recipes/debian.toml names its agent ``docker.io/library/banger-vsock-agent:1``
(``[guest] agent_ref``), served, like its image, by a registry given as
``--mirror docker.io=URL``. ``push_agents(registry_host)`` publishes the agents
``agents/build`` made (agents/out) there with ``banger-build file push
--platform``: one image index, an entry per architecture, tagged
``library/banger-vsock-agent:1``. The quick start does the same.

Fixtures (session): ``guest_agents`` pushes them to the session ``registry``;
``debian_image_and_agent`` is ``debian_image`` (tests/support/debian.py) with
them pushed beside it, for the tests that build recipes/debian.toml.
A missing agents/out binary fails the test saying how to build it.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENTS = REPO_ROOT / "agents" / "out"
ARCHES = ("amd64", "arm64")
AGENT_REPO, AGENT_TAG = "library/banger-vsock-agent", "1"
#: what recipes/debian.toml names: ``--mirror docker.io=<registry>`` serves it
AGENT_REFERENCE = f"docker.io/{AGENT_REPO}:{AGENT_TAG}"


@dataclass(frozen=True)
class GuestAgents:
    registry: Any  # tests.support.registry's server object (.url, .host)
    index: str  # the index digest, "sha256:..."
    files: dict[str, Path]  # arch -> the agents/out binary pushed for linux/<arch>
    reference: str = AGENT_REFERENCE


def agent_file(arch: str, agents: Path = AGENTS) -> Path:
    path = agents / f"banger-vsock-agent-{arch}"
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: build the guest agents with agents/build (scripts/setup "
            "installs the compilers)",
            pytrace=False,
        )
    return path


def push_agents(registry_host: str, agents: Path = AGENTS) -> str:
    """``banger-build file push`` of each architecture's agent to ``registry_host``'s
    ``library/banger-vsock-agent:1`` index; returns the index digest."""
    from banger_build.cli import main

    target = f"{registry_host}/{AGENT_REPO}:{AGENT_TAG}"
    printed = ""
    with tempfile.TemporaryDirectory(prefix="banger-agent-push-") as home:
        for arch in ARCHES:
            out, err = io.StringIO(), io.StringIO()
            args = ["file", "push", target, str(agent_file(arch, agents)),
                    "--name", "banger-vsock-agent", "--platform", f"linux/{arch}",
                    "--home", home]  # fmt: skip
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
            assert code == 0, err.getvalue()
            printed = out.getvalue().strip()
    ref, _, digest = printed.partition("@")
    assert ref == target and digest.startswith("sha256:"), printed
    return digest


@pytest.fixture(scope="session")
def guest_agents(registry: Any) -> GuestAgents:
    """The agents of agents/out, pushed to the session registry."""
    digest = push_agents(registry.host)
    return GuestAgents(registry, digest, {arch: agent_file(arch) for arch in ARCHES})


@pytest.fixture(scope="session")
def debian_image_and_agent(debian_image: Any, guest_agents: GuestAgents) -> Any:
    """``debian_image``, its registry also serving recipes/debian.toml's agent."""
    assert guest_agents.registry is debian_image.registry
    return debian_image
