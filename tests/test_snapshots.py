"""Snapshots: rendered templates, derivations, golden store keys and a golden image.

An accidental change of the derivation format, of a key or of what a
template renders fails here and shows up in review as a snapshot diff.
Update deliberately with ``scripts/test tests/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_build import ext4, guest
from banger_build.derivation import derive
from banger_build.inputs import (
    Fetched,
    FileEntry,
    resolve_injected,
    resolve_kernel,
    template_context,
)
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor, ImageManifest
from banger_build.oci.reference import Digest
from banger_build.recipe import load_recipe
from banger_build.spool import Spool
from banger_build.templating import render_template
from banger_build.tree import DIR, REG, SYMLINK, Inode, Node, Tree
from tests.support.ext4read import fsck

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots"
RECIPE_NAMES = sorted(
    str(p.relative_to(REPO)) for p in [*REPO.glob("recipes/*.toml"), *REPO.glob("examples/*.toml")]
)
#: The agent binary is built by gcc on each machine; keys must not depend on its bytes.
#: The built-in agents are it, and so is what a recipe's agent_ref fetches.
STAND_IN_AGENT = b"\x7fELF stand-in for agents/out/banger-vsock-agent\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of recipes/, examples/ and templates/; the built-in agents are fixed
    stand-ins (the recipes use them) while the module's tests run."""
    top = tmp_path_factory.mktemp("repo")
    (top / ".git").mkdir()  # a project, as the checkout is: ../templates lies inside it
    for name in ("recipes", "examples", "templates"):
        shutil.copytree(REPO / name, top / name, ignore=shutil.ignore_patterns("*.lock"))
    agents = top / "agents" / "out"
    agents.mkdir(parents=True)
    for arch in ("amd64", "arm64"):
        (agents / f"banger-vsock-agent-{arch}").write_bytes(STAND_IN_AGENT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guest, "agent_dirs", lambda: [agents])
        yield top


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
EPOCH = 1_700_000_000


def stand_in_fetch(entry: FileEntry) -> Fetched:
    """A fetched file (recipes/debian.toml's agent_ref) as the stand-in agent: the
    bytes the built-in agent has here, so the key is the same as with it."""
    return Fetched(Path("/stand-in"), hashlib.sha256(STAND_IN_AGENT).hexdigest(), True)


def _derivation(recipe_path: Path) -> dict:  # type: ignore[type-arg]
    recipe = load_recipe(recipe_path)
    return derive(
        recipe,
        IMAGE,
        diff_ids=DIFF_IDS,
        injected=resolve_injected(recipe, stand_in_fetch),
        kernel=resolve_kernel(recipe.kernel),
        epoch=EPOCH,
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
            injected=resolve_injected(recipe, stand_in_fetch),
            kernel=resolve_kernel(recipe.kernel),
            epoch=EPOCH,
        )
        lines.append(f"{name} {d.key}-{d.name}")
    snapshot.assert_match("\n".join(lines) + "\n", "golden-keys.txt")


@pytest.mark.parametrize("template", sorted(REPO.glob("templates/*.j2")), ids=lambda p: p.name)
def test_rendered_templates(snapshot, template: Path) -> None:  # type: ignore[no-untyped-def]
    snapshot.snapshot_dir = SNAPSHOTS / "templates"
    recipe = load_recipe(REPO / "recipes" / "debian.toml")
    rendered = render_template(template, template_context(recipe))
    snapshot.assert_match(rendered.decode(), template.stem)


def test_golden_image(snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The bytes the writer makes of a fixed tree (every kind of inode, an xattr
    in the inode and one in a block, a hard link, a sparse file). A change here is
    a change of the output: bump ext4.writer.FORMAT_VERSION with the snapshot."""
    snapshot.snapshot_dir = SNAPSHOTS
    tree = Tree()
    tree.root.inode.mtime = EPOCH
    assert tree.root.children is not None
    with Spool(tmp_path / "spool") as spool:
        su = Inode(REG, 0, 0, 0o4755, 1_600_000_000)
        spool.add_bytes(su, b"\x7fELF su")
        shadow = Inode(REG, 0, 42, 0o640, 1_600_000_001, mtime_ns=5, xattrs={"user.a": b"b"})
        spool.add_bytes(shadow, b"root:*:1::::::\n")
        cap = Inode(REG, 0, 0, 0o755, 2**32 + 7, xattrs={"security.capability": b"\x01" * 20})
        big_xattr = Inode(REG, 7, 8, 0o600, -3, xattrs={"user.big": b"v" * 500})
        sparse = Inode(REG, size=64 << 20)
        spool.add(sparse, [(0, b"head"), ((64 << 20) - 4, b"tail")])
        usr = Node(Inode(DIR, 0, 0, 0o755, EPOCH), children={})
        assert usr.children is not None
        usr.children["su"] = Node(su)
        usr.children["su-link"] = Node(su)
        su.nlink = 2
        tree.root.children.update(
            {
                "usr": usr,
                "shadow": Node(shadow),
                "ping": Node(cap),
                "big-xattr": Node(big_xattr),
                "sparse": Node(sparse),
                "lib": Node(Inode(SYMLINK, 0, 0, 0o777, 5, target="usr/lib", size=7)),
                "long": Node(Inode(SYMLINK, target="x" * 100, size=100)),
                "null": Node(Inode("chr", 0, 0, 0o666, 7, rdev=(1, 3))),
                "fifo": Node(Inode("fifo", perm=0o600)),
            }
        )
        plan = ext4.plan_size(tree, auto=True, size=0)
        image = tmp_path / "img"
        ext4.write_image(
            image,
            tree,
            spool,
            plan,
            fs_uuid=ext4.derived_uuid("g" * 32, "fs-uuid"),
            hash_seed=ext4.derived_uuid("g" * 32, "hash-seed"),
            epoch=EPOCH,
        )
    assert fsck(image).returncode == 0
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    text = f"writer format {ext4.PARAMS['writer']}\nsize {plan.size}\nsha256 {digest}\n"
    snapshot.assert_match(text, "golden-image.txt")
