"""Recipe loading: valid recipes, defaults, and every error at its file:line:col."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from banger_build.errors import RecipeError
from banger_build.oci.reference import Platform, Reference
from banger_build.recipe import Recipe, SizeSpec, Where, load_recipe
from banger_build.tomlpos import PositionIndex, format_key_path

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
[image]
ref = "debian:bookworm"
"""

FULL = """\
version = 1
name = "my-image"

[image]
ref = "registry.example.com:5000/team/base:1.2"
platform = "linux/arm64/v8"

[rootfs]
size = "auto+512MiB"

[kernel]
path = "boot/vmlinux"
initrd = "boot/initrd.img"
modules = "boot/modules.tar.zst"

[vars]
hostname = "box"
nested = { a = [1, 2], b = { c = true } }

[[files]]
src = "files/motd"
dest = "/etc/motd"
mode = "0600"
owner = "root:adm"
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[[files]]
src = "files/agent"
dest = "/usr/local/bin/agent"
mode = 0o755

[[templates]]
src = "../templates/hostname.j2"
dest = "/etc/hostname"

[[symlinks]]
dest = "/etc/issue.net"
target = "/etc/motd"
owner = "0:4"
"""


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str) -> Recipe:
    return load_recipe(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> RecipeError:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.file == str(path)
    # the message always leads with the position, then the key path
    where = str(path) + (f":{err.line}:{err.col}" if err.line is not None else "")
    assert str(err).startswith(where + ": ")
    if err.key:
        assert str(err).startswith(f"{where}: {err.key}: ")
    return err


def image(extra: str = "") -> str:
    return '[image]\nref = "debian:bookworm"\n' + extra


# -- valid recipes ---------------------------------------------------------------


def test_minimal_recipe_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    r = load_recipe(path)
    assert r.path == path
    assert r.name == "debian-bookworm"
    assert r.image == Reference.parse("docker.io/library/debian:bookworm")
    assert r.platform == Platform("linux", "amd64")
    assert r.size == SizeSpec("auto", True, 0)
    assert r.kernel is None
    assert r.files == () and r.templates == () and r.symlinks == ()
    assert r.vars == {}
    assert r.image_where == Where(str(path), 2, 1, "image.ref")


def test_full_recipe(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()  # a project: ../templates is inside it
    (tmp_path / "r").mkdir()
    path = write(tmp_path / "r", FULL)
    r = load_recipe(path)
    base = (tmp_path / "r").resolve()
    assert r.name == "my-image"
    assert str(r.image) == "registry.example.com:5000/team/base:1.2"
    assert r.platform == Platform("linux", "arm64", "v8")
    assert r.size == SizeSpec("auto+512MiB", True, 512 << 20)
    assert r.kernel is not None
    assert r.kernel.path == base / "boot/vmlinux"
    assert r.kernel.initrd == base / "boot/initrd.img"
    assert r.kernel.modules == base / "boot/modules.tar.zst"
    assert r.kernel.where == Where(str(path), 11, 1, "kernel")
    assert r.vars == {"hostname": "box", "nested": {"a": [1, 2], "b": {"c": True}}}

    motd, agent = r.files
    assert motd.src == base / "files/motd"
    assert motd.src.is_absolute()
    assert (motd.dest, motd.mode, motd.owner) == ("/etc/motd", 0o600, "root:adm")
    assert motd.sha256 == "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    assert motd.where == Where(str(path), 21, 1, "files[0].src")
    assert (agent.dest, agent.mode, agent.owner, agent.sha256) == (
        "/usr/local/bin/agent",
        0o755,
        "0:0",
        None,
    )
    assert agent.where.line == 28

    (tmpl,) = r.templates
    assert tmpl.src == base.parent / "templates/hostname.j2"
    assert (tmpl.dest, tmpl.mode, tmpl.owner) == ("/etc/hostname", 0o644, "0:0")
    assert tmpl.where == Where(str(path), 33, 1, "templates[0].src")

    (link,) = r.symlinks
    assert (link.dest, link.target, link.owner) == ("/etc/issue.net", "/etc/motd", "0:4")
    assert link.where == Where(str(path), 37, 1, "symlinks[0].dest")


def test_src_need_not_exist_and_is_relative_to_recipe_dir(tmp_path: Path) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = write(sub, image('[[files]]\nsrc = "missing/file"\ndest = "/x"\n'))
    (f,) = load_recipe(path).files
    assert f.src == sub.resolve() / "missing/file"
    assert not f.src.exists()


def test_inline_array_of_tables_is_accepted(tmp_path: Path) -> None:
    r = load_text(tmp_path, 'files = [{ src = "a", dest = "/a" }]\n' + image())
    assert [f.dest for f in r.files] == ["/a"]


def test_empty_arrays(tmp_path: Path) -> None:
    r = load_text(tmp_path, "files = []\nsymlinks = []\n" + image())
    assert r.files == () and r.symlinks == ()


@pytest.mark.parametrize(
    "recipe", ["recipes/debian.toml", "examples/minimal.toml", "examples/custom-files.toml"]
)
def test_shipped_recipes_load(recipe: str) -> None:
    path = REPO / recipe
    if not path.exists():
        pytest.skip(f"{recipe} not in this checkout")
    r = load_recipe(path)
    assert r.name


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("debian:bookworm", "debian-bookworm"),
        ("debian", "debian-latest"),
        ("ghcr.io/org/tool:v1.2+x", None),  # '+' is not a tag character: an invalid ref
        ("localhost:5000/a/b:1.0", "b-1.0"),
        ("debian@sha256:" + "ab" * 32, "debian-" + "ab" * 6),
    ],
)
def test_default_name(tmp_path: Path, ref: str, name: str | None) -> None:
    text = f'[image]\nref = "{ref}"\n'
    if name is None:
        assert error(tmp_path, text).reason == "value"
    else:
        assert load_text(tmp_path, text).name == name


