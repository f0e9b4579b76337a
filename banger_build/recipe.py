"""Recipe v1: load a TOML recipe into a frozen ``Recipe``, or fail with file:line:col.

The schema is data (``RECIPE_SCHEMA``): a table of keys, each with the TOML
types it accepts and a converter that validates and turns the value into what
the ``Recipe`` holds. ``check_table`` walks a parsed document with a schema and
raises ``RecipeError`` at the offending key's position, with a reason tests
can assert on:

    syntax        not TOML at all (from tomllib, with its line and column)
    io            the file cannot be read
    unknown-key   a key the schema does not know (with a did-you-mean hint)
    type          a value of the wrong TOML type
    value         a value of the right type that is invalid (bad size, ref...)
    missing-key   a required key is absent (at its table's header)
    duplicate-dest two files/templates/symlinks write the same guest path, or
                  one of them writes a path of the built-in guest set

The lock file (``lockfile.py``) is checked with the same machinery. A new
section is one more entry in ``RECIPE_SCHEMA`` and a few lines in ``_build``,
as ``[guest]`` shows:

    [guest]                       # the built-in guest asset set (banger_build.guest)
    agents = true                 # default true; false: none of it is injected
    agent = "bin/banger-vsock-agent"   # required when agents = true
    agent_sha256 = "<64 hex>"     # optional pin of the agent's bytes
    [guest.templates]             # replace built-in templates by name
    "banger-network-bootstrap" = "my-network.j2"

A recipe without a ``[guest]`` table gets no guest set (``Recipe.guest`` is
None), exactly as one with ``agents = false``.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger_build import guest as guest_set
from banger_build.errors import Reason, RecipeError
from banger_build.oci.reference import Platform, Reference, ReferenceSyntaxError
from banger_build.tomlpos import KeyPath, PositionIndex, format_key_path, read_toml

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Where:
    """Where a value sits in its file, for errors raised after loading."""

    file: str
    line: int | None
    col: int | None
    key: str

    def __str__(self) -> str:
        pos = f":{self.line}:{self.col if self.col is not None else 1}" if self.line else ""
        return f"{self.file}{pos}: {self.key}"


@dataclass(frozen=True)
class SizeSpec:
    """``auto``, ``auto+512MiB`` or a fixed size such as ``4GiB``.

    ``text`` is canonical (the largest exact binary unit: ``"4096MiB"`` and
    ``"4GiB"`` both read as ``"4GiB"``), so equal policies hash alike.
    """

    text: str
    auto: bool
    bytes: int  # the fixed size, or the extra headroom added to auto


@dataclass(frozen=True)
class FileSpec:
    src: Path  # absolute, resolved relative to the recipe's directory
    dest: str  # absolute, normalised guest path
    mode: int
    owner: str  # "uid:gid", numbers or names resolved from the image
    sha256: str | None  # 64 lowercase hex
    where: Where  # the entry's ``src`` key


@dataclass(frozen=True)
class TemplateSpec:
    src: Path
    dest: str
    mode: int
    owner: str
    where: Where  # the entry's ``src`` key


@dataclass(frozen=True)
class SymlinkSpec:
    dest: str
    target: str
    owner: str
    where: Where  # the entry's ``dest`` key


@dataclass(frozen=True)
class KernelSpec:
    path: Path | None  # a local kernel image; None when ``ref`` names an OCI artifact
    initrd: Path | None
    modules: Path | None  # a lib/modules/<version> directory (or a tarball, staged only)
    where: Where  # the [kernel] table
    install_modules: bool = False  # also copy ``modules`` into the image at /lib/modules/<version>
    #: ``[kernel] ref``: a kernel artifact pushed by ``banger-build kernel push``
    ref: Reference | None = None
    ref_where: Where | None = None  # the kernel.ref key


@dataclass(frozen=True)
class TemplateOverride:
    """``[guest.templates]``: a recipe template replacing the built-in one ``name``."""

    name: str
    src: Path
    where: Where  # the override's key


@dataclass(frozen=True)
class GuestSpec:
    """``[guest]`` with ``agents = true``: inject the built-in set (``banger_build.guest``)."""

    agent: Path  # the banger-vsock-agent binary
    agent_sha256: str | None
    templates: tuple[TemplateOverride, ...]  # in file order
    where: Where  # the guest.agent key


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    image: Reference
    platform: Platform
    size: SizeSpec
    kernel: KernelSpec | None
    files: tuple[FileSpec, ...]
    templates: tuple[TemplateSpec, ...]
    symlinks: tuple[SymlinkSpec, ...]
    vars: Mapping[str, Any] = field(default_factory=dict)
    image_where: Where | None = None  # the image.ref key
    guest: GuestSpec | None = None  # None: no [guest] table, or agents = false


# -- the schema machinery -------------------------------------------------------


class Invalid(ValueError):
    """Raised by a converter: the value has the right type but is not valid."""


@dataclass(frozen=True)
class Doc:
    """A parsed TOML file being checked: its name, positions and directory."""

    file: str
    index: PositionIndex
    base: Path  # the directory relative paths in it are resolved against
    lines: tuple[str, ...] = ()  # the source, to look at how a value was written

    def value_text(self, path: KeyPath) -> str:
        """The source text after ``=`` on the line of ``path``'s key ('' if unknown)."""
        pos = self.index.lookup(path)
        if pos is None or not 0 < pos[0] <= len(self.lines):
            return ""
        _, _, rest = self.lines[pos[0] - 1][pos[1] - 1 :].partition("=")
        return rest.strip()

    def where(self, path: KeyPath) -> Where:
        line, col = self.index.lookup(path) or (None, None)
        return Where(self.file, line, col, format_key_path(path))

    def error(
        self, path: KeyPath, message: str, reason: Reason, *, at: KeyPath | None = None
    ) -> RecipeError:
        """A RecipeError for ``path``, positioned at ``at`` (default: ``path`` itself)."""
        pos = self.index.lookup(path if at is None else at)
        line, col = pos or (None, None)
        return RecipeError(
            message,
            file=self.file,
            line=line,
            col=col,
            key=format_key_path(path) or None,
            reason=reason,
        )


