"""Small, real kernel-module ELF files for tests of the modules index generator.

``elf_module`` writes an ELF relocatable object with the sections kmod's depmod
reads of a module: ``.modinfo`` (NUL-separated ``key=value`` strings),
``.symtab``/``.strtab`` (each export as a defined ``__crc_<name>`` symbol and
the symbol itself, each need as an undefined global), ``__versions`` (one
64-byte entry per name given) and ``__ksymtab_strings`` when asked. 32- or
64-bit, little- or big-endian. ``module_tree`` lays several out as a
``lib/modules/<version>`` tree with its ``modules.order``.

The kernel would refuse to load these (no code, no ``.gnu.linkonce.this_module``);
depmod and ``banger_build.depmod`` read only the sections above.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

SHN_ABS = 0xFFF1
STB_GLOBAL, STB_WEAK = 1, 2


def _strtab(names: Iterable[bytes]) -> tuple[bytes, dict[bytes, int]]:
    data, where = bytearray(b"\0"), {b"": 0}
    for n in names:
        if n not in where:
            where[n] = len(data)
            data += n + b"\0"
    return bytes(data), where


def elf_module(
    modinfo: Sequence[str] = (),
    *,
    exports: Sequence[str] = (),
    needs: Sequence[str] = (),
    weak_needs: Sequence[str] = (),
    versions: Sequence[str] | None = None,
    ksymtab_strings: Sequence[str] | None = None,
    crc: bool = True,
    bits: int = 64,
    big_endian: bool = False,
) -> bytes:
    """A module's ELF bytes. ``crc=False`` leaves out the ``__crc_`` symbols (kmod
    then reads the exports from ``__ksymtab_strings``)."""
    e = ">" if big_endian else "<"
    sym64 = bits == 64
    symbols: list[tuple[bytes, int, int]] = []  # (name, info, shndx)
    for name in exports:
        if crc:
            symbols.append((b"__crc_" + name.encode(), STB_GLOBAL << 4, SHN_ABS))
        symbols.append((name.encode(), (STB_GLOBAL << 4) | 2, 1))  # a FUNC in .modinfo's place
    symbols += [(n.encode(), STB_GLOBAL << 4, 0) for n in needs]
    symbols += [(n.encode(), STB_WEAK << 4, 0) for n in weak_needs]
    strtab, offsets = _strtab(s[0] for s in symbols)
    symtab = bytearray(24 if sym64 else 16)  # entry 0: the null symbol
    for name, info, shndx in symbols:
        if sym64:
            symtab += struct.pack(f"{e}IBBHQQ", offsets[name], info, 0, shndx, 0, 0)
        else:
            symtab += struct.pack(f"{e}IIIBBH", offsets[name], 0, 0, info, 0, shndx)
    sections: list[tuple[bytes, int, bytes]] = [  # (name, type, data)
        (b".modinfo", 1, b"".join(s.encode() + b"\0" for s in modinfo)),
    ]
    if versions is not None:
        entries = b""
        for v in versions:
            fmt = f"{e}Q56s" if sym64 else f"{e}I60s"
            entries += struct.pack(fmt, 0x1234, v.encode())
        sections.append((b"__versions", 1, entries))
    if ksymtab_strings is not None:
        sections.append(
            (b"__ksymtab_strings", 1, b"".join(s.encode() + b"\0" for s in ksymtab_strings))
        )
    sections += [(b".symtab", 2, bytes(symtab)), (b".strtab", 3, strtab)]
    names, name_offsets = _strtab([*(s[0] for s in sections), b".shstrtab"])
    sections.append((b".shstrtab", 3, names))

    ehdr = 64 if sym64 else 52
    body = bytearray()
    placed = []
    for _, _, data in sections:
        placed.append(ehdr + len(body))
        body += data + b"\0" * (-len(data) % 8)
    shoff = ehdr + len(body)
    shdrs = bytearray(64 if sym64 else 40)  # section 0: SHN_UNDEF
    symtab_index = 1 + [s[0] for s in sections].index(b".symtab")
    for (name, kind, data), offset in zip(sections, placed, strict=True):
        link = symtab_index + 1 if kind == 2 else 0  # .symtab -> .strtab
        entsize = (24 if sym64 else 16) if kind == 2 else 0
        info = 1 if kind == 2 else 0  # .symtab: its first global symbol
        fields = (name_offsets[name], kind, 0, 0, offset, len(data), link, info)
        if sym64:
            shdrs += struct.pack(f"{e}IIQQQQIIQQ", *fields, 8, entsize)
        else:
            shdrs += struct.pack(f"{e}IIIIIIIIII", *fields, 4, entsize)
    ident = b"\x7fELF" + bytes((2 if sym64 else 1, 2 if big_endian else 1, 1, 0)) + bytes(8)
    rest = (1, 62 if sym64 else 3, 1, 0, 0, shoff, 0, ehdr, 0, 0, 64 if sym64 else 40)
    header = ident + struct.pack(f"{e}HHIQQQIHHHH" if sym64 else f"{e}HHIIIIIHHHH", *rest)
    header += struct.pack(f"{e}HH", len(sections) + 1, len(sections))  # shnum, shstrndx
    assert len(header) == ehdr
    return bytes(header + body + shdrs)


@dataclass
class Mod:
    """One module of a ``module_tree``: its path relative to the tree and its ELF bytes."""

    path: str
    modinfo: Sequence[str] = ()
    exports: Sequence[str] = ()
    needs: Sequence[str] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # more elf_module arguments

    def data(self) -> bytes:
        elf = elf_module(self.modinfo, exports=self.exports, needs=self.needs, **self.extra)
        if self.path.endswith(".xz"):
            return lzma.compress(elf, check=lzma.CHECK_CRC32)
        if self.path.endswith(".zst"):
            return zstandard.ZstdCompressor().compress(elf)
        if self.path.endswith(".gz"):
            return gzip.compress(elf, mtime=0)
        return elf


def uncompressed(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        path = path.removesuffix(suffix)
    return path


def module_tree(root: Path, mods: Sequence[Mod], *, order: Sequence[str] | None = None) -> Path:
    """Write ``mods`` under ``root`` (created) and a ``modules.order`` listing
    ``order`` (default: every module, in the order given, as modules.order names
    them: without the compression suffix)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kernel").mkdir(exist_ok=True)
    for m in mods:
        path = root / m.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(m.data())
    lines = order if order is not None else [uncompressed(m.path) for m in mods]
    (root / "modules.order").write_text("".join(f"{line}\n" for line in lines))
    return root


#: A module as the fake kernels of the tests ship it (vsock, exporting one symbol).
VSOCK_KO = elf_module(
    ["license=GPL", "name=vsock", "vermagic=6.1.0-test-amd64 SMP mod_unload"],
    exports=["vsock_core_register"],
)
