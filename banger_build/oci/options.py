"""Registry options: mirrors, insecure hosts, timeouts, retries; from CLI arguments and env.

Pure data and validation, no network (``transport`` and ``remote`` use them).
Plain HTTP is allowed only to loopback hosts and hosts listed as insecure.
Credentials never belong in a mirror URL and never appear in messages.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from banger_build.errors import InputError, Reason
from banger_build.oci.reference import DOCKER_HUB

ENV_MIRRORS = "BANGER_BUILD_MIRRORS"
ENV_INSECURE = "BANGER_BUILD_INSECURE_REGISTRIES"


@dataclass(frozen=True)
class RegistryOptions:
    #: registry host -> base URLs tried before it, e.g. {"docker.io": ("http://127.0.0.1:5000",)}
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    #: hosts (``host`` or ``host:port``) where plain HTTP is allowed besides loopback
    insecure: frozenset[str] = frozenset()
    #: seconds to wait for a connection's next bytes (response headers included)
    timeout: float = 30.0
    #: retries of one request, all causes together (refused or reset connection,
    #: 429/5xx, a stalled or cut transfer, its token request): one total bound
    retries: int = 3
    #: a transfer slower than ``low_speed`` bytes/s for ``low_speed_time`` seconds is
    #: abandoned as stalled (curl's --speed-limit / --speed-time); a registry that
    #: trickles a byte every few seconds fails in about ``low_speed_time``
    low_speed: int = 1024
    low_speed_time: float = 30.0
    docker_config: Path | None = None
    #: no network at all: what the blob cache lacks is an error naming it (``--offline``)
    offline: bool = False
    #: pull only from the mirrors of a registry, never from the registry itself
    #: (``--mirror-only``): a host without a mirror is an error
    mirror_only: bool = False


_HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


def canonical_host(host: str) -> str:
    """Lower-cased ``host[:port]``; Docker Hub's other names become ``docker.io``."""
    host = host.strip().lower()
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


def redact_url(text: str) -> str:
    """``text`` with any ``//user:password@`` replaced by ``//***@``."""
    return re.sub(r"//[^/@\s]*@", "//***@", text)


def _check_mirror_url(url: str, spec: str) -> str:
    parts = urllib.parse.urlsplit(url)
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "the URL must start with http:// or https://"
    elif not parts.hostname:
        problem = "the URL has no host"
    elif parts.username is not None or parts.password is not None:
        problem = "credentials do not belong in a mirror URL (use the Docker config file)"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "a mirror URL is scheme://host[:port], without a path"
    else:
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            problem = "the URL has an invalid port"
    if problem:
        raise InputError(
            f"invalid mirror {redact_url(spec)!r}: {problem}", reason=Reason.MIRROR_INVALID
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


def parse_mirrors(specs: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``["docker.io=http://127.0.0.1:5000", ...]`` -> ``{"docker.io": ("http://...",)}``.

    Several specs for one host keep their order. Invalid specs raise
    InputError (reason ``mirror-invalid``).
    """
    mirrors: dict[str, list[str]] = {}
    for raw in specs:
        spec = raw.strip()
        if not spec:
            continue
        host, sep, url = spec.partition("=")
        host = host.strip()
        if not sep or not host or not url.strip():
            raise InputError(
                f"invalid mirror {redact_url(spec)!r}: expected REGISTRY=URL, "
                "e.g. docker.io=http://127.0.0.1:5000",
                reason=Reason.MIRROR_INVALID,
            )
        if not _HOST_RE.fullmatch(host):
            raise InputError(
                f"invalid mirror {redact_url(spec)!r}: {host!r} is not a registry host",
                reason=Reason.MIRROR_INVALID,
            )
        base = _check_mirror_url(url.strip(), spec)
        urls = mirrors.setdefault(canonical_host(host), [])
        if base not in urls:
            urls.append(base)
    return {host: tuple(urls) for host, urls in mirrors.items()}


def _split_env(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def options_from_env(
    mirror_args: Iterable[str] = (),
    insecure_args: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
) -> RegistryOptions:
    """Options from CLI arguments plus ``$BANGER_BUILD_MIRRORS`` and
    ``$BANGER_BUILD_INSECURE_REGISTRIES`` (comma-separated). CLI mirrors are
    tried before the environment's."""
    env = os.environ if environ is None else environ
    mirrors = parse_mirrors([*mirror_args, *_split_env(env.get(ENV_MIRRORS))])
    insecure = set()
    for host in [*insecure_args, *_split_env(env.get(ENV_INSECURE))]:
        host = host.strip()
        if "://" in host:
            host = urllib.parse.urlsplit(host).netloc
        if not _HOST_RE.fullmatch(host):
            raise InputError(
                f"invalid insecure registry {host!r}: expected HOST or HOST:PORT",
                reason=Reason.INSECURE_INVALID,
            )
        insecure.add(canonical_host(host))
    return RegistryOptions(mirrors=mirrors, insecure=frozenset(insecure))


def _host_only(netloc: str) -> str:
    if netloc.startswith("["):
        return netloc[1 : netloc.index("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def is_loopback(netloc: str) -> bool:
    host = _host_only(netloc).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_allowed(netloc: str, insecure: frozenset[str]) -> bool:
    netloc = netloc.lower()
    return is_loopback(netloc) or netloc in insecure or _host_only(netloc) in insecure
