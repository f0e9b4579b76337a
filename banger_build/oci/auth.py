"""Registry authentication state: credentials, challenges and per-scope tokens.

Credentials come from the Docker config file (``auths`` entries, then
``credHelpers``, then ``credsStore``), loaded on first need. A 401's
``WWW-Authenticate`` challenge is answered with Basic credentials or a bearer
token; tokens are cached per ``(realm, service, scope)`` and bound per
``(endpoint, repository, pull|push)``, so a second repository or a push
after a pull gets its own token instead of a 401.

This module decides what to send; ``transport`` sends it (the token request
itself is a ``TokenFetcher`` the transport passes in). No network here.
Failures raise ``AuthError`` (a ``failure.Failure``); credentials and tokens
never appear in messages or reprs.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import Reason, ToolError
from banger_build.oci.failure import Failure
from banger_build.oci.options import RegistryOptions, canonical_host, plain_http_allowed
from banger_build.oci.reference import DOCKER_HUB
from banger_build.run import run

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

ScopeKey = tuple[str, str]  # (repository, "pull" | "push")


class AuthError(Failure):
    """An authentication failure (the Docker config, a token, the realm)."""

    def __init__(
        self, message: str, *, reason: Reason = Reason.AUTH, status: int | None = None
    ) -> None:
        super().__init__(message, reason=reason, status=status)


# -- credentials -----------------------------------------------------------------


class Credentials:
    """A username and password. Never printed."""

    __slots__ = ("_password", "username")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    def __repr__(self) -> str:
        return "<credentials redacted>"

    __str__ = __repr__

    def basic(self) -> str:
        raw = f"{self.username}:{self._password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _config_key_host(key: str) -> str:
    """A Docker config ``auths`` key (host, URL) -> canonical host[:port]."""
    key = urllib.parse.urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    return canonical_host(key)


def _host_aliases(host: str) -> list[str]:
    names = [host]
    if "localhost" in host:
        names.append(host.replace("localhost", "127.0.0.1"))
    elif "127.0.0.1" in host:
        names.append(host.replace("127.0.0.1", "localhost"))
    return names


def docker_config_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit / "config.json" if explicit.is_dir() else explicit
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


class CredentialStore:
    """Credentials from a Docker config file, loaded on first need."""

    def __init__(self, path: Path | None) -> None:
        self._explicit = path
        self._loaded = False
        self._auths: dict[str, Credentials] = {}
        self._helpers: dict[str, str] = {}
        self._store: str | None = None
        self._cache: dict[str, Credentials | None] = {}

    def __repr__(self) -> str:
        return "<credential store>"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = docker_config_path(self._explicit)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if self._explicit is not None:
                raise AuthError(f"Docker config {path} does not exist") from None
            return
        except OSError as exc:
            raise AuthError(f"cannot read Docker config {path}: {exc.strerror}") from None
        try:
            config = json.loads(raw)
        except ValueError:
            raise AuthError(f"Docker config {path} is not valid JSON") from None
        if not isinstance(config, dict):
            raise AuthError(f"Docker config {path} is not a JSON object")
        auths = config.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                creds = self._entry(entry)
                if creds is not None:
                    self._auths.setdefault(_config_key_host(str(key)), creds)
        helpers = config.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if isinstance(helper, str) and helper:
                    self._helpers[_config_key_host(str(key))] = helper
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            self._store = store

    @staticmethod
    def _entry(entry: object) -> Credentials | None:
        if not isinstance(entry, dict):
            return None
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                text = base64.b64decode(auth, validate=False).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            name, sep, secret = text.partition(":")
            return Credentials(name, secret) if sep and name else None
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and user and isinstance(password, str):
            return Credentials(user, password)
        return None

    @staticmethod
    def _from_helper(helper: str, host: str) -> Credentials | None:
        server = DOCKER_HUB_CONFIG_KEY if host == DOCKER_HUB else host
        try:
            # the helper may need the user's environment (keyrings, D-Bus): pass it on
            proc = run([f"docker-credential-{helper}", "get"], input=server.encode(),
                       env=os.environ, check=False, timeout=30)  # fmt: skip
            if proc.returncode != 0:
                return None
            data = json.loads(proc.stdout)
        except (ToolError, ValueError):
            return None
        if isinstance(data, dict):
            user, secret = data.get("Username"), data.get("Secret")
            if isinstance(user, str) and user and isinstance(secret, str):
                return Credentials(user, secret)
        return None

    def get(self, host: str) -> Credentials | None:
        host = canonical_host(host)
        if host in self._cache:
            return self._cache[host]
        self._load()
        found: Credentials | None = None
        for name in _host_aliases(host):
            if name in self._auths:
                found = self._auths[name]
                break
            helper = self._helpers.get(name)
            if helper:
                found = self._from_helper(helper, name)
                if found:
                    break
        if found is None and self._store:
            found = self._from_helper(self._store, host)
        self._cache[host] = found
        return found


# -- challenges and tokens ---------------------------------------------------------

_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for key, value in _PARAM_RE.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return scheme.lower(), params


def normalise_scope(scope: str) -> str:
    """Sort the actions of each scope: distribution says ``push,pull`` or
    ``pull,push`` at random (Go map order); both must hit one cached token."""
    out = []
    for item in scope.split():
        resource, sep, actions = item.rpartition(":")
        if sep and resource.count(":") >= 1:
            item = f"{resource}:{','.join(sorted(set(actions.split(','))))}"
        out.append(item)
    return " ".join(out)


@dataclass
class Token:
    value: str
    expires: float  # time.monotonic()

    def __repr__(self) -> str:
        return "<token redacted>"

    @classmethod
    def from_response(cls, data: object, service_host: str) -> Token:
        """The token in a token service's JSON answer (``token`` or ``access_token``)."""
        if not isinstance(data, dict):
            data = {}
        value = data.get("token") or data.get("access_token")
        if not isinstance(value, str) or not value:
            raise AuthError(f"token service {service_host} sent no token")
        expires_in = data.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) else 60.0
        return cls(value, time.monotonic() + max(lifetime, 60.0) - 10.0)


