"""The user's configuration: substituters and the keys trusted for each.

``$XDG_CONFIG_HOME/banger-build/config.toml`` (default ``~/.config``)::

    [[substituter]]
    url = "ghcr.io/acme/rootfs-cache"       # REGISTRY/REPO, no tag
    trusted_keys = ["acme-ci-1:BASE64..."]  # apply to this substituter only
    accept_unsigned = false                 # default

Substituters also come from ``--substituter REGISTRY/REPO`` (repeatable) and
``$BANGER_BUILD_SUBSTITUTERS`` (comma-separated), tried in that order before
the file's; keys from ``--trusted-key NAME:BASE64`` and
``$BANGER_BUILD_TRUSTED_KEYS`` apply to every substituter. The file is
checked like a recipe: a mistake is reported at ``file:line:col`` with its key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import InputError, Reason
from banger_build.oci.reference import Reference, ReferenceSyntaxError
from banger_build.schema import (
    ARRAY,
    ARRAY_OF_TABLES,
    BOOLEAN,
    STRING,
    Doc,
    Invalid,
    Key,
    check_table,
)
from banger_build.signing.keys import (
    ENV_TRUSTED_KEYS,
    PublicKey,
    parse_public_key,
    parse_trusted_keys,
)
from banger_build.tomlpos import parse_toml, read_toml_text

ENV_SUBSTITUTERS = "BANGER_BUILD_SUBSTITUTERS"


@dataclass(frozen=True)
class Substituter:
    """A registry repository holding pushed store paths (tags ``sk-<key>``)."""

    registry: str
    repository: str
    trusted_keys: tuple[PublicKey, ...] = ()
    accept_unsigned: bool = False

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"

    def ref(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag=tag)


def parse_repository(text: str) -> tuple[str, str]:
    """``REGISTRY/REPO`` (no tag, no digest) -> (registry, repository); ValueError."""
    try:
        ref = Reference.parse(text)
    except ReferenceSyntaxError as exc:
        raise ValueError(str(exc)) from None
    if ref.digest is not None or "@" in text or ":" in text.rsplit("/", 1)[-1]:
        raise ValueError(f"{text!r}: a substituter is REGISTRY/REPO, without a tag or digest")
    return ref.registry, ref.repository


def _convert_url(value: str, doc: Doc) -> tuple[str, str]:
    try:
        return parse_repository(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


SUBSTITUTER_SCHEMA: Mapping[str, Key] = {
    "url": Key((STRING,), required=True, convert=_convert_url),
    "trusted_keys": Key((ARRAY,)),
    "accept_unsigned": Key((BOOLEAN,)),
}
CONFIG_SCHEMA: Mapping[str, Key] = {
    "substituter": Key((ARRAY_OF_TABLES,), table=SUBSTITUTER_SCHEMA),
}


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "banger-build" / "config.toml"


def load_config(path: Path) -> list[Substituter]:
    """The substituters of a config file (none when it does not exist)."""
    if not path.exists():
        return []
    text = read_toml_text(path, what="config file")
    data, index = parse_toml(text, file=str(path))
    doc = Doc(str(path), index, path.parent, tuple(text.splitlines()))
    checked = check_table(doc, data, CONFIG_SCHEMA)
    out = []
    for i, entry in enumerate(checked.get("substituter", ())):
        keys: list[PublicKey] = []
        for j, text in enumerate(entry.get("trusted_keys", [])):
            at = ("substituter", i, "trusted_keys", j)
            if not isinstance(text, str):
                raise doc.error(at, "expected a string", Reason.TYPE)
            try:
                keys.append(parse_public_key(text))
            except InputError as exc:
                raise doc.error(at, str(exc), exc.reason) from None
        registry, repository = entry["url"]
        accept = bool(entry.get("accept_unsigned", False))
        out.append(Substituter(registry, repository, tuple(keys), accept))
    return out


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def substituters(
    urls: Iterable[str] = (),
    trusted_keys: Iterable[str] = (),
    *,
    accept_unsigned: bool = False,
    environ: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> tuple[Substituter, ...]:
    """Every substituter to try, in order: the command line's, the environment's,
    then the config file's; each with the keys it trusts."""
    env = os.environ if environ is None else environ
    global_keys = parse_trusted_keys(trusted_keys, env.get(ENV_TRUSTED_KEYS))
    found: list[Substituter] = []
    for url in [*urls, *_split(env.get(ENV_SUBSTITUTERS))]:
        try:
            registry, repository = parse_repository(url)
        except ValueError as exc:
            raise InputError(f"--substituter {exc}", reason=Reason.BAD_ARGUMENT) from None
        found.append(Substituter(registry, repository, (), accept_unsigned))
    found += load_config(config if config is not None else config_path(env))
    seen: set[str] = set()
    out = []
    for sub in found:
        if str(sub) in seen:
            continue
        seen.add(str(sub))
        keys = tuple(dict.fromkeys([*sub.trusted_keys, *global_keys]))
        out.append(
            Substituter(sub.registry, sub.repository, keys, sub.accept_unsigned or accept_unsigned)
        )
    return tuple(out)