# -- sizes, modes, owners -----------------------------------------------------------

MiB = 1 << 20


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"auto"', SizeSpec("auto", True, 0)),
        ('"auto+0"', SizeSpec("auto", True, 0)),
        ('"auto+512MiB"', SizeSpec("auto+512MiB", True, 512 * MiB)),
        ('"auto+512M"', SizeSpec("auto+512MiB", True, 512 * MiB)),
        ('"auto+100"', SizeSpec("auto+100B", True, 100)),
        ('"auto+1K"', SizeSpec("auto+1KiB", True, 1024)),
        ('"4GiB"', SizeSpec("4GiB", False, 4 << 30)),
        ('"4096MiB"', SizeSpec("4GiB", False, 4 << 30)),
        ('"4G"', SizeSpec("4GiB", False, 4 << 30)),
        ('"1T"', SizeSpec("1TiB", False, 1 << 40)),
        ('"1TiB"', SizeSpec("1TiB", False, 1 << 40)),
        ('"8MiB"', SizeSpec("8MiB", False, 8 * MiB)),
        ('"8192KiB"', SizeSpec("8MiB", False, 8 * MiB)),
        ('"8392704"', SizeSpec("8196KiB", False, 8 * MiB + 4096)),
        ('"8392704B"', SizeSpec("8196KiB", False, 8 * MiB + 4096)),
        ("1073741824", SizeSpec("1GiB", False, 1 << 30)),
    ],
)
def test_sizes(tmp_path: Path, value: str, expected: SizeSpec) -> None:
    r = load_text(tmp_path, image(f"[rootfs]\nsize = {value}\n"))
    assert r.size == expected


@pytest.mark.parametrize(
    "value",
    [
        '"4MiB"',  # below 8MiB
        '"8388609"',  # not a multiple of 4096
        '"0"',
        "0",
        "-1",
        '"-1G"',
        '"4gib"',
        '"4 GiB"',
        '"1.5GiB"',
        '"4GB"',
        '"auto+"',
        '"auto+x"',
        '"auto-1G"',
        '"Auto"',
        '""',
        '"9999999999999999999T"',
        '"' + "9" * 5000 + '"',
    ],
)
def test_bad_sizes(tmp_path: Path, value: str) -> None:
    err = error(tmp_path, image(f"[rootfs]\nsize = {value}\n"))
    assert (err.reason, err.key, err.line, err.col) == ("value", "rootfs.size", 4, 1)


