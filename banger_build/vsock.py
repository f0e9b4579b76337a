"""The VM's vsock: a free guest CID on the host's /dev/vhost-vsock, and a ping
of the guest agent (banger-vsock-agent answers "ping" with "pong").

``AgentPing`` runs in a thread while ``boot`` keeps reading the console: it
connects to the guest's CID and port, sends ``ping`` and wants ``pong``,
retrying (the agent may start after the login prompt, or its vsock module
may load late) until it gets the answer or is stopped.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

VSOCK_DEVICE = "/dev/vhost-vsock"
DEFAULT_PORT = 1024
RETRY_SECONDS = 1.0
CONNECT_SECONDS = 5.0


def vsock_cid(device: str = VSOCK_DEVICE, first: int = 3, tries: int = 64) -> int | None:
    """A guest CID free right now on a usable /dev/vhost-vsock, else None (no vsock)."""
    import fcntl
    import struct

    set_owner, set_cid = 0xAF01, 0x4008AF60  # VHOST_SET_OWNER, VHOST_VSOCK_SET_GUEST_CID
    for cid in range(first, first + tries):
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.ioctl(fd, set_owner)
            fcntl.ioctl(fd, set_cid, struct.pack("Q", cid))
            return cid
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None
        finally:
            os.close(fd)
    return None


def no_vsock_reason(device: str = VSOCK_DEVICE) -> str:
    """Why this host gives a VM no vsock (for the message of a skipped agent ping)."""
    if not os.path.exists(device):
        return f"this host has no {device} (load the vhost_vsock module)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not readable and writable by this user"
    return f"{device} refused a guest CID"


AF_VSOCK: int = getattr(socket, "AF_VSOCK", 40)
Address = tuple[int, int] | str  # (cid, port) for vsock; a path for AF_UNIX (the tests)


def ping_once(address: Address, family: int = AF_VSOCK, timeout: float | None = None) -> str:
    """One ping: the agent's answer line (without the newline); OSError if none."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_SECONDS if timeout is None else timeout)
        sock.connect(address)
        sock.sendall(b"ping\n")
        data = b""
        while b"\n" not in data and len(data) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


class AgentPing:
    """Ping the agent in a thread until it answers ``pong`` or ``stop()``."""

    def __init__(self, address: Address, family: int = AF_VSOCK) -> None:
        self.address, self.family = address, family
        self.answer: str | None = None  # "pong" once it answered
        self.last_error = "no attempt yet"
        self.attempts = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="agent-ping", daemon=True)
            self._thread.start()

    def where(self) -> str:
        if isinstance(self.address, tuple):
            return f"vsock cid {self.address[0]} port {self.address[1]}"
        return str(self.address)

    def elapsed(self) -> float:
        return time.monotonic() - self._started if self._thread is not None else 0.0

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            try:
                reply = ping_once(self.address, self.family)
            except OSError as exc:
                self.last_error = exc.strerror or str(exc) or type(exc).__name__
            else:
                if reply == "pong":
                    self.answer = reply
                    break
                self.last_error = f"answered {reply!r}"
            self._stop.wait(RETRY_SECONDS)
        self.seconds = self.elapsed()