Converter = Callable[[Any, Doc], Any]

# TOML type names, as users read them in the TOML spec
STRING, INTEGER, FLOAT, BOOLEAN, ARRAY, TABLE = (
    "string",
    "integer",
    "float",
    "boolean",
    "array",
    "table",
)
ARRAY_OF_TABLES = "array of tables"
_ARTICLE = {INTEGER: "an", ARRAY: "an", ARRAY_OF_TABLES: "an"}


@dataclass(frozen=True)
class Key:
    """One key of a table schema.

    ``types`` are the TOML types accepted. ``TABLE`` with ``table=None`` is a
    free-form table, kept as parsed; ``ARRAY_OF_TABLES`` checks each element
    against ``table``. ``convert`` turns an accepted value into the loaded one
    (raising ``Invalid``); without it the value is kept as is.
    """

    types: tuple[str, ...]
    required: bool = False
    convert: Converter | None = None
    table: Mapping[str, Key] | None = None
    #: integers must be written with this prefix (modes: ``0o644``, never ``644``)
    int_prefix: str | None = None


Schema = Mapping[str, "Key"]


def toml_type(value: object) -> str:
    if isinstance(value, str):
        return STRING
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, list):
        return ARRAY
    if isinstance(value, dict):
        return TABLE
    if isinstance(value, datetime.datetime):
        return "date-time"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _a(kind: str) -> str:
    return f"{_ARTICLE.get(kind, 'a')} {kind}"


def _expected(types: tuple[str, ...]) -> str:
    return " or ".join(_a(t) for t in types)


