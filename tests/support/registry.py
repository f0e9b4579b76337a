"""Real OCI registries for tests: Debian's ``docker-registry`` (distribution 2.8).

``RegistryServer`` runs ``/usr/bin/docker-registry serve <config.yml>`` with
filesystem storage in a temp dir on ``127.0.0.1:<free port>`` and waits until
``/v2/`` answers (typically well under a second). Three modes:

* ``anonymous``: no auth;
* ``basic``: htpasswd with a bcrypt hash (distribution accepts nothing else);
* ``token``: bearer tokens from ``TokenServer``, a small local token service
  in a thread that signs RS256 JWTs with a throwaway key. Its self-signed
  certificate travels in the JWT's ``x5c`` header and is trusted through the
  registry's ``auth.token.rootcertbundle``. Each token's ``access`` claim
  grants exactly the scope(s) requested, and every request is recorded in
  ``TokenServer.requests`` so tests can assert that a client asked for one
  token per scope.

Fixtures:

* ``registry`` (session): anonymous, shared. Do not stop it.
* ``registry_factory`` (function): ``registry_factory(mode="anonymous")``
  starts a private server, stopped at the end of the test (use it for tests
  that stop or tamper with a registry).
* ``basic_registry``, ``token_registry`` (function): with ``username`` and
  ``password`` attributes.

``RegistryServer(access_log=True)`` keeps the registry's access log;
``accesses()`` parses it into ``Access(method, path, status, size)``, one per
request answered so far (``size``: the body bytes sent; a benchmark's count of
what a client downloaded).

``write_docker_config(dir, {host: (user, password)})`` writes a Docker
``config.json`` and returns its path.

A missing ``docker-registry`` (Debian package ``docker-registry``) or a
missing bcrypt implementation fails the test with a clear message; nothing
here skips.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest
import requests

REGISTRY_BIN = os.environ.get("BANGER_TEST_REGISTRY_BIN", "/usr/bin/docker-registry")
SERVICE = "banger-test-registry"
ISSUER = "banger-test-token-issuer"
USERNAME = "tester"
PASSWORD = "s3cret-Pa55word-never-printed"
READY_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------- htpasswd


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash ($2b$/$2y$), which distribution's htpasswd requires.

    Uses the C library's crypt() (libxcrypt on Debian 12 supports bcrypt),
    else the ``bcrypt`` pip package.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # deprecated in 3.11, removed in 3.13

        if crypt.METHOD_BLOWFISH in crypt.methods:
            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
            if hashed and hashed.startswith("$2"):
                return hashed
    except ImportError:
        pass
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail(
            "no bcrypt implementation for the htpasswd file: this Python's crypt module "
            "lacks bcrypt; install the pip package 'bcrypt'",
            pytrace=False,
        )
    return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())


# ------------------------------------------------------------------ token server


@dataclass
class TokenRequest:
    service: str | None
    scopes: tuple[str, ...]
    username: str | None  # None: anonymous
    granted: bool


class _TokenKey:
    """An RSA key and a self-signed CA certificate for signing JWTs."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "banger test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_der = self.cert.public_bytes(serialization.Encoding.DER)

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)


class TokenServer:
    """A minimal Docker token service (https://distribution.github.io/distribution/spec/auth/token/).

    ``GET /token?service=..&scope=..`` with Basic credentials returns a JWT
    granting exactly the requested scopes. Without credentials it grants
    pull-only scopes if ``anonymous_pull`` is set, else answers 401; wrong
    credentials always get 401.
    """

    def __init__(
        self,
        username: str = USERNAME,
        password: str = PASSWORD,
        *,
        anonymous_pull: bool = False,
        expires_in: int = 300,
    ) -> None:
        self.username = username
        self.password = password
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.key = _TokenKey()
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def scopes(self) -> list[str]:
        """Every scope a granted token was asked for, in order."""
        with self._lock:
            return [s for r in self.requests if r.granted for s in r.scopes]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status == 401:
            h.send_header("WWW-Authenticate", 'Basic realm="token"')
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        if url.path != "/token":
            self._reply(h, 404, {"error": "not found"})
            return
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [None])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        user: str | None = None
        ok = True
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, pw = "", ""
            ok = secrets.compare_digest(user, self.username) and secrets.compare_digest(
                pw, self.password
            )
        else:
            ok = self.anonymous_pull and all(s.endswith(":pull") for s in scopes)
        with self._lock:
            self.requests.append(TokenRequest(service, scopes, user, ok))
        if not ok:
            self._reply(
                h, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
            )
            return
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": service or SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = self.key.sign_jwt(claims)
        issued = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat()
        self._reply(
            h,
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued,
            },
        )


# ---------------------------------------------------------------- the registry

#: one line of distribution's access log (Apache combined format)
_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) ')


@dataclass(frozen=True)
class Access:
    """One request the registry answered, from its access log."""

    method: str
    path: str
    status: int
    size: int  # bytes of the body sent (0 for HEAD, whatever the log says)