@pytest.mark.parametrize("value", ["1.5", "true", "[1]", "{a = 1}", "2024-01-01"])
def test_size_wrong_type(tmp_path: Path, value: str) -> None:
    err = error(tmp_path, image(f"[rootfs]\nsize = {value}\n"))
    assert (err.reason, err.key, err.line, err.col) == ("type", "rootfs.size", 4, 1)
    assert "expected a string or an integer" in err.detail


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ('"644"', 0o644),
        ('"0644"', 0o644),
        ('"4755"', 0o4755),
        ('"0"', 0),
        ('"7777"', 0o7777),
        ('"007777"', 0o7777),
        ("0o600", 0o600),
        ("0", 0),
        ("0o7777", 0o7777),
    ],
)
def test_modes(tmp_path: Path, value: str, mode: int) -> None:
    r = load_text(tmp_path, image(f'[[files]]\nsrc = "a"\ndest = "/a"\nmode = {value}\n'))
    assert r.files[0].mode == mode


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"0o644"', "value"),
        ('"rw-r--r--"', "value"),
        ('"0648"', "value"),
        ('"17777"', "value"),
        ('""', "value"),
        ('"0000644"', "value"),
        ("0o10000", "value"),
        ("-1", "value"),
        ("6.44", "type"),
        ("true", "type"),
    ],
)
def test_bad_modes(tmp_path: Path, value: str, reason: str) -> None:
    err = error(tmp_path, image(f'[[files]]\nsrc = "a"\ndest = "/a"\nmode = {value}\n'))
    assert (err.reason, err.key, err.line, err.col) == (reason, "files[0].mode", 6, 1)


@pytest.mark.parametrize(
    "owner",
    ["0:0", "root:root", "root:adm", "1000:100", "_apt:nogroup", "www-data:0", "4294967294:0"],
)
def test_owners(tmp_path: Path, owner: str) -> None:
    text = image(f'[[symlinks]]\ndest = "/a"\ntarget = "b"\nowner = "{owner}"\n')
    assert load_text(tmp_path, text).symlinks[0].owner == owner


@pytest.mark.parametrize(
    "owner",
    [
        "root",
        "0",
        ":0",
        "0:",
        "Root:root",
        "1:2:3",
        "-1:0",
        "4294967295:0",
        "a b:c",
        "r\u00f6ot:0",
        "",
    ],
)
def test_bad_owners(tmp_path: Path, owner: str) -> None:
    err = error(tmp_path, image(f'[[files]]\nsrc = "a"\ndest = "/a"\nowner = "{owner}"\n'))
    assert (err.reason, err.key, err.line, err.col) == ("value", "files[0].owner", 6, 1)


# -- guest paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "dest",
    ["/etc/motd", "/a", "/usr/local/bin/x y", "/\u00e9t\u00e9/caf\u00e9", "/." + "a" * 254],
)
def test_good_dests(tmp_path: Path, dest: str) -> None:
    r = load_text(tmp_path, image(f'[[files]]\nsrc = "a"\ndest = "{dest}"\n'))
    assert r.files[0].dest == dest


@pytest.mark.parametrize(
    "dest",
    [
        "etc/motd",  # relative
        "",
        "/",
        "/etc/",
        "//etc",
        "/etc//motd",
        "/etc/../motd",
        "/..",
        "/./etc",
        "/etc/.",
        "/etc/mo\\ntd",  # a TOML escape: a real newline
        "/etc/mo\\rtd",
        "/etc/mo\\u0000td",
        "/" + "a" * 256,
        "/" + "\u00e9" * 128,  # 256 bytes of UTF-8
        ("/" + "a" * 200) * 21,  # longer than PATH_MAX
    ],
)
def test_bad_dests(tmp_path: Path, dest: str) -> None:
    err = error(tmp_path, image(f'[[templates]]\nsrc = "a"\ndest = "{dest}"\n'))
    assert (err.reason, err.key, err.line, err.col) == ("value", "templates[0].dest", 5, 1)


@pytest.mark.parametrize("target", ['""', '"a\\nb"', '"a\\u0000"', '"a\\r"'])
def test_bad_symlink_targets(tmp_path: Path, target: str) -> None:
    err = error(tmp_path, image(f'[[symlinks]]\ndest = "/a"\ntarget = {target}\n'))
    assert (err.reason, err.key, err.line, err.col) == ("value", "symlinks[0].target", 5, 1)


def test_duplicate_dest_names_both_positions(tmp_path: Path) -> None:
    err = error(
        tmp_path,
        image(
            '[[files]]\nsrc = "a"\ndest = "/etc/x"\n'
            '[[files]]\nsrc = "b"\ndest = "/etc/y"\n'
            '[[symlinks]]\ntarget = "t"\n  dest = "/etc/x"\n'
        ),
    )
    assert (err.reason, err.key, err.line, err.col) == ("duplicate-dest", "symlinks[0].dest", 11, 3)
    assert ":5:1: files[0].dest" in err.detail


