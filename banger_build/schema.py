"""A small schema engine for TOML files: check a parsed document, fail at file:line:col.

A schema is data: a table of ``Key``s, each with the TOML types it accepts and
a converter that validates a value and turns it into what the caller keeps.
``check_table`` walks a parsed document with a schema and raises
``RecipeError`` at the offending key's position, with a reason tests can
assert on:

    unknown-key   a key the schema does not know (with a did-you-mean hint)
    type          a value of the wrong TOML type
    value         a value of the right type that is invalid (a converter's ``Invalid``;
                  a converter may name a more precise reason)
    missing-key   a required key is absent (at its table's header; a missing
                  top-level key at 1:1, the start of the file)

Recipes (``recipe.py``) and lock files (``lockfile.py``) are checked with it.
The converters here are the generic ones (references, platforms, digests,
byte sizes); a file format keeps its own next to its schema.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_build.entries import Where
from banger_build.errors import Reason, RecipeError
from banger_build.oci.reference import Platform, Reference, ReferenceSyntaxError
from banger_build.tomlpos import KeyPath, PositionIndex, format_key_path


class Invalid(ValueError):
    """Raised by a converter: the value has the right type but is not valid."""

    def __init__(self, message: str, reason: Reason = Reason.VALUE) -> None:
        super().__init__(message)
        self.reason = reason


#: Where an error with no recorded position points: the start of the file (a
#: missing top-level table, say, belongs to the whole file).
FILE_START = (1, 1)


@dataclass(frozen=True)
class Doc:
    """A parsed TOML file being checked: its name, positions and directory."""

    file: str
    index: PositionIndex
    base: Path  # the directory relative paths in it are resolved against
    lines: tuple[str, ...] = ()  # the source, to look at how a value was written

    def position(self, path: KeyPath) -> tuple[int, int]:
        """``path``'s position, else its nearest recorded ancestor's, else 1:1."""
        return self.index.lookup(path) or FILE_START

    def value_text(self, path: KeyPath) -> str:
        """The source text after ``=`` on the line of ``path``'s key ('' if unknown)."""
        pos = self.index.lookup(path)
        if pos is None or not 0 < pos[0] <= len(self.lines):
            return ""
        _, _, rest = self.lines[pos[0] - 1][pos[1] - 1 :].partition("=")
        return rest.strip()

    def where(self, path: KeyPath) -> Where:
        line, col = self.position(path)
        return Where(self.file, line, col, format_key_path(path))

    def error(
        self, path: KeyPath, message: str, reason: Reason, *, at: KeyPath | None = None
    ) -> RecipeError:
        """A RecipeError for ``path``, positioned at ``at`` (default: ``path`` itself)."""
        line, col = self.position(path if at is None else at)
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

    ``doc``, ``default`` and ``example`` are for people: the README's recipe
    reference is generated from them (``banger_build.recipedoc``).
    """

    types: tuple[str, ...]
    required: bool = False
    convert: Converter | None = None
    table: Mapping[str, Key] | None = None
    #: integers must be written with this prefix (modes: ``0o644``, never ``644``)
    int_prefix: str | None = None
    doc: str = ""  # what the key means, one or two sentences of Markdown
    default: str = ""  # what an absent key means ("" for a required key)
    example: str = ""  # the key as a recipe writes it: ``size = "auto+256MiB"``


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
        raise doc.error(path, str(exc), exc.reason) from None


# -- generic converters -------------------------------------------------------------


def show(value: str, limit: int = 80) -> str:
    """A user's string, quoted, shortened if huge."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


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


_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")


def convert_sha256(value: str, doc: Doc) -> str:
    if not _HEX64.fullmatch(value):
        raise Invalid(f"invalid sha256 {show(value)} (expected 64 hex digits)")
    return value.lower()


UNITS = {
    "": 1, "B": 1,
    "K": 1 << 10, "KiB": 1 << 10,
    "M": 1 << 20, "MiB": 1 << 20,
    "G": 1 << 30, "GiB": 1 << 30,
    "T": 1 << 40, "TiB": 1 << 40,
}  # fmt: skip
#: at most 20 digits: the number is checked against a bound before any arithmetic
#: could make it expensive
_SIZE = re.compile(r"([0-9]{1,20})([A-Za-z]*)")
MAX_BYTES = (1 << 63) - 1  # off_t: what any size on the host can be at most


def format_size(n: int) -> str:
    """Bytes in the largest exact binary unit: 536870912 -> ``512MiB``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = UNITS[unit]
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def parse_bytes(text: str) -> int:
    """``512MiB``, ``4G``, ``1048576`` -> bytes (all units binary), at most ``MAX_BYTES``."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2) not in UNITS:
        raise Invalid(
            f"invalid size {show(text)} (expected a number with an optional unit "
            'B, K/KiB, M/MiB, G/GiB or T/TiB, such as "512MiB")'
        )
    n = int(m.group(1)) * UNITS[m.group(2)]
    if n > MAX_BYTES:
        raise Invalid(f"size {show(text)} is too large")
    return n
