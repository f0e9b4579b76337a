"""Where each key of a TOML document sits: key path -> (line, column).

``tomllib`` reports positions only for syntax errors, but a recipe's *semantic*
errors (an unknown key, a bad size) must also say ``file:line:col``. This is a
small scanner over the TOML text that records, for every key path, the 1-based
line and column (in characters, like tomllib) where its key starts::

    [image]              ("image",)            -> the '[' of the header
    ref = "debian"       ("image", "ref")      -> the 'r'
    [[files]]            ("files", 0)          -> the '[' of the first [[files]]
    mode = "0644"        ("files", 0, "mode")
    a.b = { c = 1 }      ("a",), ("a", "b"), ("a", "b", "c")
    x = [ 1, { y = 2 } ] ("x", 0), ("x", 1), ("x", 1, "y")

It is meant to run on text that tomllib has accepted, but it never raises and
always terminates on any input: what it cannot make sense of it skips, and
``lookup`` then falls back to the nearest recorded ancestor.

``read_toml`` ties both together: read a file (a regular file of at most
``MAX_TOML_BYTES``), parse it with tomllib, and turn every failure into a
``RecipeError`` with reason ``io``, ``too-large`` or ``syntax``.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from pathlib import Path
from typing import Any

from banger_build.errors import Reason, RecipeError
from banger_build.sources import SourceRefused, read_regular

KeyPath = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = frozenset(" \t\r\n,]}#")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MAX_DEPTH = 64  # deeper values are skipped, not indexed (lookups fall back to the ancestor)
_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = re.compile(r"\s*\(at end of document\)$")


def format_key_path(path: KeyPath) -> str:
    """``("files", 0, "mode")`` -> ``files[0].mode``; odd keys are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE_KEY.fullmatch(part) else _quote(part)
        out += f".{text}" if out else text
    return out


def _quote(key: str) -> str:
    body = "".join(
        "\\" + ch if ch in '"\\' else (ch if ch.isprintable() else f"\\u{ord(ch):04x}")
        for ch in key
    )
    return f'"{body}"'


class _Fail(Exception):
    """The scanner met something it does not understand (invalid TOML)."""