def _is_array_of_tables(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def check_table(
    doc: Doc, data: Mapping[str, Any], schema: Schema, path: KeyPath = ()
) -> dict[str, Any]:
    """Check ``data`` (the table at ``path``) against ``schema``; converted values.

    Keys are checked in document order, so the first error reported is the
    first one in the file; missing keys come after.
    """
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = schema.get(name)
        if key is None:
            raise doc.error((*path, name), _unknown_key(name, schema), Reason.UNKNOWN_KEY)
        out[name] = check_value(doc, value, key, (*path, name))
    for name, key in schema.items():
        if key.required and name not in data:
            what = "table" if key.types == (TABLE,) else "key"
            raise doc.error(
                (*path, name), f"missing required {what} {name!r}", Reason.MISSING_KEY, at=path
            )
    return out


def _unknown_key(name: str, schema: Schema) -> str:
    valid = sorted(schema)
    shown = name if len(name) <= 64 else name[:61] + "..."
    hint = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if hint:
        return f"unknown key {shown!r} (did you mean {hint[0]!r}?)"
    if valid:
        return f"unknown key {shown!r} (valid keys: {', '.join(valid)})"
    return f"unknown key {shown!r}"


def check_value(doc: Doc, value: Any, key: Key, path: KeyPath) -> Any:
    kind = toml_type(value)
    if ARRAY_OF_TABLES in key.types and _is_array_of_tables(value):
        assert key.table is not None
        return [check_table(doc, element, key.table, (*path, i)) for i, element in enumerate(value)]
    if kind not in key.types:
        got = _a(kind)
        if ARRAY_OF_TABLES in key.types and kind == ARRAY:
            bad = next(i for i, v in enumerate(value) if not isinstance(v, dict))
            raise doc.error(
                (*path, bad),
                f"expected a table, got {_a(toml_type(value[bad]))}",
                Reason.TYPE,
            )
        hint = ""
        if ARRAY_OF_TABLES in key.types and kind == TABLE:
            hint = f" (write [[{format_key_path(path)}]] for each entry)"
        raise doc.error(path, f"expected {_expected(key.types)}, got {got}{hint}", Reason.TYPE)
    if kind == TABLE and key.table is not None:
        value = check_table(doc, value, key.table, path)
    if (
        key.int_prefix
        and kind == INTEGER
        and value >= 8  # one digit reads the same in any base
        and not doc.value_text(path).startswith(key.int_prefix)
    ):
        raise doc.error(
            path,
            f'integer {value} is decimal; write the mode as a string such as "0644" '
            f"or as an octal literal such as {key.int_prefix}644",
            Reason.VALUE,
        )
    if key.convert is None:
        return value
    try:
        return key.convert(value, doc)
    except Invalid as exc:
        raise doc.error(path, str(exc), Reason.VALUE) from None


# -- value converters -------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_UNITS = {
    "": 1, "B": 1,
    "K": 1 << 10, "KiB": 1 << 10,
    "M": 1 << 20, "MiB": 1 << 20,
    "G": 1 << 30, "GiB": 1 << 30,
    "T": 1 << 40, "TiB": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"([0-9]{1,20})([A-Za-z]*)")
_MAX_SIZE = (1 << 63) - 1  # off_t
_MIN_FIXED = 8 << 20
_OCTAL = re.compile(r"[0-7]{1,6}")
_OWNER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "no change"
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_PATH_MAX = 4095
_NAME_MAX = 255


