"""The README's recipe reference is what the schema generates (scripts/gen-reference),
every recipe key is documented, and the README names only files the repository has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from banger_build import recipedoc
from banger_build.recipe import RECIPE_SCHEMA
from banger_build.schema import ARRAY_OF_TABLES, TABLE

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_the_readme_names_only_files_the_repository_has() -> None:
    text = README.read_text()
    assert "DESIGN.md" not in text
    named = set(re.findall(r"`((?:scripts|examples|recipes|banger_build|tests|agents|templates)"
                           r"/[\w./-]+)`", text))  # fmt: skip
    assert "banger_build/bundle.py" in named
    made = (".lock",)  # lock files are written by the first build (the quick start's)
    missing = [n for n in sorted(named) if not (REPO / n).exists() and not n.endswith(made)]
    assert not missing, missing


def test_every_recipe_key_is_documented() -> None:
    for path, key in recipedoc.rows(RECIPE_SCHEMA):
        assert key.doc, f"{path}: no doc"
        if key.types not in ((TABLE,), (ARRAY_OF_TABLES,)):
            assert key.example, f"{path}: no example"
            assert key.required or key.default, f"{path}: no default"


def test_the_recipe_reference_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    start, end = text.index(recipedoc.BEGIN), text.index(recipedoc.END)
    assert text[start : end + len(recipedoc.END) + 1] == recipedoc.markdown(), (
        "the README's recipe reference is stale: run scripts/gen-reference"
    )
    for _, key in recipedoc.rows(RECIPE_SCHEMA):
        assert key.doc in text
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| `image.ref` |", "| `image.reference` |"))
    monkeypatch.setattr(recipedoc, "README", stale)
    assert recipedoc.main(["--check"]) == 1 and "image.reference" in stale.read_text()
    assert recipedoc.main([]) == 0 and stale.read_text() == text
    assert recipedoc.main(["--check"]) == 0
