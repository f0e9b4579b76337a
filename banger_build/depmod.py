"""``modules.dep`` and the indexes modprobe reads, generated from a modules tree.

``generate(tree)`` returns the files kmod's ``depmod -b ROOT VERSION`` (kmod 30,
Debian 12's, with no depmod.d configuration) writes into a
``lib/modules/<version>`` tree, computed here from the module files alone: the
bytes depend on the modules and on nothing of the build host, so the store key
holds them through the modules' digests (running the host's depmod would make
its version a hidden input).

libkmod (modprobe, systemd-modules-load, udev) looks modules up in the binary
indexes only: ``lookup_file`` and ``kmod_lookup_alias_from_alias_bin`` in its
``libkmod.c`` open ``<name>.bin`` and find nothing without it, and
``kmod_load_resources`` gives up on all of them when one (but
``modules.builtin.alias.bin``) is missing. The text
files are for people, but ``modules.softdep`` and ``modules.weakdep``, which
it reads as configuration. Every one is written:

    modules.dep, .bin          a module's path, then every module it needs, transitively
    modules.alias, .bin        the ``alias=`` of each module's ``.modinfo``
    modules.softdep            ``softdep=``
    modules.weakdep            ``weakdep=`` (kmod 33 and later read it)
    modules.symbols, .bin      ``symbol:NAME``: the module exporting NAME (symbol_request)
    modules.builtin.bin        the modules of the tree's ``modules.builtin``
    modules.builtin.alias.bin  the aliases of the tree's ``modules.builtin.modinfo``
    modules.devname            device nodes whose opening loads a module (static-nodes)

As depmod (``tools/depmod.c``, ``libkmod/libkmod-elf.c``):

* A module is a regular file named ``*.ko``, ``*.ko.xz``, ``*.ko.zst`` or
  ``*.ko.gz``, not under ``build`` or ``source``; its name is its file name up to
  the first dot, ``-`` as ``_``. Of two modules of one name the one under
  ``updates/`` wins (depmod's default search). Unlike depmod: symlinks are not
  followed, two modules of one name elsewhere are refused (depmod keeps
  whichever its readdir meets first), and a file that is not ELF is refused.
* A tree without ``modules.builtin`` (or ``.modinfo``) gets an empty index (depmod
  writes an empty file, which libkmod's ``index_mm_open`` refuses, and
  ``kmod_load_resources`` then drops every index).
* Order: the modules ``modules.order`` lists, in its order (a line listed twice
  counts where it first comes, as in kmod 33), then the others by path (depmod
  leaves those in its hash table's order). A module's index priority is its place.
* A module needs the module exporting each symbol its ``.symtab`` leaves
  undefined, and each ``__versions`` entry the symtab does not name; its exports
  are the ``__crc_`` symbols of its ``.symtab``, or the names in
  ``__ksymtab_strings`` when it has none. A symbol exported twice belongs to the
  later module.
* The modules are sorted topologically, users before what they use, by depmod's
  stack of modules no unsorted module uses; a module's line lists everything it
  needs in that order (modprobe loads them last first). A cycle is refused.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from banger_build.errors import InputError, Reason
from banger_build.kmodules import MODULE_SUFFIXES, ORDER, read_module
from banger_build.modindex import Index, IndexFormatError
from banger_build.sources import SourceRefused, read_regular

#: Bump when ``generate`` would write other bytes for the same modules: the
#: derivation of an image that installs modules holds it.
FORMAT = 1
#: Bytes of one module, decompressed: the largest in-tree modules are tens of MiB
#: (amdgpu), out-of-tree ones (nvidia) below 128 MiB.
MAX_MODULE_SIZE = 256 << 20
#: Bytes of modules.order, modules.builtin or modules.builtin.modinfo (tens of KiB).
MAX_LIST_SIZE = 16 << 20
BUILTIN = "modules.builtin"
BUILTIN_MODINFO = "modules.builtin.modinfo"
#: What ``generate`` writes; a tree's own files of these names are replaced.
GENERATED = (
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.weakdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
)
_SKIPPED = ("build", "source")  # depmod's: links to the kernel's headers and sources
_UPDATES = b"updates/"
_EM_SPARC, _EM_SPARCV9, _STT_REGISTER = 2, 43, 13


def _invalid(message: str) -> InputError:
    return InputError(message, reason=Reason.INVALID_MODULES)


# -- ELF -----------------------------------------------------------------------------


def _cstr(data: bytes, pos: int) -> bytes:
    end = data.find(b"\0", pos)
    return data[pos:] if end < 0 else data[pos:end]


def _strings(section: bytes) -> list[bytes]:
    """The NUL-separated strings of a section, as kmod splits them."""
    section = section.lstrip(b"\0")
    if len(section) <= 1:  # kmod: nothing past the padding but one byte
        return []
    return [s for s in section.split(b"\0") if s]


class _Elf:
    """The sections of a module kmod reads, checked as kmod checks them."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        if len(data) <= 16 or data[:4] != b"\x7fELF" or data[4] not in (1, 2):
            raise _invalid(f"{what}: not an ELF kernel module")
        self.is64 = data[4] == 2
        if data[5] not in (1, 2) or len(data) <= (64 if self.is64 else 52):
            raise _invalid(f"{what}: not an ELF kernel module")
        self.end = "<" if data[5] == 1 else ">"
        e = self.end
        if self.is64:
            shoff, entsize, self.shnum, shstrndx = struct.unpack_from(f"{e}Q10xHHH", data, 0x28)
        else:
            shoff, entsize, self.shnum, shstrndx = struct.unpack_from(f"{e}I10xHHH", data, 0x20)
        (self.machine,) = struct.unpack_from(f"{e}H", data, 0x12)
        self._shdr = struct.Struct(f"{e}I20xQQ" if self.is64 else f"{e}I12xII")
        self._shoff = shoff
        if entsize != (64 if self.is64 else 40) or shoff + entsize * self.shnum > len(data):
            raise _invalid(f"{what}: its ELF section headers are broken")
        names = self._section_at(shstrndx) if 0 < shstrndx < self.shnum else None
        if names is None or names[1] == 0 or data[names[0] + names[1] - 1] != 0:
            raise _invalid(f"{what}: its ELF section names are broken")
        self._names = data[names[0] : names[0] + names[1]]

    def _section_at(self, index: int) -> tuple[int, int, int] | None:
        """(offset, size, name offset) of section ``index``; None when it lies past the end."""
        name, offset, size = self._shdr.unpack_from(
            self.data, self._shoff + index * (64 if self.is64 else 40)
        )
        return None if offset + size > len(self.data) else (offset, size, name)

    def section(self, name: bytes) -> tuple[int, int] | None:
        """(offset, size) of the first section called ``name``."""
        for i in range(1, self.shnum):
            info = self._section_at(i)
            if info is None or info[2] >= len(self._names):
                continue
            if _cstr(self._names, info[2]) == name:
                return info[0], info[1]
        return None

    def bytes_of(self, name: bytes) -> bytes | None:
        found = self.section(name)
        return None if found is None else self.data[found[0] : found[0] + found[1]]

    def symbols(self) -> tuple[int, Iterator[tuple[int, int, int]]] | None:
        """The .strtab offset and .symtab's entries after the first as (name
        offset, info, section index); None without both (or a torn .symtab)."""
        strtab, symtab = self.section(b".strtab"), self.section(b".symtab")
        size = 24 if self.is64 else 16
        if strtab is None or symtab is None or symtab[1] % size:
            return None
        layout = f"{self.end}IBxH16x" if self.is64 else f"{self.end}I8xBxH"
        entries = struct.iter_unpack(layout, self.data[symtab[0] + size : symtab[0] + symtab[1]])
        return strtab[1], ((n, i, s) for n, i, s in entries)

    def strtab_offset(self) -> int:
        found = self.section(b".strtab")
        assert found is not None
        return found[0]