class PositionIndex:
    """Key path -> (line, col) of a TOML text. Build it with ``from_text``."""

    def __init__(self, positions: dict[KeyPath, tuple[int, int]]) -> None:
        self._positions = positions

    @classmethod
    def from_text(cls, text: str) -> PositionIndex:
        return cls(_Scanner(text).scan())

    def lookup(self, path: KeyPath) -> tuple[int, int] | None:
        """Position of ``path``, else of its nearest recorded ancestor; None for the root."""
        path = tuple(path)
        while path:
            pos = self._positions.get(path)
            if pos is not None:
                return pos
            path = path[:-1]
        return None

    def __contains__(self, path: object) -> bool:
        return path in self._positions

    def __len__(self) -> int:
        return len(self._positions)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.positions: dict[KeyPath, tuple[int, int]] = {}
        self.aot_count: dict[KeyPath, int] = {}  # array-of-tables path -> elements so far

    # -- bookkeeping ---------------------------------------------------------

    def pos(self, i: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, i)
        return line, i - self.line_starts[line - 1] + 1

    def record(self, path: KeyPath, i: int, *, explicit: bool = True) -> None:
        if explicit:
            self.positions[path] = self.pos(i)
        else:
            self.positions.setdefault(path, self.pos(i))

    # -- lexing helpers ------------------------------------------------------

    def peek(self, i: int) -> str:
        return self.s[i] if i < self.n else ""

    def skip_ws(self, i: int) -> int:
        while i < self.n and self.s[i] in " \t":
            i += 1
        return i

    def skip_to_eol(self, i: int) -> int:
        nl = self.s.find("\n", i)
        return self.n if nl < 0 else nl + 1

    def skip_ws_comments_newlines(self, i: int) -> int:
        while i < self.n:
            ch = self.s[i]
            if ch in " \t\r\n":
                i += 1
            elif ch == "#":
                i = self.skip_to_eol(i)
            else:
                break
        return i

    def basic_string(self, i: int) -> tuple[str, int]:
        """``"..."`` starting at ``i``: (decoded text, index after the closing quote)."""
        out: list[str] = []
        i += 1
        while i < self.n:
            ch = self.s[i]
            if ch == '"':
                return "".join(out), i + 1
            if ch == "\n":
                raise _Fail
            if ch == "\\":
                esc = self.peek(i + 1)
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                    i += 2
                    continue
                width = {"u": 4, "U": 8}.get(esc)
                digits = self.s[i + 2 : i + 2 + width] if width else ""
                if not width or not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != width:
                    raise _Fail
                code = int(digits, 16)
                out.append(chr(code) if code < 0x110000 else "\ufffd")
                i += 2 + width
                continue
            out.append(ch)
            i += 1
        raise _Fail

    def literal_string(self, i: int) -> tuple[str, int]:
        end = self.s.find("'", i + 1)
        nl = self.s.find("\n", i + 1)
        if end < 0 or (0 <= nl < end):
            raise _Fail
        return self.s[i + 1 : end], end + 1

    def multiline_string(self, i: int, quote: str) -> int:
        """Skip a ``\"\"\"`` or ``'''`` string starting at ``i``; index after it."""
        delim = quote * 3
        j = i + 3
        while j < self.n:
            if quote == '"' and self.s[j] == "\\":
                j += 2
                continue
            if self.s.startswith(delim, j):
                j += 3
                # up to two quotes right before the delimiter belong to the content
                extra = 0
                while extra < 2 and self.peek(j) == quote:
                    j += 1
                    extra += 1
                return j
            j += 1
        raise _Fail

    # -- keys ----------------------------------------------------------------

    def key(self, i: int) -> tuple[list[tuple[str, int]], int]:
        """A dotted key at ``i``: ([(part, start index)], index after it)."""
        parts: list[tuple[str, int]] = []
        while True:
            i = self.skip_ws(i)
            ch = self.peek(i)
            start = i
            if ch == '"':
                name, i = self.basic_string(i)
            elif ch == "'":
                name, i = self.literal_string(i)
            elif ch in _BARE and ch:
                while i < self.n and self.s[i] in _BARE:
                    i += 1
                name = self.s[start:i]
            else:
                raise _Fail
            parts.append((name, start))
            i = self.skip_ws(i)
            if self.peek(i) != ".":
                return parts, i
            i += 1

    def record_key(self, prefix: KeyPath, parts: list[tuple[str, int]]) -> KeyPath:
        path = prefix
        for n, (name, start) in enumerate(parts):
            path = (*path, name)
            self.record(path, start, explicit=n == len(parts) - 1)
        return path

    # -- values --------------------------------------------------------------

    def value(self, i: int, path: KeyPath, depth: int) -> int:
        """Skip the value at ``i`` (recording keys inside it); index after it."""
        ch = self.peek(i)
        if ch == '"':
            if self.s.startswith('"""', i):
                return self.multiline_string(i, '"')
            return self.basic_string(i)[1]
        if ch == "'":
            if self.s.startswith("'''", i):
                return self.multiline_string(i, "'")
            return self.literal_string(i)[1]
        if ch == "[":
            return self.array(i, path, depth + 1)
        if ch == "{":
            return self.inline_table(i, path, depth + 1)
        return self.scalar(i)

    def scalar(self, i: int) -> int:
        start = i
        while i < self.n and self.s[i] not in _SCALAR_END:
            i += 1
        if i == start:
            raise _Fail
        # a date-time may use a space instead of "T": 1979-05-27 07:32:00
        if _DATE.fullmatch(self.s, start, i) and self.peek(i) == " " and self.peek(i + 1).isdigit():
            i += 1
            while i < self.n and self.s[i] not in _SCALAR_END:
                i += 1
        return i

    def array(self, i: int, path: KeyPath, depth: int) -> int:
        if depth > _MAX_DEPTH:
            return self.skip_nested(i)
        i += 1
        index = 0
        while True:
            i = self.skip_ws_comments_newlines(i)
            if self.peek(i) == "]":
                return i + 1
            if not self.peek(i):
                raise _Fail
            element = (*path, index)
            self.record(element, i)
            i = self.value(i, element, depth)
            index += 1
            i = self.skip_ws_comments_newlines(i)
            ch = self.peek(i)
            if ch == ",":
                i += 1
            elif ch == "]":
                return i + 1
            else:
                raise _Fail

    def inline_table(self, i: int, path: KeyPath, depth: int) -> int:
        if depth > _MAX_DEPTH:
            return self.skip_nested(i)
        i += 1
        while True:
            i = self.skip_ws_comments_newlines(i)
            ch = self.peek(i)
            if ch == "}":
                return i + 1
            if ch == ",":
                i += 1
                continue
            parts, i = self.key(i)
            i = self.skip_ws(i)
            if self.peek(i) != "=":
                raise _Fail
            child = self.record_key(path, parts)
            i = self.value(self.skip_ws(i + 1), child, depth)

    def skip_nested(self, i: int) -> int:
        """Skip a balanced [...] or {...} without recording anything (too deep)."""
        depth = 0
        while i < self.n:
            ch = self.s[i]
            if ch in "[{":
                depth += 1
                i += 1
            elif ch in "]}":
                depth -= 1
                i += 1
                if depth == 0:
                    return i
            elif ch == '"' or ch == "'":
                if self.s.startswith(ch * 3, i):
                    i = self.multiline_string(i, ch)
                elif ch == '"':
                    i = self.basic_string(i)[1]
                else:
                    i = self.literal_string(i)[1]
            elif ch == "#":
                i = self.skip_to_eol(i)
            else:
                i += 1
        raise _Fail

    # -- the document --------------------------------------------------------

    def header(self, i: int) -> tuple[KeyPath, int]:
        """``[a.b]`` or ``[[a.b]]`` at ``i``: (the table's path, index after it)."""
        start = i
        aot = self.s.startswith("[[", i)
        parts, j = self.key(i + (2 if aot else 1))
        close = "]]" if aot else "]"
        if not self.s.startswith(close, j):
            raise _Fail
        path: KeyPath = ()
        for n, (name, pos) in enumerate(parts):
            path = (*path, name)
            last = n == len(parts) - 1
            if last and aot:
                self.record(path, start, explicit=False)  # the array: its first element
                count = self.aot_count.get(path, 0)
                self.aot_count[path] = count + 1
                path = (*path, count)
            elif not last:
                self.record(path, pos, explicit=False)
                if path in self.aot_count:  # [[a]] ... [a.b]: b is in a's last element
                    path = (*path, self.aot_count[path] - 1)
        self.record(path, start)
        return path, j + len(close)

    def scan(self) -> dict[KeyPath, tuple[int, int]]:
        table: KeyPath = ()
        i = 0
        while i < self.n:
            i = self.skip_ws_comments_newlines(i)
            if i >= self.n:
                break
            try:
                if self.s[i] == "[":
                    table, i = self.header(i)
                else:
                    parts, i = self.key(i)
                    i = self.skip_ws(i)
                    if self.peek(i) != "=":
                        raise _Fail
                    path = self.record_key(table, parts)
                    i = self.value(self.skip_ws(i + 1), path, 0)
            except (_Fail, RecursionError):
                pass
            # the rest of the line holds at most a comment (in valid TOML)
            i = self.skip_to_eol(i)
        return self.positions


