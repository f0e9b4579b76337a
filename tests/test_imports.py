"""A warm build needs no network, so it must not pay for the HTTP stack.

``banger_build.oci.wire``, ``.transport``, ``.remote`` and ``.url`` are the
only modules importing oras and requests (and, through oras, jsonschema):
~0.25 s of a ~0.65 s cached build. ``oci.source.Source`` creates the remote
(or the URL fetcher) on first need; a pinned image whose manifest and config
are in the blob cache is resolved without it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import banger_build
from banger_build.build import BuildOptions, build
from banger_build.errors import RegistryError
from banger_build.lockfile import Lock, lock_path_for
from banger_build.oci.blobs import BlobCache
from banger_build.oci.manifest import OCI_CONFIG, OCI_MANIFEST, Descriptor
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Platform, Reference
from banger_build.store import Store
from tests.support.httpfiles import HttpFiles
from tests.support.oci import Entry, make_layer, push_image
from tests.support.registry import RegistryServer, free_port

HEAVY = ("oras", "requests", "jsonschema", "urllib3")
HTTP_MODULES = (
    "banger_build.oci.remote",
    "banger_build.oci.transport",
    "banger_build.oci.url",
    "banger_build.oci.wire",
)

#: runs the CLI, then reports which of HEAVY were imported, on stderr
CLI_SCRIPT = f"""
import sys
from banger_build.cli import main
code = main(sys.argv[1:])
loaded = [m for m in {HEAVY!r} if m in sys.modules]
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def loaded_modules(stderr: str) -> list[str]:
    line = [x for x in stderr.splitlines() if x.startswith("LOADED=")][-1]
    return [m for m in line.removeprefix("LOADED=").split(",") if m]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_importing_the_build_and_cli_loads_no_http_stack() -> None:
    """Every module of the package but the four that talk HTTP."""
    package = Path(banger_build.__file__).parent
    modules = sorted(
        "banger_build." + ".".join(path.relative_to(package).with_suffix("").parts)
        for path in package.rglob("*.py")
        if path.name != "__main__.py"
    )
    light = [m.removesuffix(".__init__") for m in modules if m not in HTTP_MODULES]
    assert "banger_build.oci.source" in light and "banger_build.build" in light
    code = (
        f"import sys\nfor m in {light!r}: __import__(m)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"


def test_only_the_wire_modules_import_the_http_stack() -> None:
    package = Path(banger_build.__file__).parent
    importing = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import|from) (oras|requests|urllib3)\b", path.read_text(), re.M)
    )
    assert importing == ["oci/remote.py", "oci/transport.py", "oci/url.py", "oci/wire.py"]


def test_warm_build_loads_no_http_stack(tmp_path: Path, registry: RegistryServer) -> None:
    layer = make_layer([Entry.dir("etc"), Entry.file("etc/hostname", b"warm\n")])
    push_image(registry.url, "imports/warm", "v1", [layer])
    recipe = tmp_path / "r" / "recipe.toml"
    recipe.parent.mkdir()
    recipe.write_text(f'[image]\nref = "{registry.host}/imports/warm:v1"\n')
    args = (str(recipe), "--no-link", "--home", str(tmp_path / "home"))

    cold = run_cli(*args)
    assert cold.returncode == 0, cold.stderr
    assert "oras" in loaded_modules(cold.stderr)  # the check can see it
    warm = run_cli(*args)
    assert warm.returncode == 0, warm.stderr
    assert "cached" in warm.stderr
    assert warm.stdout == cold.stdout
    assert loaded_modules(warm.stderr) == []


def _pin(tmp_path: Path, manifest: bytes, config: bytes | None) -> tuple[Path, BuildOptions]:
    """A recipe for a registry that is not there, its image pinned by the lock
    to ``manifest``, which (with ``config``, if given) is in the blob cache."""
    home = tmp_path / "home"
    ref = Reference.parse(f"127.0.0.1:{free_port()}/imports/pinned:v1")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[image]\nref = "{ref}"\n')
    cache = BlobCache(Store(home).blobs)
    digest = Digest(hashlib.sha256(manifest).hexdigest())
    cache.put_bytes(digest, manifest)
    if config is not None:
        cache.put_bytes(Digest(hashlib.sha256(config).hexdigest()), config)
    Lock().with_image(ref, Platform("linux", "amd64"), digest).save(lock_path_for(recipe))
    return recipe, BuildOptions(home=home, registry=RegistryOptions(retries=0), out_link=None)


def _manifest(config: bytes, media_type: str = OCI_CONFIG) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": media_type,
                "size": len(config),
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            },
            "layers": [],
        }
    ).encode()


