"""Recipe v1: load a TOML recipe into a frozen ``Recipe``, or fail with file:line:col.

The schema is data (``RECIPE_SCHEMA``), checked by the generic engine in
``schema.py``; this module holds the recipe's own keys, converters and types.
Reasons tests can assert on, besides the engine's (unknown-key, type, value,
missing-key):

    syntax             not TOML at all (from tomllib, with its line and column)
    io                 the file cannot be read (or is not a regular file)
    too-large          the file is larger than ``tomlpos.MAX_TOML_BYTES``
    duplicate-dest     two files/templates/symlinks write the same guest path, or
                       one of them writes a path of the built-in guest set
    source-not-allowed a source outside the recipe's project (``sources.py``) or on
                       /proc, /sys, /dev
    symlink-loop       a source that is a symlink loop

A new section is one more entry in ``RECIPE_SCHEMA`` and a few lines in
``_build``, as ``[guest]`` shows:

    [guest]                       # the built-in guest asset set (banger_build.guest)
    agents = true                 # default true; false: none of it is injected
    agent = "bin/banger-vsock-agent"   # default: the built-in one for the platform
    # or agent_ref = "REGISTRY/REPO:TAG" (a file artifact), agent_url = "https://..."
    agent_sha256 = "<64 hex>"     # pin of the agent's bytes (required with agent_url)
    [guest.templates]             # replace built-in templates by name
    "banger-network-bootstrap" = "my-network.j2"

A recipe without a ``[guest]`` table gets no guest set (``Recipe.guest`` is
None), exactly as one with ``agents = false``.

Every value that later steps may find fault with keeps its ``Where`` (the
entries' ``where``/``dest_where``/``owner_where``, ``image_where``,
``platform_where``, ``size_where``, the kernel's per-key wheres), so an error
found at build time still points at the recipe line that caused it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger_build import builtins
from banger_build import guest as guest_set
from banger_build.builtins import Builtin
from banger_build.entries import Where as Where
from banger_build.errors import InputError, Reason, RecipeError
from banger_build.oci.reference import Platform, Reference
from banger_build.schema import (
    ARRAY_OF_TABLES,
    BOOLEAN,
    INTEGER,
    MAX_BYTES,
    STRING,
    TABLE,
    Doc,
    Key,
    Schema,
    check_table,
    convert_platform,
    convert_reference,
    convert_sha256,
    format_size,
    show,
)
from banger_build.schema import Invalid as Invalid
from banger_build.schema import parse_bytes as parse_bytes
from banger_build.sources import SourceRefused, SourceRoots
from banger_build.tomlpos import KeyPath, parse_toml, read_toml_text

RECIPE_VERSION = 1


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
    """A ``[[files]]`` entry: the bytes from exactly one of ``src``, ``ref``, ``url``."""

    src: Path | None  # absolute and resolved, inside the recipe's source roots
    dest: str  # absolute, normalised guest path
    mode: int | None  # None: the source's executable bit decides (0755 or 0644)
    owner: str  # "uid:gid", numbers or names resolved from the image
    sha256: str | None  # 64 lowercase hex (always given with ``url``)
    where: Where  # the entry's ``src``, ``ref`` or ``url`` key
    dest_where: Where | None = None  # the entry's ``dest`` key
    owner_where: Where | None = None  # the entry's ``owner`` key (``dest`` when defaulted)
    replace: bool = False  # may replace a symlink the image has at ``dest``
    ref: Reference | None = None  # a file artifact (``banger-build file push``)
    url: str | None = None  # an http(s) URL, its bytes pinned by ``sha256``


@dataclass(frozen=True)
class TemplateSpec:
    src: Path | Builtin  # a file of the recipe's project, or ``builtin:NAME`` (package data)
    dest: str
    mode: int
    owner: str
    where: Where  # the entry's ``src`` key
    dest_where: Where | None = None
    owner_where: Where | None = None
    replace: bool = False


@dataclass(frozen=True)
class SymlinkSpec:
    dest: str
    target: str
    owner: str
    where: Where  # the entry's ``dest`` key
    owner_where: Where | None = None
    replace: bool = False


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
    path_where: Where | None = None  # the kernel.path key
    initrd_where: Where | None = None
    modules_where: Where | None = None
    install_modules_where: Where | None = None


@dataclass(frozen=True)
class TemplateOverride:
    """``[guest.templates]``: a recipe template replacing the built-in one ``name``."""

    name: str
    src: Path | Builtin
    where: Where  # the override's key


@dataclass(frozen=True)
class GuestSpec:
    """``[guest]`` with ``agents = true``: inject the built-in set (``banger_build.guest``)."""

    agent: Path | None  # the banger-vsock-agent binary; None: agent_ref, agent_url or built in
    agent_sha256: str | None
    templates: tuple[TemplateOverride, ...]  # in file order
    where: Where  # the guest.agent, agent_ref or agent_url key, else the [guest] table
    table_where: Where | None = None  # the [guest] table: where the built-in entries point
    agent_ref: Reference | None = None  # a file artifact (or an index of one per platform)
    agent_url: str | None = None  # pinned by agent_sha256


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
    platform_where: Where | None = None  # image.platform, else image.ref (the default's cause)
    size_where: Where | None = None  # rootfs.size, else None (the default "auto")
    #: where sources may lie (None for a Recipe built by hand: its project's root)
    sources: SourceRoots | None = None

    @property
    def source_roots(self) -> SourceRoots:
        return self.sources or SourceRoots.for_recipe(self.path)


# -- the recipe's own converters -----------------------------------------------------


@dataclass(frozen=True)
class RecipeDoc(Doc):
    """A recipe being checked: a ``Doc`` that knows where its sources may lie."""

    sources: SourceRoots = SourceRoots(())


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
#: The largest image, fixed or auto's headroom. The image is one file on the build
#: host, and ext4 (the usual host filesystem) holds files of at most 16 TiB - 4 KiB
#: with 4 KiB blocks (extents address 2^32 - 1 blocks): 16 TiB fails with EFBIG.
#: ext4 *inside* the image (4 KiB blocks, 64bit) could reach 1 EiB, but at our
#: inode ratio (16 KiB) anything above 64 TiB wants more than ext4's 2^32 inodes,
#: and no microVM root filesystem needs terabytes. A host filesystem with a smaller
#: file size limit still fails, at build time (EFBIG).
MAX_IMAGE_SIZE = (16 << 40) - 4096
_MIN_FIXED = 8 << 20
_OCTAL = re.compile(r"[0-7]{1,6}")
_OWNER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "no change"
_PATH_MAX = 4095
_NAME_MAX = 255


def convert_version(value: int, doc: Doc) -> int:
    if value != RECIPE_VERSION:
        raise Invalid(
            f"unsupported version {value} (this banger-build reads version {RECIPE_VERSION})"
        )
    return value


def convert_name(value: str, doc: Doc) -> str:
    if not _NAME.fullmatch(value):
        raise Invalid(
            f"invalid name {show(value)} (1-100 characters of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit)"
        )
    return value


def convert_size(value: str | int, doc: Doc) -> SizeSpec:
    if isinstance(value, int):
        if value < 0 or value > MAX_BYTES:
            raise Invalid(f"invalid size {value} (expected a positive number of bytes)")
        auto, n = False, value
    elif value == "auto":
        auto, n = True, 0
    elif value.startswith("auto+"):
        auto, n = True, parse_bytes(value[len("auto+") :])
    else:
        auto, n = False, parse_bytes(value)
    if n > MAX_IMAGE_SIZE:
        raise Invalid(
            f"size {show(str(value))} is too large: an image is at most 16 TiB - 4 KiB "
            f"({MAX_IMAGE_SIZE} bytes, the largest file ext4 holds on the build host)"
        )
    if auto:
        return SizeSpec("auto" if n == 0 else f"auto+{format_size(n)}", True, n)
    if n % 4096 or n < _MIN_FIXED:
        raise Invalid(
            f"invalid size {show(str(value))} ({n} bytes): a fixed size must be a multiple of "
            '4096 bytes and at least 8MiB (or use "auto" / "auto+<size>")'
        )
    return SizeSpec(format_size(n), False, n)


def convert_mode(value: str | int, doc: Doc) -> int:
    if isinstance(value, str):
        if not _OCTAL.fullmatch(value):
            raise Invalid(f'invalid mode {show(value)} (expected octal digits such as "0644")')
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
            f'invalid owner {show(value)} (expected "uid:gid" with numbers or names, '
            'such as "0:0" or "root:adm")'
        )
    return value


def _no_control(value: str, what: str) -> None:
    for ch, name in (("\0", "NUL"), ("\n", "newline"), ("\r", "carriage return")):
        if ch in value:
            raise Invalid(f"{what} {show(value)} contains a {name}")


def convert_dest(value: str, doc: Doc) -> str:
    """A guest path: absolute, normalised, not "/", carryable by debugfs."""
    _no_control(value, "dest")
    if not value.startswith("/"):
        raise Invalid(f'dest {show(value)} is not an absolute path (start it with "/")')
    if value == "/":
        raise Invalid('dest "/" is the root directory itself')
    if value.endswith("/"):
        raise Invalid(f'dest {show(value)} ends with "/" (name the file)')
    components = value[1:].split("/")
    if "" in components:
        raise Invalid(f'dest {show(value)} contains "//"')
    for part in components:
        if part in (".", ".."):
            raise Invalid(f"dest {show(value)} is not normalised (contains {part!r})")
        if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX:
            raise Invalid(f"dest {show(value)} has a component longer than {_NAME_MAX} bytes")
    if len(value.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise Invalid(f"dest {show(value)} is longer than {_PATH_MAX} bytes")
    return value


def convert_target(value: str, doc: Doc) -> str:
    if not value:
        raise Invalid("symlink target is empty")
    _no_control(value, "target")
    if len(value.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise Invalid(f"target is longer than {_PATH_MAX} bytes")
    return value


def convert_src(value: str, doc: Doc) -> Path:
    """A host path relative to the recipe's directory -> absolute and resolved, inside
    the recipe's source roots (``sources.py``); it need not exist yet."""
    if not value:
        raise Invalid("path is empty")
    if "\0" in value:
        raise Invalid(f"path {show(value)} contains a NUL")
    if value.startswith(builtins.PREFIX):
        raise Invalid(
            f"{show(value)}: {builtins.PREFIX} names a built-in template, which only "
            "[[templates]] src and [guest.templates] take"
        )
    assert isinstance(doc, RecipeDoc)
    try:
        return doc.sources.check(Path(doc.base, value))
    except SourceRefused as exc:
        raise Invalid(exc.message, exc.reason) from None