def _show(value: str, limit: int = 80) -> str:
    """A user's string, quoted, shortened if huge."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def convert_version(value: int, doc: Doc) -> int:
    if value != RECIPE_VERSION:
        raise Invalid(
            f"unsupported version {value} (this banger-build reads version {RECIPE_VERSION})"
        )
    return value


def convert_name(value: str, doc: Doc) -> str:
    if not _NAME.fullmatch(value):
        raise Invalid(
            f"invalid name {_show(value)} (1-100 characters of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit)"
        )
    return value


def convert_reference(value: str, doc: Doc) -> Reference:
    try:
        return Reference.parse(value)
    except ReferenceSyntaxError as exc:
        raise Invalid(str(exc)) from None


def convert_platform(value: str, doc: Doc) -> Platform:
    try:
        return Platform.parse(value)
    except ReferenceSyntaxError as exc:
        raise Invalid(str(exc)) from None


def format_size(n: int) -> str:
    """Bytes in the largest exact binary unit: 536870912 -> ``512MiB``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _UNITS[unit]
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def parse_bytes(text: str) -> int:
    """``512MiB``, ``4G``, ``1048576`` -> bytes (all units binary)."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2) not in _UNITS:
        raise Invalid(
            f"invalid size {_show(text)} (expected a number with an optional unit "
            'B, K/KiB, M/MiB, G/GiB or T/TiB, such as "512MiB")'
        )
    n = int(m.group(1)) * _UNITS[m.group(2)]
    if n > _MAX_SIZE:
        raise Invalid(f"size {_show(text)} is too large")
    return n


def convert_size(value: str | int, doc: Doc) -> SizeSpec:
    if isinstance(value, int):
        if value < 0 or value > _MAX_SIZE:
            raise Invalid(f"invalid size {value} (expected a positive number of bytes)")
        auto, n = False, value
    elif value == "auto":
        auto, n = True, 0
    elif value.startswith("auto+"):
        auto, n = True, parse_bytes(value[len("auto+") :])
    else:
        auto, n = False, parse_bytes(value)
    if auto:
        return SizeSpec("auto" if n == 0 else f"auto+{format_size(n)}", True, n)
    if n % 4096 or n < _MIN_FIXED:
        raise Invalid(
            f"invalid size {_show(str(value))} ({n} bytes): a fixed size must be a multiple of "
            '4096 bytes and at least 8MiB (or use "auto" / "auto+<size>")'
        )
    return SizeSpec(format_size(n), False, n)


def convert_mode(value: str | int, doc: Doc) -> int:
    if isinstance(value, str):
        if not _OCTAL.fullmatch(value):
            raise Invalid(f'invalid mode {_show(value)} (expected octal digits such as "0644")')
        value = int(value, 8)
    if not 0 <= value <= 0o7777:
        shown = f"0o{value:o}" if value >= 0 else str(value)
        raise Invalid(f"invalid mode {shown} (expected 0 to 0o7777)")
    return value


def _owner_part(part: str) -> bool:
    if part.isascii() and part.isdigit():
        return len(part) <= 10 and int(part) <= _ID_MAX
    return bool(_OWNER_NAME.fullmatch(part))


def convert_owner(value: str, doc: Doc) -> str:
    user, sep, group = value.partition(":")
    if not sep or not _owner_part(user) or not _owner_part(group):
        raise Invalid(
            f'invalid owner {_show(value)} (expected "uid:gid" with numbers or names, '
            'such as "0:0" or "root:adm")'
        )
    return value


def convert_sha256(value: str, doc: Doc) -> str:
    if not _HEX64.fullmatch(value):
        raise Invalid(f"invalid sha256 {_show(value)} (expected 64 hex digits)")
    return value.lower()


def _no_control(value: str, what: str) -> None:
    for ch, name in (("\0", "NUL"), ("\n", "newline"), ("\r", "carriage return")):
        if ch in value:
            raise Invalid(f"{what} {_show(value)} contains a {name}")


def convert_dest(value: str, doc: Doc) -> str:
    """A guest path: absolute, normalised, not "/", carryable by debugfs."""
    _no_control(value, "dest")
    if not value.startswith("/"):
        raise Invalid(f'dest {_show(value)} is not an absolute path (start it with "/")')
    if value == "/":
        raise Invalid('dest "/" is the root directory itself')
    if value.endswith("/"):
        raise Invalid(f'dest {_show(value)} ends with "/" (name the file)')
    components = value[1:].split("/")
    if "" in components:
        raise Invalid(f'dest {_show(value)} contains "//"')
    for part in components:
        if part in (".", ".."):
            raise Invalid(f"dest {_show(value)} is not normalised (contains {part!r})")
        if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX:
            raise Invalid(f"dest {_show(value)} has a component longer than {_NAME_MAX} bytes")
    if len(value.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise Invalid(f"dest {_show(value)} is longer than {_PATH_MAX} bytes")
    return value


def convert_target(value: str, doc: Doc) -> str:
    if not value:
        raise Invalid("symlink target is empty")
    _no_control(value, "target")
    if len(value.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise Invalid(f"target is longer than {_PATH_MAX} bytes")
    return value


def convert_src(value: str, doc: Doc) -> Path:
    """A host path relative to the recipe's directory -> absolute (need not exist yet)."""
    if not value:
        raise Invalid("path is empty")
    if "\0" in value:
        raise Invalid(f"path {_show(value)} contains a NUL")
    return Path(doc.base, value).resolve()


# -- the recipe schema --------------------------------------------------------------

_DEST = Key((STRING,), required=True, convert=convert_dest)
_MODE = Key((STRING, INTEGER), convert=convert_mode, int_prefix="0o")
_OWNER = Key((STRING,), convert=convert_owner)
_SRC = Key((STRING,), required=True, convert=convert_src)
_SRC_OPT = Key((STRING,), convert=convert_src)

TEMPLATE_SCHEMA: Schema = {"src": _SRC, "dest": _DEST, "mode": _MODE, "owner": _OWNER}
FILE_SCHEMA: Schema = {**TEMPLATE_SCHEMA, "sha256": Key((STRING,), convert=convert_sha256)}
SYMLINK_SCHEMA: Schema = {
    "dest": _DEST,
    "target": Key((STRING,), required=True, convert=convert_target),
    "owner": _OWNER,
}