class RegistryServer:
    """A running ``docker-registry``. Use as a context manager or call start/stop."""

    def __init__(
        self,
        mode: str = "anonymous",
        *,
        username: str = USERNAME,
        password: str = PASSWORD,
        anonymous_pull: bool = False,
        bind: str = "127.0.0.1",
        access_log: bool = False,
    ) -> None:
        if mode not in ("anonymous", "basic", "token"):
            raise ValueError(f"unknown registry mode {mode!r}")
        self.mode = mode
        self.username = username
        self.password = password
        self.bind = bind
        self.access_log = access_log
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="banger-test-registry-"))
        self.storage = self.workdir / "storage"
        self.token_server: TokenServer | None = (
            TokenServer(username, password, anonymous_pull=anonymous_pull)
            if mode == "token"
            else None
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.workdir / "registry.log"

    # -- addresses
    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        return f"RegistryServer({self.mode}, {self.url})"

    # -- storage on disk (for tampering tests)
    def blob_data_path(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return (
            self.storage
            / "docker"
            / "registry"
            / "v2"
            / "blobs"
            / "sha256"
            / hexpart[:2]
            / hexpart
            / "data"
        )

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": not self.access_log}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.mode == "basic":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{self.username}:{bcrypt_hash(self.password)}\n")
            config["auth"] = {"htpasswd": {"realm": "banger-test", "path": str(htpasswd)}}
        elif self.mode == "token":
            assert self.token_server is not None
            bundle = self.workdir / "token-ca.pem"
            bundle.write_bytes(self.token_server.key.cert_pem)
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(bundle),
                }
            }
        return config

    def start(self) -> Self:
        if not (os.path.isfile(REGISTRY_BIN) and os.access(REGISTRY_BIN, os.X_OK)):
            pytest.fail(
                f"{REGISTRY_BIN} not found: install the Debian package docker-registry "
                "(apt-get install docker-registry)",
                pytrace=False,
            )
        if self.token_server is not None:
            self.token_server.start()
        last_error = ""
        for _ in range(5):  # a free port can be taken between probe and bind
            self.port = free_port(self.bind)
            config_path = self.workdir / "config.yml"
            # JSON is YAML: no YAML library needed.
            config_path.write_text(json.dumps(self._config(), indent=2))
            with open(self._log, "wb") as log:
                self._proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={"PATH": "/usr/bin:/bin", "HOME": str(self.workdir)},
                )
            last_error = self._wait_ready()
            if not last_error:
                return self
            self._kill()
        self.stop()
        pytest.fail(f"docker-registry did not start: {last_error}", pytrace=False)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with {self._proc.returncode}: {self.log_text()[-2000:]}"
            try:
                r = requests.get(f"{self.url}/v2/", timeout=1)
                if r.status_code in (200, 401):
                    return ""
            except requests.RequestException:
                pass
            time.sleep(0.02)
        return f"not ready after {READY_TIMEOUT}s: {self.log_text()[-2000:]}"

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    def accesses(self) -> list[Access]:
        """The requests answered so far (needs ``access_log=True``)."""
        found = []
        for line in self.log_text().splitlines():
            m = _ACCESS.match(line)
            if m:
                method, path, status, size = m.groups()
                body = 0 if method == "HEAD" or size == "-" else int(size)
                found.append(Access(method, path, int(status), body))
        return found

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Stop the registry (its storage stays until ``cleanup``)."""
        self._kill()
        if self.token_server is not None:
            self.token_server.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# ------------------------------------------------------------------ docker config


def write_docker_config(
    directory: Path, credentials: dict[str, tuple[str, str]], *, inline_auth: bool = True
) -> Path:
    """Write ``directory/config.json`` with ``auths`` for each host; return its path.

    ``inline_auth`` writes the base64 ``auth`` field, else ``username`` and
    ``password`` fields.
    """
    auths: dict[str, dict[str, str]] = {}
    for host, (user, password) in credentials.items():
        if inline_auth:
            auths[host] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        else:
            auths[host] = {"username": user, "password": password}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}, indent=2))
    path.chmod(0o600)
    return path


def registry_fingerprint(server: RegistryServer) -> str:
    """A short stable id of a server, for naming repositories uniquely per server."""
    return hashlib.sha256(server.url.encode()).hexdigest()[:8]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """The shared anonymous registry. Tests must not stop or tamper with it."""
    with RegistryServer("anonymous") as server:
        yield server


@dataclass
class _Factory:
    servers: list[RegistryServer] = field(default_factory=list)

    def __call__(self, mode: str = "anonymous", **kwargs: Any) -> RegistryServer:
        server = RegistryServer(mode, **kwargs)
        self.servers.append(server)
        return server.start()


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., RegistryServer]]:
    """``registry_factory(mode="anonymous"|"basic"|"token", **kw)``: a private registry."""
    factory = _Factory()
    yield factory
    for server in factory.servers:
        server.cleanup()


@pytest.fixture
def basic_registry() -> Iterator[RegistryServer]:
    with RegistryServer("basic") as server:
        yield server


@pytest.fixture
def token_registry() -> Iterator[RegistryServer]:
    with RegistryServer("token") as server:
        yield server
