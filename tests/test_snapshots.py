"""Snapshots: rendered templates, derivations, debugfs scripts and golden store keys.

An accidental change of the derivation format, of a key or of what a
template renders fails here and shows up in review as a snapshot diff.
Update deliberately with ``scripts/test tests/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from banger_build import ext4
from banger_build.derivation import derive
from banger_build.inputs import resolve_injected, resolve_kernel, template_context
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor, ImageManifest
from banger_build.oci.reference import Digest
from banger_build.recipe import load_recipe
from banger_build.templating import render_template
from banger_build.tree import DIR, REG, SYMLINK, Inode

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots"
RECIPE_NAMES = sorted(
    str(p.relative_to(REPO)) for p in [*REPO.glob("recipes/*.toml"), *REPO.glob("examples/*.toml")]
)
#: The agent binary is built by gcc on each machine; keys must not depend on its bytes.
STAND_IN_AGENT = b"\x7fELF stand-in for agents/out/banger-vsock-agent\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/, examples/ and templates/ with a fixed stand-in agent."""
    top = tmp_path_factory.mktemp("repo")
    (top / ".git").mkdir()  # a project, as the checkout is: ../templates lies inside it
    for name in ("recipes", "examples", "templates"):
        shutil.copytree(REPO / name, top / name, ignore=shutil.ignore_patterns("*.lock"))
    (top / "agents" / "out").mkdir(parents=True)
    (top / "agents" / "out" / "banger-vsock-agent").write_bytes(STAND_IN_AGENT)
    return top


#: A fixed stand-in for the registry's answer, so keys depend only on the recipe.
IMAGE = ImageManifest(
    digest=Digest("1" * 64),
    media_type=OCI_MANIFEST,
    config=Descriptor("application/vnd.oci.image.config.v1+json", Digest("2" * 64), 1234),
    layers=(
        Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest("3" * 64), 30_000_000),
        Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest("4" * 64), 4096),
    ),
)
DIFF_IDS = (Digest("5" * 64), Digest("6" * 64))  # the layers' uncompressed digests
TOOLS = {"mke2fs": "1.47.0", "debugfs": "1.47.0"}
EPOCH = 1_700_000_000


def _derivation(recipe_path: Path) -> dict:  # type: ignore[type-arg]
    recipe = load_recipe(recipe_path)
    return derive(
        recipe,
        IMAGE,
        diff_ids=DIFF_IDS,
        injected=resolve_injected(recipe),
        kernel=resolve_kernel(recipe.kernel),
        epoch=EPOCH,
        tools=TOOLS,
    ).data


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_derivation(snapshot, tree: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    recipe = tree / name
    snapshot.snapshot_dir = SNAPSHOTS / "derivations"
    text = json.dumps(_derivation(recipe), indent=2, sort_keys=True) + "\n"
    snapshot.assert_match(text, f"{recipe.parent.name}-{recipe.stem}.json")


def test_golden_keys(snapshot, tree: Path) -> None:  # type: ignore[no-untyped-def]
    """The store key of every shipped recipe, given the same image and agent."""
    snapshot.snapshot_dir = SNAPSHOTS
    lines = []
    for name in RECIPE_NAMES:
        recipe_path = tree / name
        recipe = load_recipe(recipe_path)
        d = derive(
            recipe,
            IMAGE,
            diff_ids=DIFF_IDS,
            injected=resolve_injected(recipe),
            kernel=resolve_kernel(recipe.kernel),
            epoch=EPOCH,
            tools=TOOLS,
        )
        lines.append(f"{name} {d.key}-{d.name}")
    snapshot.assert_match("\n".join(lines) + "\n", "golden-keys.txt")


@pytest.mark.parametrize("template", sorted(REPO.glob("templates/*.j2")), ids=lambda p: p.name)
def test_rendered_templates(snapshot, template: Path) -> None:  # type: ignore[no-untyped-def]
    snapshot.snapshot_dir = SNAPSHOTS / "templates"
    recipe = load_recipe(REPO / "recipes" / "debian.toml")
    rendered = render_template(template, template_context(recipe))
    snapshot.assert_match(rendered.decode(), template.stem)


def test_ownership_script(snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snapshot.snapshot_dir = SNAPSHOTS
    inodes = [
        Inode(DIR, 0, 0, 0o755, EPOCH, ino=2),
        Inode(REG, 0, 0, 0o4755, 1_600_000_000, size=10, ino=12),
        Inode(REG, 0, 42, 0o640, 1_600_000_001, ino=13, xattrs={"security.capability": b"\x01"}),
        Inode(SYMLINK, 1000, 1000, 0o777, 5, target="usr/lib", ino=14),
        Inode("chr", 0, 0, 0o666, 7, rdev=(1, 3), nlink=2, ino=15),
    ]
    lines = ext4.ownership_script(list(reversed(inodes)), epoch=EPOCH, xattr_dir=tmp_path)
    snapshot.assert_match(b"\n".join(lines).decode() + "\n", "ownership-script.txt")
    assert (tmp_path / "x0").read_bytes() == b"\x01"
