"""Recipe-caused errors found late still point at the recipe: every resolved entry
carries its ``Where``; the recipe keeps the positions of its image, platform and
size; and the recipe modules form no import cycle (``entries`` is a leaf).
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

import pytest

from banger_build.build import BuildOptions, build
from banger_build.derivation import derive
from banger_build.entries import Injected, Where
from banger_build.errors import Reason, RecipeError
from banger_build.inputs import resolve_injected, resolve_kernel
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor, ImageManifest
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest
from banger_build.recipe import load_recipe
from tests.support.e2e import BASE, push
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
[image]
ref = "debian:bookworm"
platform = "linux/amd64"

[rootfs]
size = "auto+64MiB"

[[files]]
src = "motd"
dest = "/etc/motd"
owner = "app:app"

[[templates]]
src = "t.j2"
dest = "/etc/t"

[[symlinks]]
dest = "/etc/link"
target = "motd"
owner = "root:adm"

[kernel]
path = "vmlinuz"
initrd = "initrd"

[guest]
agent = "agent"
[guest.templates]
"banger-first-boot" = "t.j2"
"""


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    for name, data in (("motd", b"hi\n"), ("t.j2", b"t\n"), ("agent", b"agent"),
                       ("vmlinuz", b"kernel"), ("initrd", b"initrd")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    return path


def line_of(path: Path, text: str) -> int:
    return path.read_text().splitlines().index(text) + 1


def test_every_injected_entry_knows_its_position(recipe_path: Path) -> None:
    f = str(recipe_path)
    items = {i.dest: i for i in resolve_injected(load_recipe(recipe_path))}
    motd = items["/etc/motd"]
    assert motd.where == Where(f, 10, 1, "files[0].dest")
    assert motd.owner_where == Where(f, 11, 1, "files[0].owner")
    t = items["/etc/t"]
    assert t.where == Where(f, 15, 1, "templates[0].dest")
    assert t.owner_where == t.where  # no owner given: the default is the entry's
    link = items["/etc/link"]
    assert link.where == Where(f, 18, 1, "symlinks[0].dest")
    assert link.owner_where == Where(f, 20, 1, "symlinks[0].owner")
    guest_line = line_of(recipe_path, "[guest]")
    agent = items["/usr/local/bin/banger-vsock-agent"]
    assert agent.where == Where(f, guest_line + 1, 1, "guest.agent")
    replaced = items["/usr/local/libexec/banger-first-boot"]
    assert replaced.where == Where(f, guest_line + 3, 1, "guest.templates.banger-first-boot")
    for dest in ("/etc/systemd/system/banger-network.service",
                 "/etc/systemd/system/multi-user.target.wants/banger-network.service"):  # fmt: skip
        assert items[dest].where == Where(f, guest_line, 1, "guest")
    assert all(i.where is not None and i.owner_where is not None for i in items.values())


def test_staged_kernel_files_and_recipe_values_know_their_position(recipe_path: Path) -> None:
    f = str(recipe_path)
    recipe = load_recipe(recipe_path)
    staged = {s.name: s for s in resolve_kernel(recipe.kernel, recipe.source_roots)}
    assert staged["vmlinux"].where == Where(f, 23, 1, "kernel.path")
    assert staged["initrd.img"].where == Where(f, 24, 1, "kernel.initrd")
    assert recipe.image_where == Where(f, 2, 1, "image.ref")
    assert recipe.platform_where == Where(f, 3, 1, "image.platform")
    assert recipe.size_where == Where(f, 6, 1, "rootfs.size")
    bare = recipe_path.with_name("bare.toml")
    bare.write_text('\n[image]\nref = "debian:bookworm"\n')
    plain = load_recipe(bare)
    assert plain.platform_where == Where(str(bare), 3, 1, "image.ref")  # the default's cause
    assert plain.size_where is None


def test_where_error_is_a_positioned_recipe_error() -> None:
    err = Where("r.toml", 9, 1, "files[0].owner").error("no such user", Reason.UNKNOWN_OWNER)
    assert isinstance(err, RecipeError)
    assert (err.file, err.line, err.col, err.key, err.reason) == (
        "r.toml", 9, 1, "files[0].owner", "unknown-owner",
    )  # fmt: skip
    assert str(err) == "r.toml:9:1: files[0].owner: no such user"


def test_positions_are_not_part_of_what_an_entry_is(tmp_path: Path) -> None:
    """Two recipes that differ only in layout give equal entries and the same key."""
    (tmp_path / "motd").write_text("hi\n")
    a = tmp_path / "a.toml"
    a.write_text('[image]\nref = "debian:bookworm"\n[[files]]\nsrc = "motd"\ndest = "/etc/m"\n')
    b = tmp_path / "b.toml"
    b.write_text(
        '# moved around\n\n[[files]]\ndest = "/etc/m"\nsrc = "motd"\n\n[image]\n'
        'ref = "debian:bookworm"\nplatform = "linux/amd64"\n'
    )
    ia, ib = resolve_injected(load_recipe(a)), resolve_injected(load_recipe(b))
    assert ia == ib and ia[0].where != ib[0].where
    image = ImageManifest(
        Digest("1" * 64), OCI_MANIFEST, Descriptor("application/json", Digest("2" * 64), 1), ()
    )

    def key(recipe_path: Path, items: tuple[Injected, ...]) -> str:
        recipe = load_recipe(recipe_path)
        return derive(recipe, image, diff_ids=(), injected=items, kernel=(), epoch=1).key

    assert key(a, ia) == key(b, ib)


def test_platform_mismatch_at_build_time_points_at_the_platform(
    tmp_path: Path, registry: RegistryServer
) -> None:
    push(registry, "positions/amd64", [BASE])
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[image]\nref = "{registry.host}/positions/amd64:v1"\nplatform = "linux/arm64"\n'
    )
    options = BuildOptions(home=tmp_path / "home", registry=RegistryOptions(), out_link=None)
    with pytest.raises(RecipeError) as info:
        build(recipe, options)
    err = info.value
    assert (err.reason, err.line, err.col, err.key) == ("platform-mismatch", 3, 1, "image.platform")
    assert str(err).startswith(f"{recipe}:3:1: image.platform: ")