def _syntax_position(text: str, message: str) -> tuple[str, int | None, int | None]:
    """Split tomllib's "msg (at line X, column Y)" into (msg, X, Y)."""
    m = _POSITION.search(message)
    if m:
        return message[: m.start()], int(m.group(1)), int(m.group(2))
    m = _AT_END.search(message)
    if m:
        lines = text.split("\n")
        return message[: m.start()], len(lines), len(lines[-1]) + 1
    return message, None, None


def parse_toml(text: str, *, file: str) -> tuple[dict[str, Any], PositionIndex]:
    """Parse TOML text; a syntax error becomes ``RecipeError(reason=Reason.SYNTAX)``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line, col = _syntax_position(text, str(exc))
        raise RecipeError(
            f"invalid TOML: {message[:1].lower()}{message[1:]}",
            file=file,
            line=line,
            col=col,
            reason=Reason.SYNTAX,
        ) from None
    except RecursionError:
        raise RecipeError(
            "invalid TOML: values are nested too deeply", file=file, reason=Reason.SYNTAX
        ) from None
    return data, PositionIndex.from_text(text)


def decode_toml(raw: bytes, *, file: str) -> str:
    """UTF-8 text of a TOML file; invalid UTF-8 is a syntax error at its position."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8", "replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise RecipeError(
            "invalid TOML: the file is not valid UTF-8",
            file=file,
            line=line,
            col=col,
            reason=Reason.SYNTAX,
        ) from None


#: Bytes of a recipe or lock file: hand-written or generated configuration of a
#: few KiB; the bound stops a huge or endless file (``/dev/zero``) early.
MAX_TOML_BYTES = 1 << 20


def read_toml_text(path: Path, *, what: str = "recipe") -> str:
    """The text of a TOML file: a regular file (a FIFO or device never blocks or
    runs forever) of at most ``MAX_TOML_BYTES``, valid UTF-8. Else ``RecipeError``."""
    file = str(path)
    try:
        raw = read_regular(path, MAX_TOML_BYTES, what)
    except SourceRefused as exc:
        reason: Reason
        if exc.reason == Reason.TOO_LARGE:
            message, reason = f"the {what} is larger than {MAX_TOML_BYTES >> 20} MiB", exc.reason
        elif exc.reason == Reason.IO:
            message, reason = f"cannot read {what}: {exc.detail}", Reason.IO
        else:
            message, reason = f"cannot read {what}: it {exc.detail}", Reason.IO
        raise RecipeError(message, file=file, reason=reason) from None
    return decode_toml(raw, file=file)


def read_toml(path: Path, *, what: str = "recipe") -> tuple[dict[str, Any], PositionIndex]:
    """Read and parse a TOML file; any failure is a ``RecipeError`` (io or syntax)."""
    return parse_toml(read_toml_text(path, what=what), file=str(path))