#: (realm, service, scope, credentials or None) -> a fresh token; sends the request
TokenFetcher = Callable[[str, str, str, Credentials | None], Token]


class Auth:
    """Authentication state shared by every endpoint of one client."""

    def __init__(self, options: RegistryOptions) -> None:
        self.options = options
        self.creds = CredentialStore(options.docker_config)
        # (realm, service, scope) -> token
        self.tokens: dict[tuple[str, str, str], Token] = {}
        # (netloc, repository, action) -> token key
        self.bound: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        self.basic_hosts: set[str] = set()

    def __repr__(self) -> str:
        return "<registry auth state>"

    def authorization(self, netloc: str, cred_host: str, scope: ScopeKey | None) -> str | None:
        """The Authorization header to send to ``netloc`` for ``scope``, if any."""
        if scope is not None:
            key = self.bound.get((netloc, *scope))
            if key is not None:
                token = self.tokens.get(key)
                if token is not None and token.expires > time.monotonic():
                    return "Bearer " + token.value
        if netloc in self.basic_hosts:
            creds = self.creds.get(cred_host)
            if creds is not None:
                return creds.basic()
        return None

    def answer(
        self,
        challenge: str,
        netloc: str,
        cred_host: str,
        scope: ScopeKey | None,
        sent: str | None,
        fetch_token: TokenFetcher,
    ) -> bool:
        """Handle a 401's ``WWW-Authenticate`` header: True if the request should
        be retried with new credentials."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if netloc in self.basic_hosts or self.creds.get(cred_host) is None:
                return False
            self.basic_hosts.add(netloc)
            return True
        if scheme != "bearer" or not params.get("realm"):
            return False
        realm = params["realm"]
        service = params.get("service", "")
        wanted = normalise_scope(params.get("scope", ""))
        if not wanted and scope is not None:
            repo, action = scope
            wanted = f"repository:{repo}:{'pull' if action == 'pull' else 'pull,push'}"
        key = (realm, service, wanted)
        token = self.tokens.get(key)
        refused = token is not None and sent == "Bearer " + token.value
        if token is None or refused or token.expires <= time.monotonic():
            self._check_realm(realm)
            token = fetch_token(realm, service, wanted, self.creds.get(cred_host))
            self.tokens[key] = token
        if scope is not None:
            self.bound[(netloc, *scope)] = key
        # The same token again would be refused again.
        return sent != "Bearer " + token.value

    def _check_realm(self, realm: str) -> None:
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"the registry named an invalid token realm {realm!r}")
        if parts.scheme == "http" and not plain_http_allowed(parts.netloc, self.options.insecure):
            raise AuthError(
                f"refusing to fetch a token over plain HTTP from {parts.netloc} "
                f"(add it to the insecure registries to allow this)",
                reason=Reason.INSECURE,
            )