def convert_template_src(value: str, doc: Doc) -> Path | Builtin:
    """``builtin:NAME``: a built-in template (``builtins.py``); else a path, as ``src``."""
    if not value.startswith(builtins.PREFIX):
        return convert_src(value, doc)
    try:
        return builtins.parse(value[len(builtins.PREFIX) :])
    except builtins.UnknownBuiltin as exc:
        raise Invalid(str(exc), Reason.TEMPLATE_MISSING) from None


_MAX_URL = 2048


def convert_url(value: str, doc: Doc) -> str:
    """An http(s) URL with a host, without credentials or a fragment; kept as written."""
    if len(value) > _MAX_URL:
        raise Invalid(f"url is longer than {_MAX_URL} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise Invalid(f"url {show(value)} contains whitespace or a control character")
    parts = urllib.parse.urlsplit(value)
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "it must start with https:// (or http:// for a loopback or insecure host)"
    elif not parts.hostname:
        problem = "it has no host"
    elif parts.username is not None or parts.password is not None:
        problem = "credentials do not belong in a URL (it is recorded in manifest.json)"
    elif parts.fragment:
        problem = "a fragment (#...) is never sent to the server"
    else:
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            problem = "it has an invalid port"
    if problem:
        raise Invalid(f"invalid url {show(value)}: {problem}")
    return value


# -- the recipe schema --------------------------------------------------------------

_DEST = Key(
    (STRING,), required=True, convert=convert_dest,
    doc="the absolute path in the image; missing parent directories are made (0755, root)",
    example='dest = "/etc/motd"',
)  # fmt: skip
_MODE = Key(
    (STRING, INTEGER), convert=convert_mode, int_prefix="0o", default='"0644"',
    doc="permission bits, octal: a string, or an integer written `0o644`",
    example='mode = "0755"',
)  # fmt: skip
_OWNER = Key(
    (STRING,), convert=convert_owner, default='"0:0"',
    doc="`USER:GROUP`, numbers or names from the image's /etc/passwd and /etc/group",
    example='owner = "root:adm"',
)  # fmt: skip
_REPLACE = Key(
    (BOOLEAN,), default="false",
    doc="`true`: the image may have a symlink at `dest`, which this entry replaces "
    "(without it, that is an error: writing there would silently drop the link)",
    example="replace = true",
)  # fmt: skip
_SRC = Key(
    (STRING,), required=True, convert=convert_src,
    doc="the file to copy, relative to the recipe; it must lie in the recipe's project "
    "(or an `--allow-source` directory)",
    example='src = "files/motd"',
)  # fmt: skip
_ONE_OF = "exactly one of `src`, `ref` and `url`"
_FILE_SRC = dataclasses.replace(_SRC, required=False, default=_ONE_OF)
_TEMPLATE_DOC = (
    "a Jinja2 template relative to the recipe, or `builtin:NAME` (see Built-in templates); "
    "rendered from `[vars]` and `recipe.*`"
)
_TEMPLATE_SRC = Key(
    (STRING,), required=True, convert=convert_template_src, doc=_TEMPLATE_DOC,
    example='src = "builtin:hostname.j2"',
)  # fmt: skip
_TEMPLATE_SRC_OPT = Key((STRING,), convert=convert_template_src)

TEMPLATE_SCHEMA: Schema = {
    "src": _TEMPLATE_SRC,
    "dest": _DEST,
    "mode": _MODE,
    "owner": _OWNER,
    "replace": _REPLACE,
}
FILE_SCHEMA: Schema = {
    "src": _FILE_SRC,
    "ref": Key(
        (STRING,), convert=convert_reference, default=_ONE_OF,
        doc="a file artifact in a registry (`banger-build file push` makes one; an index of "
        "them per platform gives the recipe's), fetched into the blob cache and pinned in "
        "the lock file's `[[file]]` entries; its mode is the pushed file's unless `mode` says",
        example='ref = "registry.example/tools/jq:1.7"',
    ),
    "url": Key(
        (STRING,), convert=convert_url, default=_ONE_OF,
        doc="an `https://` URL (`http://` only for loopback and `--insecure-registry` hosts), "
        "fetched into the blob cache; needs `sha256` (no hash, no build); mode 0644 unless "
        "`mode` says",
        example='url = "https://example.com/jq-linux-amd64"',
    ),
    "dest": _DEST,
    "mode": dataclasses.replace(
        _MODE,
        default='"0755" if the source is executable, else "0644"',
        doc="permission bits, octal: a string, or an integer written `0o644`; without it the "
        "source's executable bit decides (the bit git keeps)",
    ),
    "owner": _OWNER,
    "sha256": Key(
        (STRING,), convert=convert_sha256, default="none (required with `url`)",
        doc="pin the file's bytes: a build of other bytes fails (`sha256-mismatch`)",
        example='sha256 = "<64 hex digits>"',
    ),
    "replace": _REPLACE,
}  # fmt: skip
SYMLINK_SCHEMA: Schema = {
    "dest": dataclasses.replace(_DEST, example='dest = "/etc/issue.net"', doc="the link's path"),
    "target": Key(
        (STRING,), required=True, convert=convert_target,
        doc="what the link points at, as written (absolute or relative)",
        example='target = "/etc/motd"',
    ),
    "owner": _OWNER,
    "replace": _REPLACE,
}  # fmt: skip

GUEST_SCHEMA: Schema = {
    "agents": Key(
        (BOOLEAN,), default="true",
        doc="`false`: no guest set at all (as without a `[guest]` table)",
        example="agents = false",
    ),
    "agent": Key(
        (STRING,), convert=convert_src,
        default="the built-in agent for the recipe's platform",
        doc="the banger-vsock-agent binary, relative to the recipe; without it (and "
        "without `agent_ref` or `agent_url`), the one the package ships for the "
        "platform's architecture (`agents/build` makes them before the package is "
        "built: amd64, arm64)",
        example='agent = "bin/banger-vsock-agent"',
    ),
    "agent_ref": Key(
        (STRING,), convert=convert_reference, default="none",
        doc="the agent as a file artifact in a registry, as `[[files]] ref`: an index of "
        "one per platform (`banger-build file push --platform`) gives the recipe's "
        "platform its own; pinned in the lock file's `[[file]]` entries",
        example='agent_ref = "registry.example/banger/vsock-agent:1"',
    ),
    "agent_url": Key(
        (STRING,), convert=convert_url, default="none",
        doc="the agent from a URL, as `[[files]] url`; needs `agent_sha256`",
        example='agent_url = "https://example.com/banger-vsock-agent-amd64"',
    ),
    "agent_sha256": Key(
        (STRING,), convert=convert_sha256, default="none (required with `agent_url`)",
        doc="pin the agent's bytes", example='agent_sha256 = "<64 hex digits>"',
    ),
    # built-in template name -> the recipe's replacement
    "templates": Key(
        (TABLE,), table={n: _TEMPLATE_SRC_OPT for n in guest_set.TEMPLATE_NAMES},
        default="the built-in ones",
        doc="replace a template of the guest set by name ("
        + ", ".join(f"`{n}`" for n in guest_set.TEMPLATE_NAMES)
        + ") with a template file or `builtin:NAME`",
        example='templates."banger-network-bootstrap" = "my-network.j2"',
    ),
}  # fmt: skip

_PATH_ONLY = "not with `ref`"
RECIPE_SCHEMA: Schema = {
    "version": Key(
        (INTEGER,), convert=convert_version, default="1",
        doc="the recipe format (this banger-build reads 1)", example="version = 1",
    ),
    "name": Key(
        (STRING,), convert=convert_name, default="from `image.ref`: `REPO-TAG`",
        doc="names the store path (`<key>-<name>`) and the bundle; 1-100 of "
        "`A-Z a-z 0-9 . _ + -`",
        example='name = "debian-bookworm"',
    ),
    "image": Key(
        (TABLE,),
        required=True,
        doc="the OCI image the root filesystem starts from",
        table={
            "ref": Key(
                (STRING,), required=True, convert=convert_reference,
                doc="`REGISTRY/REPO:TAG` or `...@sha256:...` (`debian:bookworm` is "
                "`docker.io/library/debian:bookworm`); a tag is pinned in the lock file",
                example='ref = "docker.io/library/debian:bookworm"',
            ),
            "platform": Key(
                (STRING,), convert=convert_platform, default='"linux/amd64"',
                doc="`OS/ARCH[/VARIANT]` taken from a multi-platform image "
                "(`--platform` overrides it)",
                example='platform = "linux/arm64"',
            ),
        },
    ),
    "rootfs": Key(
        (TABLE,),
        default='`size = "auto"`',
        doc="the ext4 image",
        table={
            "size": Key(
                (STRING, INTEGER), convert=convert_size, default='"auto"',
                doc='`"auto"` (what the files need), `"auto+SIZE"` (plus free space) or a '
                'fixed `"SIZE"` (a multiple of 4 KiB, 8 MiB to 16 TiB - 4 KiB); units '
                "B, K/KiB, M/MiB, G/GiB, T/TiB, all binary",
                example='size = "auto+256MiB"',
            )
        },
    ),
    "kernel": Key(
        (TABLE,),
        default="no kernel",
        doc="a kernel staged beside rootfs.ext4 (vmlinux, initrd.img, modules), "
        "for `boot` and banger: exactly one of `path` and `ref`",
        table={
            "path": Key(
                (STRING,), convert=convert_src, default="this or `ref`",
                doc="a local kernel image (vmlinux or vmlinuz)",
                example='path = "/boot/vmlinuz-6.1.0-13-amd64"',
            ),
            "ref": Key(
                (STRING,), convert=convert_reference, default="this or `path`",
                doc="a kernel artifact pushed by `banger-build kernel push`, pinned in "
                "the lock file's `[[kernel]]` entries",
                example='ref = "registry.example/kernels/vmlinux:6.1"',
            ),
            "initrd": Key(
                (STRING,), convert=convert_src, default="none",
                doc=f"an initrd ({_PATH_ONLY})", example='initrd = "initrd.img"',
            ),
            "modules": Key(
                (STRING,), convert=convert_src, default="none",
                doc="a `lib/modules/<version>` directory (holding `modules.order` or "
                "`kernel/`; given a directory with one such below it, e.g. an unpacked "
                f"kernel package, that one), or a tarball staged as is ({_PATH_ONLY})",
                example='modules = "/lib/modules/6.1.0-13-amd64"',
            ),
            "install_modules": Key(
                (BOOLEAN,), default="false",
                doc="also copy the modules into the image at `/lib/modules/<version>`, "
                "with the `modules.dep` and indexes modprobe reads, generated from them",
                example="install_modules = true",
            ),
        },
    ),
    "vars": Key(
        (TABLE,), default="none",
        doc="template variables: any TOML values (`--var KEY=VALUE` overrides one)",
        example='vars.hostname = "banger"',
    ),  # free-form template variables
    "files": Key(
        (ARRAY_OF_TABLES,), default="none", table=FILE_SCHEMA,
        doc="files copied into the image", example="[[files]]",
    ),
    "templates": Key(
        (ARRAY_OF_TABLES,), default="none", table=TEMPLATE_SCHEMA,
        doc="templates rendered into the image", example="[[templates]]",
    ),
    "symlinks": Key(
        (ARRAY_OF_TABLES,), default="none", table=SYMLINK_SCHEMA,
        doc="symbolic links made in the image", example="[[symlinks]]",
    ),
    "guest": Key(
        (TABLE,), table=GUEST_SCHEMA, default="no guest set",
        doc="banger's guest set: the vsock agent, network and first-boot units and "
        "scripts (see The guest set and booting)",
        example="[guest]",
    ),
}  # fmt: skip

DEFAULT_PLATFORM = Platform("linux", "amd64")
DEFAULT_SIZE = SizeSpec("auto", True, 0)
DEFAULT_MODE = 0o644
DEFAULT_OWNER = "0:0"


def load_recipe(path: Path, *, source_roots: Iterable[Path] = ()) -> Recipe:
    """Read, parse and validate a recipe. Every problem is a ``RecipeError``.

    Sources must lie in the recipe's project (``sources.project_root``) or in
    one of ``source_roots`` (``--allow-source``), never on /proc, /sys, /dev.
    """
    path = Path(path)
    text = read_toml_text(path, what="recipe")
    data, index = parse_toml(text, file=str(path))
    try:
        base = path.absolute().parent  # relative sources start here
        sources = SourceRoots.for_recipe(path, source_roots)
    except OSError as exc:
        raise RecipeError(
            f"cannot resolve the recipe's directory: {exc.strerror or exc}",
            file=str(path),
            reason=Reason.IO,
        ) from exc
    doc = RecipeDoc(str(path), index, base, tuple(text.splitlines()), sources)
    checked = check_table(doc, data, RECIPE_SCHEMA)
    return _build(path, doc, checked)


def _build(path: Path, doc: RecipeDoc, v: dict[str, Any]) -> Recipe:
    image = v["image"]
    ref: Reference = image["ref"]
    name = v.get("name") or _default_name(ref)
    rootfs = v.get("rootfs", {})

    kernel = None
    if "kernel" in v:
        kernel = _kernel(doc, v["kernel"])

    def owner_where(section: str, i: int, entry: dict[str, Any]) -> Where:
        return doc.where((section, i, "owner" if "owner" in entry else "dest"))

    files = tuple(
        FileSpec(
            e.get("src"),
            e["dest"],
            e.get("mode"),
            e.get("owner", DEFAULT_OWNER),
            e.get("sha256"),
            doc.where(("files", i, _one_source(doc, ("files", i), e, FILE_SOURCES))),
            doc.where(("files", i, "dest")),
            owner_where("files", i, e),
            replace=e.get("replace", False),
            ref=e.get("ref"),
            url=e.get("url"),
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
            doc.where(("templates", i, "dest")),
            owner_where("templates", i, e),
            replace=e.get("replace", False),
        )
        for i, e in enumerate(v.get("templates", ()))
    )
    symlinks = tuple(
        SymlinkSpec(
            e["dest"],
            e["target"],
            e.get("owner", DEFAULT_OWNER),
            doc.where(("symlinks", i, "dest")),
            owner_where("symlinks", i, e),
            replace=e.get("replace", False),
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
        platform_where=doc.where(("image", "platform" if "platform" in image else "ref")),
        size_where=doc.where(("rootfs", "size")) if "size" in rootfs else None,
        sources=doc.sources,
    )


def _kernel(doc: Doc, k: dict[str, Any]) -> KernelSpec:
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

    def key_where(name: str) -> Where | None:
        return doc.where(("kernel", name)) if name in k else None

    return KernelSpec(
        k.get("path"),
        k.get("initrd"),
        k.get("modules"),
        doc.where(("kernel",)),
        install,
        ref=k.get("ref"),
        ref_where=key_where("ref"),
        path_where=key_where("path"),
        initrd_where=key_where("initrd"),
        modules_where=key_where("modules"),
        install_modules_where=key_where("install_modules"),
    )


#: where a ``[[files]]`` entry's bytes come from, and the key that must come with each
FILE_SOURCES = {"src": None, "ref": None, "url": "sha256"}
AGENT_SOURCES = {"agent": None, "agent_ref": None, "agent_url": "agent_sha256"}


def _one_source(
    doc: Doc, table: KeyPath, entry: Mapping[str, Any], sources: Mapping[str, str | None]
) -> str:
    """The one key of ``sources`` that ``entry`` gives (with the key it needs), else a
    RecipeError; for ``[guest]`` (``AGENT_SOURCES``) none at all is fine: ''."""
    given = [k for k in sources if k in entry]
    keys = [f"`{k}`" for k in sources]
    names = f"{', '.join(keys[:-1])} and {keys[-1]}"
    if len(given) > 1:
        raise doc.error(
            (*table, given[1]),
            f"give one of {names}, not both {given[0]} and {given[1]}",
            Reason.CONFLICTING_KEYS,
        )
    if not given:
        if sources is AGENT_SOURCES:
            return ""
        raise doc.error(
            (*table, "src"),
            "missing required key 'src' (a file of the project), 'ref' (a file artifact "
            "in a registry) or 'url' (with its sha256)",
            Reason.MISSING_KEY,
            at=table,
        )
    needs = sources[given[0]]
    if needs is not None and needs not in entry:
        raise doc.error(
            (*table, given[0]),
            f"needs {needs}: the sha256 of the bytes it serves (no hash, no build; "
            "`sha256sum FILE` prints it)",
            Reason.MISSING_KEY,
        )
    return given[0]


def _guest(doc: Doc, g: dict[str, Any] | None) -> GuestSpec | None:
    """``[guest]`` -> GuestSpec, or None when absent or switched off."""
    if g is None or not g.get("agents", True):
        return None
    overrides = tuple(
        TemplateOverride(name, src, doc.where(("guest", "templates", name)))
        for name, src in g.get("templates", {}).items()
    )
    source = _one_source(doc, ("guest",), g, AGENT_SOURCES)
    return GuestSpec(
        g.get("agent"),
        g.get("agent_sha256"),
        overrides,
        doc.where(("guest", source) if source else ("guest",)),
        doc.where(("guest",)),
        agent_ref=g.get("agent_ref"),
        agent_url=g.get("agent_url"),
    )


def _check_guest_dests(doc: Doc, v: dict[str, Any]) -> None:
    """The recipe's own entries may not write a path of the built-in set (nor above/below one)."""
    for section in ("files", "templates", "symlinks"):
        for i, entry in enumerate(v.get(section, ())):
            dest: str = entry["dest"]
            builtin = guest_set.conflicting_dest(dest)
            if builtin is None:
                continue
            if builtin == dest:
                clash = f"dest {show(dest)} is written by the built-in guest set"
            elif builtin.startswith(dest + "/"):
                clash = f"dest {show(dest)} holds {show(builtin)} of the built-in guest set"
            else:
                clash = f"dest {show(dest)} is inside {show(builtin)} of the built-in guest set"
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
                    key, f"duplicate dest {show(dest)}: already used by {w}", Reason.DUPLICATE_DEST
                )


@dataclass(frozen=True)
class Overrides:
    """Command-line changes to a recipe: ``--var KEY=VALUE`` (over ``[vars]``) and
    ``--platform`` (over ``image.platform``); they enter the derivation like the
    recipe's own values."""

    vars: tuple[tuple[str, Any], ...] = ()
    platform: Platform | None = None


def parse_var(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE as a TOML value when it reads as one (``1024``, ``true``,
    ``"text"``, ``[1, 2]``), else as the string it is. ValueError if malformed."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", key):
        raise ValueError(f"--var {text[:80]!r}: expected KEY=VALUE with KEY a [vars] name")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(recipe: Recipe, overrides: Overrides) -> Recipe:
    """``recipe`` with ``overrides``; a guest-set variable gets the same checks as in
    the file, reported as the command-line option it came from."""
    if not overrides.vars and overrides.platform is None:
        return recipe
    variables = dict(recipe.vars)
    for name, value in overrides.vars:
        check = guest_set.VARS.get(name)
        problem = check(value) if check is not None and recipe.guest is not None else None
        if problem is not None:
            raise InputError(f"--var {name}: {problem}", reason=Reason.VALUE)
        variables[name] = value
    return dataclasses.replace(
        recipe,
        vars=variables,
        platform=overrides.platform or recipe.platform,
    )
