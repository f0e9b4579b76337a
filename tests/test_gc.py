"""gc and ls on real builds: roots are kept, paths in use are kept, the rest is freed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from banger_build.store import Store
from tests.support.e2e import BASE, run_cli, write_recipe
from tests.support.oci import Entry, make_layer, push_image
from tests.support.registry import RegistryServer


def _build(tmp: Path, home: Path, registry: RegistryServer, tag: str, *link: str) -> Path:
    repo = "gc/img"
    push_image(registry.url, repo, tag, [make_layer([*BASE, Entry.file("tag", tag.encode())])])
    recipe = write_recipe(tmp / tag, f"{registry.host}/{repo}:{tag}")
    recipe.write_text('name = "gcimg"\n' + recipe.read_text())  # one name, several builds
    code, out, err = run_cli(home, str(recipe), *(link or ("--no-link",)))
    assert code == 0, err
    return Path(out.strip())


@pytest.fixture
def three(tmp_path: Path, registry: RegistryServer) -> tuple[Path, list[Path]]:
    home = tmp_path / "home"
    rooted = _build(tmp_path, home, registry, "t1", "-o", str(tmp_path / "result"))
    others = [_build(tmp_path, home, registry, t) for t in ("t2", "t3")]
    for i, path in enumerate([rooted, *others]):  # distinct, ordered build times
        meta = home / "meta" / f"{path.name}.json"
        data = json.loads(meta.read_text())
        data["time"] = int(time.time()) - 3600 * (3 - i)
        meta.write_text(json.dumps(data))
    return home, [rooted, *others]


def test_gc_keeps_roots_and_frees_the_rest(tmp_path: Path, three: tuple[Path, list[Path]]) -> None:
    home, (rooted, old, new) = three
    blobs_before = len(list((home / "blobs" / "sha256").iterdir()))
    code, out, _ = run_cli(home, "gc", "--dry-run")
    assert code == 0 and f"would delete {old}" in out and old.exists() and new.exists()
    code, out, _ = run_cli(home, "gc")
    assert code == 0 and "freed" in out
    assert rooted.exists() and not old.exists() and not new.exists()
    assert len(list((home / "blobs" / "sha256").iterdir())) < blobs_before
    # the rooted path's image is still buildable offline: its blobs were kept
    manifest = json.loads((rooted / "manifest.json").read_text())
    for layer in manifest["image"]["layers"]:
        assert (home / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()
    # removing the out-link makes it garbage; a dry run changes nothing, roots included
    os.unlink(tmp_path / "result")
    roots = sorted((home / "gcroots").iterdir())
    run_cli(home, "gc", "--dry-run")
    assert rooted.exists() and sorted((home / "gcroots").iterdir()) == roots
    run_cli(home, "gc")
    assert not rooted.exists() and list((home / "gcroots").iterdir()) == []


def test_gc_never_touches_a_path_whose_build_holds_the_lock(three: tuple[Path, list[Path]]) -> None:
    home, (_, old, new) = three
    store = Store(home)
    with store.key_lock(old.name.split("-")[0]):
        code, out, _ = run_cli(home, "gc")
    assert code == 0 and old.exists() and not new.exists()
    assert f"kept {old}: in use" in out
    # the kept path's blobs stay: it still refers to them
    manifest = json.loads((old / "manifest.json").read_text())
    for layer in manifest["image"]["layers"]:
        assert (home / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()


def test_gc_selection_options(three: tuple[Path, list[Path]]) -> None:
    home, (rooted, old, new) = three
    assert run_cli(home, "gc", "--older-than", "90m")[0] == 0  # old is 2h old, new 1h
    assert not old.exists() and new.exists() and rooted.exists()


def test_gc_keep_last_and_max_size(three: tuple[Path, list[Path]]) -> None:
    home, (rooted, old, new) = three
    assert run_cli(home, "gc", "--keep-last", "1")[0] == 0  # the newest unrooted of a name
    assert not old.exists() and new.exists()
    assert run_cli(home, "gc", "--max-size", "1TiB")[0] == 0
    assert new.exists()
    assert run_cli(home, "gc", "--max-size", "0")[0] == 0
    assert not new.exists() and rooted.exists()


def test_ls_lists_name_size_time_recipe_and_roots(three: tuple[Path, list[Path]]) -> None:
    home, (rooted, old, _) = three
    code, out, _ = run_cli(home, "ls", "--json")
    rows = {r["path"]: r for r in json.loads(out)}
    assert rows[str(rooted)]["rooted"] and not rows[str(old)]["rooted"]
    assert rows[str(old)]["recipe"].endswith("recipe.toml") and rows[str(old)]["size"] > 0
    code, out, _ = run_cli(home, "ls")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["STORE", "PATH", "SIZE", "BUILT", "ORIGIN", "RECIPE"]
    (row,) = [line for line in lines if rooted.name in line]
    assert row.split()[:2] == ["*", rooted.name] and "built" in row
    # the columns line up: every row's BUILT starts where the header's does
    column = header.index("BUILT")
    rows = [line for line in lines if not line.startswith("(")]
    assert len(rows) == 3 and all(line[column : column + 4].isdigit() for line in rows)


def test_ls_of_a_home_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "nothing-here"
    code, out, err = run_cli(home, "ls")
    assert code == 0 and out == "" and "no store" in err and not home.exists()
    assert run_cli(home, "ls", "--json")[1].strip() == "[]" and not home.exists()