def _exports(elf: _Elf) -> list[bytes]:
    """The symbols a module exports (``kmod_elf_get_symbols``)."""
    syms = elf.symbols()
    if syms is not None:
        strtab_size, entries = syms
        names: list[bytes] = []
        base = elf.strtab_offset()
        for name_off, _, _ in entries:
            if name_off >= strtab_size:
                names = []
                break
            name = _cstr(elf.data, base + name_off)
            if name.startswith(b"__crc_"):
                names.append(name[6:])
        if names:
            return names
    ksymtab = elf.bytes_of(b"__ksymtab_strings")
    return _strings(ksymtab) if ksymtab else []


def _needs(elf: _Elf) -> list[bytes]:
    """The symbols a module needs (``kmod_elf_get_dependency_symbols``)."""
    syms = elf.symbols()
    if syms is None:
        return []
    strtab_size, entries = syms
    versions: list[bytes] = []
    found = elf.section(b"__versions")
    if found is not None and found[1] % 64 == 0:  # 64-byte entries: crc, then the name
        crc = 8 if elf.is64 else 4
        versions = [_cstr(elf.data, found[0] + i * 64 + crc) for i in range(found[1] // 64)]
    first: dict[bytes, int] = {}
    for i, name in enumerate(versions):
        first.setdefault(name, i)
    visited = set()
    needs = []
    base = elf.strtab_offset()
    sparc = elf.machine in (_EM_SPARC, _EM_SPARCV9)
    for name_off, info, shndx in entries:
        if shndx != 0 or (sparc and info & 0xF == _STT_REGISTER):
            continue
        if name_off >= strtab_size:
            return []
        name = _cstr(elf.data, base + name_off)
        if not name:
            continue
        needs.append(name)
        if name in first:
            visited.add(first[name])
    # module_layout and the like: named in __versions only
    return needs + [name for i, name in enumerate(versions) if i not in visited]


# -- the modules ---------------------------------------------------------------------


@dataclass(eq=False)
class _Module:
    path: bytes  # relative to the tree, as on disk
    name: bytes
    info: list[tuple[bytes, bytes]] = field(default_factory=list)
    exports: list[bytes] = field(default_factory=list)
    needs: list[bytes] = field(default_factory=list)
    deps: list[_Module] = field(default_factory=list)  # direct, in the order first needed
    users: int = 0
    index: int = 0
    sort: int = 0  # topological place


def _modname(filename: bytes) -> bytes:
    return filename.split(b".", 1)[0].replace(b"-", b"_")


def _is_module(name: str) -> bool:
    return any(name.endswith(s) and len(name) > len(s) for s in MODULE_SUFFIXES)


def _scan(tree: Path, label: str) -> dict[bytes, tuple[bytes, Path]]:
    """Module name -> (relative path, path) of every module file under ``tree``."""
    found: dict[bytes, tuple[bytes, Path]] = {}
    stack: list[tuple[bytes, Path]] = [(b"", tree)]
    while stack:
        prefix, directory = stack.pop()
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name in _SKIPPED:
                continue
            rel = prefix + os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                stack.append((rel + b"/", Path(entry.path)))
            elif entry.is_file(follow_symlinks=False) and _is_module(entry.name):
                if re.search(rb"[\s:]", rel):
                    raise _invalid(
                        f"{label}/{rel.decode(errors='replace')}: a module path modules.dep "
                        "cannot carry (a space or ':')"
                    )
                name = _modname(os.fsencode(entry.name))
                other = found.get(name)
                if other is not None:
                    mine, theirs = rel.startswith(_UPDATES), other[0].startswith(_UPDATES)
                    if mine == theirs:
                        raise _invalid(
                            f"{label}: two modules named {name.decode(errors='replace')}: "
                            f"{other[0].decode(errors='replace')} and "
                            f"{rel.decode(errors='replace')} (the kernel loads one of a name; "
                            "an override belongs under updates/)"
                        )
                    if theirs:
                        continue
                found[name] = (rel, Path(entry.path))
    return found


def _read_list(tree: Path, name: str) -> bytes | None:
    path = tree / name
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        return read_regular(path, MAX_LIST_SIZE, name)
    except SourceRefused as exc:
        raise InputError(exc.message, reason=exc.reason) from None


def _load(rel: bytes, path: Path, label: str) -> _Module:
    module = _Module(rel, _modname(os.fsencode(path.name)))
    shown = f"{label}/{rel.decode(errors='replace')}"
    elf = _Elf(read_module(path, MAX_MODULE_SIZE, name=shown), shown)
    for s in _strings(elf.bytes_of(b".modinfo") or b""):
        key, sep, value = s.partition(b"=")
        module.info.append((key, value) if sep else (s, s))
    module.exports = _exports(elf)
    module.needs = _needs(elf)
    return module


def _ordered(tree: Path, modules: list[_Module]) -> list[_Module]:
    """modules.order's modules in its order, then the others by path."""
    place: dict[bytes, int] = {}
    for i, line in enumerate((_read_list(tree, ORDER) or b"").split(b"\n")):
        place.setdefault(line, i)
    big = len(place)

    def key(m: _Module) -> tuple[int, bytes]:
        uncompressed = re.sub(rb"\.(xz|zst|gz)$", b"", m.path)
        return (place.get(uncompressed, big), m.path)

    return sorted(modules, key=key)


def _link(modules: list[_Module]) -> None:
    """Each module's direct dependencies, then the topological order (depmod's)."""
    owner: dict[bytes, _Module] = {}
    for m in modules:
        for sym in m.exports:
            owner[sym] = m
    for m in modules:
        for sym in m.needs:
            dep = owner.get(sym[1:] if sym.startswith(b".") else sym)  # PPC64: .foo is foo
            if dep is not None and dep not in m.deps:
                m.deps.append(dep)
                dep.users += 1
    users = [m.users for m in modules]
    roots = [m.index for m in modules if m.users == 0]
    done = 0
    while roots:
        m = modules[roots.pop()]
        m.sort = done
        done += 1
        for dep in m.deps:
            users[dep.index] -= 1
            if users[dep.index] == 0:
                roots.append(dep.index)
    if done < len(modules):
        stuck = sorted(m.name.decode(errors="replace") for m in modules if users[m.index])
        more = f" and {len(stuck) - 10} more" if len(stuck) > 10 else ""
        raise _invalid(f"modules need each other in a cycle: {', '.join(stuck[:10])}{more}")


def _closure(m: _Module) -> list[_Module]:
    seen: dict[int, _Module] = {}
    stack = list(m.deps)
    while stack:
        d = stack.pop()
        if id(d) not in seen:
            seen[id(d)] = d
            stack.extend(d.deps)
    return sorted(seen.values(), key=lambda d: d.sort)


def _normalize_alias(alias: bytes) -> bytes | None:
    """``-`` as ``_`` outside brackets (kmod's alias_normalize); None when unbalanced."""
    out = bytearray()
    i = 0
    while i < len(alias):
        c = alias[i : i + 1]
        if c == b"]":
            return None
        if c == b"[":
            end = alias.find(b"]", i)
            if end < 0:
                return None
            out += alias[i : end + 1]
            i = end + 1
            continue
        out += b"_" if c == b"-" else c
        i += 1
    return bytes(out)


# -- the files -----------------------------------------------------------------------


def _values(m: _Module, key: bytes) -> list[bytes]:
    return [v for k, v in m.info if k == key]


def _devname(m: _Module) -> bytes | None:
    devname: bytes | None = None
    node = b""
    for alias in _values(m, b"alias"):
        found = re.match(rb"(char|block)-major-(\d+)-(\d+)", alias)
        if alias.startswith(b"devname:"):
            devname = alias[8:]
        elif found:
            node = b"%c%d:%d" % (found[1][0], int(found[2]), int(found[3]))
        if node and devname is not None:
            break
    return b"%s %s %s\n" % (m.name, devname, node) if devname is not None and node else None


def _builtin_index(tree: Path) -> bytes:
    index = Index()
    pieces = (_read_list(tree, BUILTIN) or b"").split(b"\n")
    lines = [p + b"\n" for p in pieces[:-1]] + [pieces[-1]]  # as fgets reads them
    for line in lines:
        if line[:1].isalpha():
            base = line.rsplit(b"/", 1)[-1]
            index.insert(base.split(b".", 1)[0].replace(b"-", b"_"), b"", 0)
    return index.to_bytes()


def _builtin_alias_index(tree: Path) -> bytes:
    index = Index()
    for record in (_read_list(tree, BUILTIN_MODINFO) or b"").split(b"\0")[:-1]:
        module, dot, rest = record.partition(b".")
        key, eq, value = rest.partition(b"=")
        alias = _normalize_alias(value)
        if module and dot and eq and key == b"alias" and value and alias is not None:
            index.insert(alias, module, 0)
    return index.to_bytes()


def _render(tree: Path, modules: list[_Module]) -> dict[str, bytes]:
    dep, alias, softdep, weakdep, devname = [], [], [], [], []
    deps_index, alias_index, symbols_index = Index(), Index(), Index()
    symbols: dict[bytes, _Module] = {}
    for m in modules:
        line = m.path + b":" + b"".join(b" " + d.path for d in _closure(m))
        dep.append(line + b"\n")
        deps_index.insert(m.name, line, m.index)
        for value in _values(m, b"alias"):
            alias.append(b"alias %s %s\n" % (value, m.name))
            normal = _normalize_alias(value)
            if normal is not None:  # depmod warns and skips it
                alias_index.insert(normal, m.name, m.index)
        softdep += [b"softdep %s %s\n" % (m.name, v) for v in _values(m, b"softdep")]
        weakdep += [b"weakdep %s %s\n" % (m.name, v) for v in _values(m, b"weakdep")]
        node = _devname(m)
        if node is not None:
            devname.append(node)
        for sym in m.exports:
            symbols[sym] = m
    for sym, m in symbols.items():
        symbols_index.insert(b"symbol:" + sym, m.name, m.index)
    devhead = [b"# Device nodes to trigger on-demand module loading.\n"] if devname else []
    return {
        "modules.dep": b"".join(dep),
        "modules.dep.bin": deps_index.to_bytes(),
        "modules.alias": b"".join([b"# Aliases extracted from modules themselves.\n", *alias]),
        "modules.alias.bin": alias_index.to_bytes(),
        "modules.softdep": b"".join(
            [b"# Soft dependencies extracted from modules themselves.\n", *softdep]
        ),
        "modules.weakdep": b"".join(
            [b"# Weak dependencies extracted from modules themselves.\n", *weakdep]
        ),
        "modules.symbols": b"".join(
            [b"# Aliases for symbols, used by symbol_request().\n"]
            + [b"alias symbol:%s %s\n" % (s, symbols[s].name) for s in sorted(symbols)]
        ),
        "modules.symbols.bin": symbols_index.to_bytes(),
        "modules.builtin.bin": _builtin_index(tree),
        "modules.builtin.alias.bin": _builtin_alias_index(tree),
        "modules.devname": b"".join(devhead + devname),
    }


def generate(tree: Path, label: str = "") -> dict[str, bytes]:
    """Every file of ``GENERATED`` for the modules tree ``tree`` (a directory), by name.
    Errors name the tree ``label`` (default: its path)."""
    label = label or str(tree)
    modules = [_load(rel, path, label) for rel, path in _scan(tree, label).values()]
    modules = _ordered(tree, modules)
    for i, m in enumerate(modules):
        m.index = i
    _link(modules)
    try:
        return _render(tree, modules)
    except IndexFormatError as exc:
        raise _invalid(f"{label}: {exc}") from None
