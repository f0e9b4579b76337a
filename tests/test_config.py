"""The user's config file and the substituter options."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger_build.config import Substituter, config_path, load_config, substituters
from banger_build.errors import InputError, RecipeError
from banger_build.signing.keys import SecretKey, parse_public_key

KEY_A = str(SecretKey.generate("ci-a").public)
KEY_B = str(SecretKey.generate("ci-b").public)


def test_the_config_file_scopes_its_keys_and_the_command_line_comes_first(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[[substituter]]\nurl = "ghcr.io/acme/cache"\ntrusted_keys = ["{KEY_A}"]\n\n'
        '[[substituter]]\nurl = "127.0.0.1:5000/mirror"\naccept_unsigned = true\n'
    )
    env = {"BANGER_BUILD_SUBSTITUTERS": "env.example/one", "BANGER_BUILD_TRUSTED_KEYS": KEY_B}
    found = substituters(["cli.example/r"], environ=env, config=config)
    assert [str(s) for s in found] == [
        "cli.example/r",
        "env.example/one",
        "ghcr.io/acme/cache",
        "127.0.0.1:5000/mirror",
    ]
    a, b = parse_public_key(KEY_A), parse_public_key(KEY_B)
    assert found[0].trusted_keys == (b,)  # global keys apply everywhere
    assert found[2].trusted_keys == (a, b)  # the file's only to its entry
    assert found[3] == Substituter("127.0.0.1:5000", "mirror", (b,), True)
    assert found[2].ref("sk-" + "0" * 32).tag == "sk-" + "0" * 32


def test_a_missing_config_file_is_no_substituter(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml") == []
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert config_path(env) == tmp_path / "banger-build" / "config.toml"
    assert substituters(environ=env) == ()


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ('[[substituter]]\nurl = "a.example/r:tag"\n', ":2:1: substituter[0].url", "without a tag"),
        ('[[substituter]]\nurl = "a.example/r"\ntrusted_keys = ["nope"]\n', ":3:", "NAME:BASE64"),
        ('[[substituter]]\nurl = "a.example/r"\ntrustedkeys = []\n', ":3:1:", "did you mean"),
        ("[[substituter]]\n", ":1:1: substituter[0].url", "missing required key"),
    ],
)
def test_config_mistakes_are_reported_at_their_place(
    tmp_path: Path, text: str, where: str, words: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_config(config)
    assert str(exc.value).startswith(str(config) + where) and words in str(exc.value)


def test_bad_command_line_values_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="without a tag or digest"):
        substituters(["a.example/r@sha256:" + "0" * 64], environ={}, config=tmp_path / "x")
    with pytest.raises(InputError, match="--trusted-key"):
        substituters(trusted_keys=["k:short"], environ={}, config=tmp_path / "x")