def test_cached_pinned_manifest_that_is_not_an_image(tmp_path: Path) -> None:
    """A cached manifest is checked like a downloaded one, and named by reference."""
    config = b'{"architecture": "amd64", "os": "linux"}'
    recipe, options = _pin(tmp_path, _manifest(config, "application/vnd.example.artifact"), config)
    with pytest.raises(RegistryError) as info:
        build(recipe, options)
    assert info.value.reason == "unsupported-media-type"  # not "unreachable": no request
    assert info.value.reference.endswith("/imports/pinned:v1")
    assert "is not an image config" in str(info.value)


def test_missing_config_falls_back_to_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest cached, config not: only the config is asked of the registry."""
    from banger_build.oci import remote as registry

    config = b'{"architecture": "amd64", "os": "linux"}'
    recipe, options = _pin(tmp_path, _manifest(config), None)
    asked: list[str] = []

    def blob(self: registry.Remote, ref: Reference, desc: Descriptor) -> Path:
        asked.append(str(desc.digest))
        raise RegistryError("not here", reference=str(ref), reason="test-stop")

    monkeypatch.setattr(registry.Remote, "blob", blob)
    monkeypatch.setattr(
        registry.Remote,
        "manifest",
        lambda *a: pytest.fail("the cached manifest was fetched"),
    )
    with pytest.raises(RegistryError) as info:
        build(recipe, options)
    assert info.value.reason == "test-stop"
    assert asked == ["sha256:" + hashlib.sha256(config).hexdigest()]


def test_warm_build_with_fetched_files_loads_no_http_stack(
    tmp_path: Path, registry: RegistryServer, http_files: HttpFiles
) -> None:
    """A file artifact pinned by the lock and a URL's file, both in the blob cache:
    a build of another key resolves and builds without the HTTP stack."""
    layer = make_layer([Entry.dir("etc"), Entry.file("etc/hostname", b"warm\n")])
    push_image(registry.url, "imports/fetched", "v1", [layer])
    tool = tmp_path / "tool"
    tool.write_bytes(b"a tool\n")
    fref = f"{registry.host}/imports/tool:1"
    home = tmp_path / "home"
    pushed = run_cli("file", "push", fref, str(tool), "--home", str(home))
    assert pushed.returncode == 0, pushed.stderr
    data = b"some data\n"
    url = http_files.put("data", data)
    recipe = tmp_path / "r" / "recipe.toml"
    recipe.parent.mkdir()
    recipe.write_text(
        f'[image]\nref = "{registry.host}/imports/fetched:v1"\n\n'
        f'[[files]]\nref = "{fref}"\ndest = "/tool"\n\n'
        f'[[files]]\nurl = "{url}"\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n'
        'dest = "/data"\n'
    )
    args = (str(recipe), "--no-link", "--home", str(home))
    cold = run_cli(*args)
    assert cold.returncode == 0, cold.stderr
    assert "oras" in loaded_modules(cold.stderr)
    http_files.close()
    other = recipe.with_name("other.toml")  # another name, another key: built, from the cache
    other.write_text('name = "other"\n' + recipe.read_text())
    other.with_suffix(".lock").write_text(recipe.with_suffix(".lock").read_text())
    warm = run_cli(str(other), *args[1:])
    assert warm.returncode == 0, warm.stderr
    assert "cached" not in warm.stderr and warm.stdout != cold.stdout
    assert loaded_modules(warm.stderr) == []


#: runs the CLI, then reports whether the template engine and the signing stack loaded
ENGINE_SCRIPT = """
import sys
from banger_build.cli import main
code = main(sys.argv[1:])
print("LOADED=" + ",".join(m for m in ("jinja2", "cryptography") if m in sys.modules),
      file=sys.stderr)
sys.exit(code)
"""


def test_a_build_without_templates_or_keys_loads_no_jinja2_or_cryptography(
    tmp_path: Path, registry: RegistryServer
) -> None:
    layer = make_layer([Entry.dir("etc"), Entry.file("etc/hostname", b"plain\n")])
    push_image(registry.url, "imports/plain", "v1", [layer])
    recipe = tmp_path / "r" / "recipe.toml"
    recipe.parent.mkdir()
    recipe.write_text(f'[image]\nref = "{registry.host}/imports/plain:v1"\n')

    def loaded(path: Path, home: str) -> list[str]:
        args = (str(path), "--no-link", "--home", str(tmp_path / home))
        run = subprocess.run(
            [sys.executable, "-c", ENGINE_SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        return loaded_modules(run.stderr)

    assert loaded(recipe, "plain") == []
    (recipe.parent / "t.j2").write_text("{{ 1 + 1 }}\n")
    templated = recipe.parent / "templated.toml"
    templated.write_text(recipe.read_text() + '\n[[templates]]\nsrc = "t.j2"\ndest = "/etc/t"\n')
    assert loaded(templated, "templated") == ["jinja2"]  # the check can see it