GUEST_SCHEMA: Schema = {
    "agents": Key((BOOLEAN,)),
    "agent": Key((STRING,), convert=convert_src),
    "agent_sha256": Key((STRING,), convert=convert_sha256),
    # built-in template name -> the recipe's replacement
    "templates": Key((TABLE,), table={n: _SRC_OPT for n in guest_set.TEMPLATE_NAMES}),
}

RECIPE_SCHEMA: Schema = {
    "version": Key((INTEGER,), convert=convert_version),
    "name": Key((STRING,), convert=convert_name),
    "image": Key(
        (TABLE,),
        required=True,
        table={
            "ref": Key((STRING,), required=True, convert=convert_reference),
            "platform": Key((STRING,), convert=convert_platform),
        },
    ),
    "rootfs": Key((TABLE,), table={"size": Key((STRING, INTEGER), convert=convert_size)}),
    "kernel": Key(
        (TABLE,),
        table={
            "path": Key((STRING,), convert=convert_src),
            "ref": Key((STRING,), convert=convert_reference),
            "initrd": Key((STRING,), convert=convert_src),
            "modules": Key((STRING,), convert=convert_src),
            "install_modules": Key((BOOLEAN,)),
        },
    ),
    "vars": Key((TABLE,)),  # free-form template variables
    "files": Key((ARRAY_OF_TABLES,), table=FILE_SCHEMA),
    "templates": Key((ARRAY_OF_TABLES,), table=TEMPLATE_SCHEMA),
    "symlinks": Key((ARRAY_OF_TABLES,), table=SYMLINK_SCHEMA),
    "guest": Key((TABLE,), table=GUEST_SCHEMA),
}

DEFAULT_PLATFORM = Platform("linux", "amd64")
DEFAULT_SIZE = SizeSpec("auto", True, 0)
DEFAULT_MODE = 0o644
DEFAULT_OWNER = "0:0"


def load_recipe(path: Path) -> Recipe:
    """Read, parse and validate a recipe. Every problem is a ``RecipeError``."""
    path = Path(path)
    data, index = read_toml(path, what="recipe")
    try:
        base = path.parent.resolve()
    except (OSError, RuntimeError) as exc:
        raise RecipeError(
            f"cannot resolve the recipe's directory: {exc}", file=str(path), reason=Reason.IO
        ) from exc
    try:
        lines = tuple(path.read_text("utf-8", "replace").splitlines())
    except OSError:
        lines = ()
    doc = Doc(str(path), index, base, lines)
    checked = check_table(doc, data, RECIPE_SCHEMA)
    return _build(path, doc, checked)


