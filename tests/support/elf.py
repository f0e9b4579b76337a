"""The smallest file that reads as an ELF executable for an architecture: a stand-in
guest agent (banger-build checks an agent's ELF machine against the image's)."""

from __future__ import annotations

import struct

MACHINES = {"amd64": 62, "arm64": 183}


def stub(arch: str = "amd64", tag: bytes = b"") -> bytes:
    """An ELF64 little-endian header (ET_EXEC, ``arch``'s e_machine), then ``tag``."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, MACHINES[arch], 1) + bytes(40) + tag
