"""Built-in templates (``builtin:NAME``) from a recipe outside the checkout: resolved
from the package data, recorded by the sha256 of what they render to."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from banger_build import builtins
from banger_build.errors import RecipeError
from banger_build.inputs import resolve_injected
from banger_build.recipe import load_recipe
from tests.support.e2e import run_cli
from tests.support.ext4read import read_image

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
[image]
ref = "{ref}"

[vars]
hostname = "elsewhere"

[[templates]]
src = "{src}"
dest = "/etc/hostname"

[[templates]]
src = "builtin:fstab.j2"
dest = "/etc/fstab"
"""


def outside(tmp_path: Path, ref: str, src: str = "builtin:hostname.j2") -> Path:
    directory = tmp_path / "project"
    directory.mkdir(exist_ok=True)
    assert not directory.resolve().is_relative_to(REPO)
    recipe = directory / "recipe.toml"
    recipe.write_text(RECIPE.format(ref=ref, src=src))
    return recipe


def test_the_built_in_templates_are_listed_with_the_guest_set() -> None:
    names = builtins.names()
    assert {"hostname.j2", "hosts.j2", "fstab.j2"} <= set(names)
    assert "guest/banger-network.service.j2" in names
    assert all(builtins.parse(n).file().is_file() for n in names)


def test_a_recipe_outside_the_checkout_builds_with_built_in_templates(
    tmp_path: Path, image_ref: str
) -> None:
    recipe = outside(tmp_path, image_ref)
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    seen = read_image(path / "rootfs.ext4")
    assert seen["etc/hostname"].sha256 == hashlib.sha256(b"elsewhere\n").hexdigest()
    rendered = {i.dest: i for i in resolve_injected(load_recipe(recipe))}
    assert seen["etc/fstab"].sha256 == rendered["/etc/fstab"].sha256
    assert rendered["/etc/fstab"].data is not None
    assert rendered["/etc/fstab"].data.startswith(b"# /etc/fstab: rendered by banger-build for ")
    derivation = json.loads((path / "manifest.json").read_text())["derivation"]
    assert "templates" not in json.dumps(derivation)  # no path of the package, only hashes
    # the same bytes from a copy of the template in the project: the same store key
    shutil.copy(REPO / "templates" / "hostname.j2", tmp_path / "project" / "mine.j2")
    copied = outside(tmp_path, image_ref, src="mine.j2")
    code, out2, err = run_cli(tmp_path / "home", str(copied), "--no-link")
    assert code == 0 and out2 == out, err


def test_a_guest_template_may_be_replaced_by_another_built_in_one(tmp_path: Path) -> None:
    (tmp_path / "agent").write_bytes(b"agent")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[image]\nref = "debian:bookworm"\n[vars]\nhostname = "h"\n[guest]\nagent = "agent"\n'
        '[guest.templates]\n"first-boot-pending" = "builtin:hostname.j2"\n'
    )
    items = {i.dest: i for i in resolve_injected(load_recipe(recipe))}
    assert items["/var/lib/banger/first-boot-pending"].data == b"h\n"


@pytest.mark.parametrize(
    ("src", "words"),
    [
        ("builtin:hostnme.j2", "no built-in template builtin:hostnme.j2 (did you mean "
         "builtin:hostname.j2? there are: fstab.j2, "),
        ("builtin:../pyproject.toml", "no built-in template builtin:../pyproject.toml"),
        ("builtin:guest/../hosts.j2", "no built-in template"),
    ],
)  # fmt: skip
def test_an_unknown_built_in_template_is_named_at_its_place(
    tmp_path: Path, src: str, words: str
) -> None:
    recipe = outside(tmp_path, "debian:bookworm", src=src)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert info.value.reason == "template-missing"
    assert str(info.value).startswith(f"{recipe}:8:1: templates[0].src: {words}")


def test_files_take_no_built_in_template(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[image]\nref = "debian:bookworm"\n[[files]]\nsrc = "builtin:hostname.j2"\ndest = "/x"\n'
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "files[0].src" in str(info.value) and "only [[templates]] src" in str(info.value)