def test_duplicate_dest_within_templates(tmp_path: Path) -> None:
    err = error(
        tmp_path,
        image('[[templates]]\nsrc = "a"\ndest = "/x"\n[[templates]]\nsrc = "b"\ndest = "/x"\n'),
    )
    assert (err.reason, err.key, err.line) == ("duplicate-dest", "templates[1].dest", 8)


# -- errors: reasons, positions, key paths ------------------------------------------------


def test_syntax_error_position(tmp_path: Path) -> None:
    err = error(tmp_path, '[image]\nref = "debian"\nsize = 4 GiB\n')
    assert (err.reason, err.line, err.col, err.key) == ("syntax", 3, 10, None)


def test_syntax_error_at_end_of_document(tmp_path: Path) -> None:
    err = error(tmp_path, '[image]\nref = "debian')
    assert err.reason == "syntax"
    assert (err.line, err.col) == (2, 14)


def test_syntax_duplicate_key(tmp_path: Path) -> None:
    err = error(tmp_path, '[image]\nref = "a"\nref = "b"\n[rootfs]\n')
    assert err.reason == "syntax"
    assert err.line is not None


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(b'[image]\nref = "de\xffbian"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (info.value.reason, info.value.line, info.value.col) == ("syntax", 2, 10)


def test_deeply_nested_value_is_a_syntax_error(tmp_path: Path) -> None:
    err = error(tmp_path, image("[vars]\nx = " + "[" * 5000 + "]" * 5000 + "\n"))
    assert err.reason == "syntax"


def test_missing_file_is_io(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.toml")
    assert (info.value.reason, info.value.line, info.value.key) == ("io", None, None)
    assert str(info.value).startswith(f"{tmp_path / 'nope.toml'}: ")


def test_directory_is_io(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert info.value.reason == "io"


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    err = error(tmp_path, image('\n# comment\n[rootfs]\n  sise = "auto"\n'))
    assert (err.reason, err.key, err.line, err.col) == ("unknown-key", "rootfs.sise", 6, 3)
    assert "did you mean 'size'?" in err.detail
    assert str(err).endswith("rootfs.sise: unknown key 'sise' (did you mean 'size'?)")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    err = error(tmp_path, '[image]\nref = "x"\nzzz = 1\n')
    assert (err.reason, err.key, err.line, err.col) == ("unknown-key", "image.zzz", 3, 1)
    assert "platform, ref" in err.detail


def test_unknown_top_level_table(tmp_path: Path) -> None:
    err = error(tmp_path, image('[[file]]\nsrc = "a"\n'))
    assert (err.reason, err.key, err.line, err.col) == ("unknown-key", "file", 3, 1)
    assert "did you mean 'files'?" in err.detail


def test_unknown_key_in_array_of_tables(tmp_path: Path) -> None:
    err = error(
        tmp_path,
        image(
            '[[files]]\nsrc = "a"\ndest = "/a"\n[[files]]\nsrc = "b"\ndest = "/b"\nmdoe = "0644"\n'
        ),
    )
    assert (err.reason, err.key, err.line, err.col) == ("unknown-key", "files[1].mdoe", 9, 1)
    assert "did you mean 'mode'?" in err.detail


def test_unknown_dotted_and_quoted_keys(tmp_path: Path) -> None:
    err = error(tmp_path, '[image]\nref = "x"\n"plat form" = 1\n')
    assert (err.key, err.line, err.col) == ('image."plat form"', 3, 1)
    err = error(tmp_path, '[image]\nref = "x"\nextra.deep = 1\n')
    assert (err.key, err.line, err.col) == ("image.extra", 3, 1)


def test_unknown_key_inside_inline_table(tmp_path: Path) -> None:
    err = error(tmp_path, 'image = { ref = "x", platfrm = "linux/amd64" }\n')
    assert (err.reason, err.key, err.line, err.col) == ("unknown-key", "image.platfrm", 1, 22)


def test_unknown_key_in_kernel(tmp_path: Path) -> None:
    err = error(tmp_path, image('[kernel]\npath = "v"\ninitramfs = "i"\n'))
    assert (err.reason, err.key, err.line) == ("unknown-key", "kernel.initramfs", 5)
    assert "did you mean 'initrd'?" in err.detail


@pytest.mark.parametrize(
    ("text", "key", "line", "col", "message"),
    [
        ('version = "1"\n' + image(), "version", 1, 1, "expected an integer, got a string"),
        ("version = true\n" + image(), "version", 1, 1, "expected an integer, got a boolean"),
        ("name = 1\n" + image(), "name", 1, 1, "expected a string, got an integer"),
        ("[image]\nref = 1\n", "image.ref", 2, 1, "expected a string, got an integer"),
        ('image = "debian"\n', "image", 1, 1, "expected a table, got a string"),
        (image("platform = [1]\n"), "image.platform", 3, 1, "expected a string, got an array"),
        (image("vars = 1\n"), "image.vars", 3, 1, None),  # inside [image]: unknown
        ('vars = "x"\n' + image(), "vars", 1, 1, "expected a table, got a string"),
        (image("[kernel]\npath = 1.5\n"), "kernel.path", 4, 1, "expected a string, got a float"),
        (image('[files]\nsrc = "a"\n'), "files", 3, 1, "write [[files]] for each entry"),
        ("files = [1]\n" + image(), "files[0]", 1, 10, "expected a table, got an integer"),
        ('files = "a"\n' + image(), "files", 1, 1, "expected an array of tables, got a string"),
        (
            image('[[files]]\nsrc = "a"\ndest = 1979-05-27 07:32:00\n'),
            "files[0].dest",
            5,
            1,
            "expected a string, got a date-time",
        ),
    ],
)
def test_type_errors(
    tmp_path: Path, text: str, key: str, line: int, col: int, message: str | None
) -> None:
    err = error(tmp_path, text)
    assert (err.key, err.line, err.col) == (key, line, col)
    if message is None:
        assert err.reason == "unknown-key"
    else:
        assert err.reason == "type"
        assert message in err.detail


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("version = 2\n" + image(), "version", 1),
        ('name = "-bad"\n' + image(), "name", 1),
        ('name = "a/b"\n' + image(), "name", 1),
        ('name = ""\n' + image(), "name", 1),
        (f'name = "{"a" * 101}"\n' + image(), "name", 1),
        ('[image]\nref = "Debian:bookworm"\n', "image.ref", 2),
        ('[image]\nref = ""\n', "image.ref", 2),
        ('[image]\nref = "debian@sha256:1234"\n', "image.ref", 2),
        (image('platform = "linux"\n'), "image.platform", 3),
        (image('platform = "Linux/AMD64"\n'), "image.platform", 3),
        (image('[kernel]\npath = ""\n'), "kernel.path", 4),
        (image('[[files]]\nsrc = "a\\u0000b"\ndest = "/a"\n'), "files[0].src", 4),
        (image('[[files]]\nsrc = "a"\ndest = "/a"\nsha256 = "abc"\n'), "files[0].sha256", 6),
    ],
)
def test_value_errors(tmp_path: Path, text: str, key: str, line: int) -> None:
    err = error(tmp_path, text)
    assert (err.reason, err.key, err.line, err.col) == ("value", key, line, 1)


@pytest.mark.parametrize(
    ("text", "key", "line", "col"),
    [
        ('name = "x"\n', "image", 1, 1),  # no [image] at all: the start of the file
        ('\n\n  [image]\nplatform = "linux/amd64"\n', "image.ref", 3, 3),
        (image("[kernel]\ninitrd = 'i'\n"), "kernel.path", 3, 1),
        (
            image('[[files]]\nsrc = "a"\ndest = "/a"\n\n[[files]]\ndest = "/b"\n'),
            "files[1].src",
            7,
            1,
        ),
        (image('[[files]]\nsrc = "a"\n'), "files[0].dest", 3, 1),
        (image('[[symlinks]]\ndest = "/a"\n'), "symlinks[0].target", 3, 1),
    ],
)
def test_missing_keys_point_at_the_table_header(
    tmp_path: Path, text: str, key: str, line: int, col: int
) -> None:
    err = error(tmp_path, text)
    assert (err.reason, err.key, err.line, err.col) == ("missing-key", key, line, col)


def test_first_error_in_document_order(tmp_path: Path) -> None:
    err = error(tmp_path, "name = 1\n[image]\nref = 2\n")
    assert err.key == "name"


# -- the position index ---------------------------------------------------------------


def test_position_index() -> None:
    text = textwrap.dedent(
        '''\
        # c
        a = 1
        "b.c" = """
        x = 2
        [notatable]
        """
        [t . 'u']
        k.l = {m = 1, n = [1, {o = 2}], "p q" = 'x'}
        arr = [
          1, # comment ]
          "]",
          [2, 3],
        ]
        lit = \'\'\'
        y = 3\'\'\'\'
        [[files]]
        src = "a"
        [[files]]
        dest = 1979-05-27 07:32:00
        [files.sub]
        z = 1
        [[files.x]]
        "y\\u0041" = 1
        '''
    )
    idx = PositionIndex.from_text(text)
    assert idx.lookup(()) is None
    assert idx.lookup(("a",)) == (2, 1)
    assert idx.lookup(("b.c",)) == (3, 1)
    assert ("x",) not in idx and ("notatable",) not in idx and ("y",) not in idx
    assert idx.lookup(("t", "u")) == (7, 1)
    assert idx.lookup(("t", "u", "k", "l")) == (8, 3)
    assert idx.lookup(("t", "u", "k", "l", "m")) == (8, 8)
    assert idx.lookup(("t", "u", "k", "l", "n", 1, "o")) == (8, 24)
    assert idx.lookup(("t", "u", "k", "l", "p q")) == (8, 33)
    assert idx.lookup(("t", "u", "arr", 2, 1)) == (12, 7)
    assert idx.lookup(("t", "u", "lit")) == (14, 1)
    assert idx.lookup(("files",)) == (16, 1)
    assert idx.lookup(("files", 0)) == (16, 1)
    assert idx.lookup(("files", 0, "src")) == (17, 1)
    assert idx.lookup(("files", 1)) == (18, 1)
    assert idx.lookup(("files", 1, "dest")) == (19, 1)
    assert idx.lookup(("files", 1, "sub", "z")) == (21, 1)
    assert idx.lookup(("files", 1, "x", 0, "yA")) == (23, 1)
    # fallback to the nearest recorded ancestor
    assert idx.lookup(("files", 1, "sub", "nope", 3)) == (20, 1)
    assert idx.lookup(("nope",)) is None


def test_format_key_path() -> None:
    assert format_key_path(("files", 0, "mode")) == "files[0].mode"
    assert format_key_path(("image", "ref")) == "image.ref"
    assert format_key_path(("a b", "c.d")) == '"a b"."c.d"'
    assert format_key_path(()) == ""


# -- never a traceback ----------------------------------------------------------------


def _mutations(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("[]{}\"'=.,#\n \t\\0aZ_-+:/") + ["[[", "]]", '"""', "'''", "\u00e9", "\r\n"]
    out = []
    for _ in range(count):
        chars = list(FULL)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(chars) + 1)
            if op < 0.4 and chars:
                del chars[min(pos, len(chars) - 1)]
            elif op < 0.8:
                chars.insert(pos, rng.choice(alphabet))
            else:  # swap two lines
                lines = "".join(chars).split("\n")
                a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
                lines[a], lines[b] = lines[b], lines[a]
                chars = list("\n".join(lines))
        out.append("".join(chars))
    return out


def test_fuzz_never_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    reasons: set[str] = set()
    for text in _mutations(seed=1, count=1500):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_recipe(path)
        except RecipeError as exc:
            reasons.add(exc.reason)
            if exc.line is not None:
                assert exc.line >= 1 and exc.col is not None and exc.col >= 1
        PositionIndex.from_text(text)  # also never raises on invalid TOML
    assert {"syntax", "unknown-key"} <= reasons


def test_position_index_on_garbage_terminates() -> None:
    rng = random.Random(7)
    pieces = [
        '"',
        "'",
        '"""',
        "'''",
        "[",
        "]",
        "[[",
        "{",
        "}",
        "=",
        ".",
        ",",
        "\n",
        "a",
        "#",
        "\\",
        " ",
    ]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        idx = PositionIndex.from_text(text)
        assert idx.lookup(()) is None


@pytest.mark.parametrize("value", ["644", "755", "4755", "420"])
def test_decimal_integer_modes_are_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        f'[image]\nref = "debian:bookworm"\n\n[[files]]\nsrc = "a"\ndest = "/a"\nmode = {value}\n'
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (info.value.reason, info.value.line, info.value.col, info.value.key) == (
        "value",
        7,
        1,
        "files[0].mode",
    )
    assert "0o644" in str(info.value)


def test_install_modules_needs_a_modules_directory(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        '[image]\nref = "debian:bookworm"\n\n[kernel]\npath = "k"\ninstall_modules = true\n'
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (info.value.reason, info.value.line, info.value.key) == (
        "missing-key",
        6,
        "kernel.install_modules",
    )