# -- the module graph ---------------------------------------------------------------

RECIPE_SIDE = {
    "entries", "schema", "sources", "tomlpos", "recipe", "guest", "inputs", "templating",
    "lockfile", "derivation", "builtins",
}  # fmt: skip


def top_level_imports(path: Path) -> set[str]:
    """banger_build modules imported at module level (not under TYPE_CHECKING, not lazily)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("banger_build"):
            assert node.module is not None
            for alias in node.names:
                sub = REPO / (node.module.replace(".", "/") + f"/{alias.name}.py")
                out.add(f"{node.module}.{alias.name}" if sub.exists() else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("banger_build")}
    return {m.removeprefix("banger_build.") for m in out}


def test_recipe_modules_form_no_import_cycle() -> None:
    graph = {p.stem: top_level_imports(p) for p in (REPO / "banger_build").glob("*.py")}
    assert top_level_imports(REPO / "banger_build" / "entries.py") == {"errors"}
    assert top_level_imports(REPO / "banger_build" / "builtins.py") == {"errors"}
    assert top_level_imports(REPO / "banger_build" / "guest.py") == {"builtins", "errors"}
    for start in RECIPE_SIDE:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            module = stack.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module in seen or module not in graph:
                continue
            seen.add(module)
            stack.extend(graph[module])


def test_guest_templates_digest_unchanged() -> None:
    """The built-in templates are the same package data as before the move."""
    from banger_build import guest

    digest = hashlib.sha256()
    for t in guest.TEMPLATES:
        digest.update(guest.builtin_template(t.name).read_bytes())
    on_disk = hashlib.sha256()
    for t in guest.TEMPLATES:
        on_disk.update((REPO / "templates" / "guest" / f"{t.name}.j2").read_bytes())
    assert digest.hexdigest() == on_disk.hexdigest()


LATE = [
    # (extra recipe text, the key the error must point at, reason, words in the message)
    (
        '[[files]]\nsrc = "hello.txt"\ndest = "/etc/x"\nowner = "nobody:root"\n',
        "files[1].owner",
        "unknown-owner",
        "owner user 'nobody' is not defined in the image's /etc/passwd",
    ),
    (
        '[[files]]\nsrc = "hello.txt"\ndest = "/etc/passwd/x"\n',
        "files[1].dest",
        "dest-invalid",
        "/etc/passwd is not a directory in the image",
    ),
    (
        '[[files]]\nsrc = "hello.txt"\ndest = "/usr/bin"\n',
        "files[1].dest",
        "dest-is-directory",
        "the image has a directory there",
    ),
    (
        '[[symlinks]]\ndest = "/lost+found/x"\ntarget = "/etc/motd"\n',
        "symlinks[1].dest",
        "dest-invalid",
        "/lost+found belongs to the filesystem",
    ),
    (
        '[[templates]]\nsrc = "unit.j2"\ndest = "/lost+found"\n',
        "templates[1].dest",
        "dest-invalid",
        "/lost+found belongs to the filesystem",
    ),
]


@pytest.mark.parametrize(("extra", "key", "reason", "words"), LATE)
def test_late_errors_of_a_real_build_point_at_the_recipe_entry(
    tmp_path: Path, image_ref: str, extra: str, key: str, reason: str, words: str
) -> None:
    from tests.support.e2e import run_cli, write_recipe

    recipe = write_recipe(tmp_path / "r", image_ref, extra=extra)
    line = next(
        n
        for n, text in enumerate(recipe.read_text().splitlines(), 1)
        if text.startswith(key.rsplit(".", 1)[1] + " =") and n > _last_section_line(recipe, key)
    )
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "-q")
    assert code == 1 and out == ""
    *notes, error = err.splitlines()  # the lock file's new pin is reported first
    assert all(n.startswith("banger-build: wrote ") for n in notes), err
    assert error.startswith(f"banger-build: error: {recipe}:{line}:1: {key}: "), err
    assert words in error
    assert list((tmp_path / "home" / "store").iterdir()) == []


def _last_section_line(recipe: Path, key: str) -> int:
    """The line of the last ``[[section]]`` header of ``key``'s section."""
    section = key.split("[", 1)[0]
    lines = recipe.read_text().splitlines()
    return max(n for n, text in enumerate(lines, 1) if text == f"[[{section}]]")


def test_a_size_too_small_for_the_image_points_at_rootfs_size(
    tmp_path: Path, registry: RegistryServer
) -> None:
    from tests.support.e2e import run_cli, write_recipe
    from tests.support.oci import Entry

    push(registry, "positions/big", [[*BASE, Entry.file("big", os.urandom(12 << 20))]])
    recipe = write_recipe(
        tmp_path / "r", f"{registry.host}/positions/big:v1", extra='[rootfs]\nsize = "8MiB"\n'
    )
    line = recipe.read_text().splitlines().index('size = "8MiB"') + 1
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "-q")
    error = err.splitlines()[-1]
    assert code == 1 and error.startswith(f"banger-build: error: {recipe}:{line}:1: rootfs.size: ")
    assert "too small" in error