def _build(path: Path, doc: Doc, v: dict[str, Any]) -> Recipe:
    image = v["image"]
    ref: Reference = image["ref"]
    name = v.get("name") or _default_name(ref)
    rootfs = v.get("rootfs", {})

    kernel = None
    if "kernel" in v:
        k = v["kernel"]
        install = bool(k.get("install_modules", False))
        if "path" in k and "ref" in k:
            raise doc.error(
                ("kernel",),
                "needs exactly one of kernel.path (a local kernel) or kernel.ref "
                "(a kernel artifact in a registry), not both",
                Reason.CONFLICTING_KEYS,
                at=("kernel", "ref"),
            )
        if "path" not in k and "ref" not in k:
            raise doc.error(
                ("kernel", "path"),
                "missing required key 'path' (a local kernel) or 'ref' (a kernel artifact)",
                Reason.MISSING_KEY,
                at=("kernel",),
            )
        if "ref" in k:
            for local in ("initrd", "modules"):
                if local in k:
                    raise doc.error(
                        ("kernel", local),
                        "cannot be combined with kernel.ref (the artifact carries its own)",
                        Reason.CONFLICTING_KEYS,
                    )
        elif install and "modules" not in k:
            raise doc.error(
                ("kernel", "install_modules"),
                "needs kernel.modules (the modules directory)",
                Reason.MISSING_KEY,
            )
        kernel = KernelSpec(
            k.get("path"),
            k.get("initrd"),
            k.get("modules"),
            doc.where(("kernel",)),
            install,
            ref=k.get("ref"),
            ref_where=doc.where(("kernel", "ref")) if "ref" in k else None,
        )

    files = tuple(
        FileSpec(
            e["src"],
            e["dest"],
            e.get("mode", DEFAULT_MODE),
            e.get("owner", DEFAULT_OWNER),
            e.get("sha256"),
            doc.where(("files", i, "src")),
        )
        for i, e in enumerate(v.get("files", ()))
    )
    templates = tuple(
        TemplateSpec(
            e["src"],
            e["dest"],
            e.get("mode", DEFAULT_MODE),
            e.get("owner", DEFAULT_OWNER),
            doc.where(("templates", i, "src")),
        )
        for i, e in enumerate(v.get("templates", ()))
    )
    symlinks = tuple(
        SymlinkSpec(
            e["dest"],
            e["target"],
            e.get("owner", DEFAULT_OWNER),
            doc.where(("symlinks", i, "dest")),
        )
        for i, e in enumerate(v.get("symlinks", ()))
    )
    _check_unique_dests(doc, v)
    guest = _guest(doc, v.get("guest"))
    if guest is not None:
        _check_guest_dests(doc, v)
        _check_guest_vars(doc, v.get("vars", {}))

    return Recipe(
        path=path,
        name=name,
        image=ref,
        platform=image.get("platform", DEFAULT_PLATFORM),
        size=rootfs.get("size", DEFAULT_SIZE),
        kernel=kernel,
        files=files,
        templates=templates,
        symlinks=symlinks,
        vars=v.get("vars", {}),
        image_where=doc.where(("image", "ref")),
        guest=guest,
    )


def _guest(doc: Doc, g: dict[str, Any] | None) -> GuestSpec | None:
    """``[guest]`` -> GuestSpec, or None when absent or switched off."""
    if g is None or not g.get("agents", True):
        return None
    if "agent" not in g:
        raise doc.error(
            ("guest", "agent"),
            "missing required key 'agent' (the banger-vsock-agent binary, relative to the "
            "recipe), or set agents = false to build without the guest set",
            Reason.MISSING_KEY,
            at=("guest",),
        )
    overrides = tuple(
        TemplateOverride(name, src, doc.where(("guest", "templates", name)))
        for name, src in g.get("templates", {}).items()
    )
    return GuestSpec(g["agent"], g.get("agent_sha256"), overrides, doc.where(("guest", "agent")))


def _check_guest_dests(doc: Doc, v: dict[str, Any]) -> None:
    """The recipe's own entries may not write a path of the built-in set (nor above/below one)."""
    for section in ("files", "templates", "symlinks"):
        for i, entry in enumerate(v.get(section, ())):
            dest: str = entry["dest"]
            builtin = guest_set.conflicting_dest(dest)
            if builtin is None:
                continue
            if builtin == dest:
                clash = f"dest {_show(dest)} is written by the built-in guest set"
            elif builtin.startswith(dest + "/"):
                clash = f"dest {_show(dest)} holds {_show(builtin)} of the built-in guest set"
            else:
                clash = f"dest {_show(dest)} is inside {_show(builtin)} of the built-in guest set"
            hint = guest_set.replacement_hint(builtin)
            raise doc.error(
                (section, i, "dest"),
                f"{clash} ({hint}; or set guest.agents = false)",
                Reason.DUPLICATE_DEST,
            )


def _check_guest_vars(doc: Doc, variables: Mapping[str, Any]) -> None:
    """The [vars] the built-in templates read must have values they can use."""
    for name, check in guest_set.VARS.items():
        problem = check(variables[name]) if name in variables else None
        if problem is not None:
            raise doc.error(("vars", name), problem, Reason.VALUE)


def _default_name(ref: Reference) -> str:
    name = ref.default_image_name()[:100]
    return name if _NAME.fullmatch(name) else "image"


def _check_unique_dests(doc: Doc, v: dict[str, Any]) -> None:
    seen: dict[str, KeyPath] = {}
    for section in ("files", "templates", "symlinks"):
        for i, entry in enumerate(v.get(section, ())):
            key: KeyPath = (section, i, "dest")
            dest: str = entry["dest"]
            first = seen.setdefault(dest, key)
            if first != key:
                w = doc.where(first)
                raise doc.error(
                    key, f"duplicate dest {_show(dest)}: already used by {w}", Reason.DUPLICATE_DEST
                )
