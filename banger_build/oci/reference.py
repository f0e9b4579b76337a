"""Small value types of the OCI world, validated at construction.

``Digest``, ``Reference`` and ``Platform`` are frozen; an invalid string never
becomes one. Reference parsing follows Docker's normalisation:
``debian:bookworm`` is ``docker.io/library/debian:bookworm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


class ReferenceSyntaxError(ValueError):
    """Raised for a malformed digest, reference or platform string."""


@dataclass(frozen=True, order=True)
class Digest:
    """A sha256 content digest, ``sha256:<64 lowercase hex>``."""

    hex: str

    def __post_init__(self) -> None:
        if not _HEX64.fullmatch(self.hex):
            raise ReferenceSyntaxError(f"invalid sha256 digest hex {self.hex!r}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        algo, sep, hexpart = text.partition(":")
        if sep != ":" or algo != "sha256":
            raise ReferenceSyntaxError(f"invalid digest {text!r} (expected sha256:<64 hex>)")
        return cls(hexpart)

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
            raise ReferenceSyntaxError(
                f"invalid platform {text!r} (expected os/arch or os/arch/variant)"
            )
        return cls(*parts)

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def matches(self, spec: dict[str, object]) -> bool:
        """Does an index entry's ``platform`` object select this platform?"""
        if spec.get("os") != self.os or spec.get("architecture") != self.architecture:
            return False
        if self.variant:
            return spec.get("variant") == self.variant
        return True


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry, repository, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        if not _HOST.fullmatch(self.registry):
            raise ReferenceSyntaxError(f"invalid registry host {self.registry!r}")
        for part in self.repository.split("/"):
            if not _REPO_COMPONENT.fullmatch(part):
                raise ReferenceSyntaxError(f"invalid repository name {self.repository!r}")
        if self.tag is not None and not _TAG.fullmatch(self.tag):
            raise ReferenceSyntaxError(f"invalid tag {self.tag!r}")
        if self.tag is None and self.digest is None:
            object.__setattr__(self, "tag", "latest")

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or text != text.strip():
            raise ReferenceSyntaxError(f"invalid image reference {text!r}")
        rest = text
        digest = None
        if "@" in rest:
            rest, _, dtext = rest.partition("@")
            digest = Digest.parse(dtext)
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, remainder
        else:
            registry, repository = DOCKER_HUB, rest
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        try:
            return cls(registry, repository, tag, digest)
        except ReferenceSyntaxError as exc:
            raise ReferenceSyntaxError(f"invalid image reference {text!r}: {exc}") from None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def default_image_name(self) -> str:
        """``docker.io/library/debian:bookworm`` -> ``debian-bookworm``."""
        base = self.repository.rsplit("/", 1)[-1]
        if self.tag is not None and self.tag != "latest":
            suffix = self.tag
        elif self.digest is not None:
            suffix = self.digest.short
        else:
            suffix = self.tag or "latest"
        name = f"{base}-{suffix}"
        return re.sub(r"[^A-Za-z0-9._+-]", "-", name)
