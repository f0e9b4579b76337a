"""debugfs script safety and output parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger_build import debugfs
from banger_build.errors import ToolError


@pytest.mark.parametrize("name", [b"a\nb", b"a\rb", b"a\x00b", b"", b"a/b", b"x" * 256])
def test_quote_refuses_names_debugfs_cannot_carry(name: bytes) -> None:
    with pytest.raises(debugfs.UnsafeScript):
        debugfs.quote(name)


def test_quote_doubles_quotes() -> None:
    assert debugfs.quote(b'we"ird name') == b'"we""ird name"'


@pytest.mark.parametrize("line", [b"!id", b"  !rm -rf /", b"x" * 5000, b"ls\nid"])
def test_check_line_refuses_shell_escapes_and_long_lines(line: bytes) -> None:
    with pytest.raises(debugfs.UnsafeScript):
        debugfs.check_line(line)


def test_parse_ls_skips_unused_slots_and_splits_names() -> None:
    out = (
        b"debugfs: ls -p <2>\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n"
        b'/12/100644/1000/100/we"ird name 5/5/\n\n'
        b"debugfs: ls -p <11>\n/11/040700/0/0/.//\n/0/000000/0/0//0/\n"
    )
    parsed = debugfs.parse_ls(out)
    assert [e.ino for e in parsed[2]] == [2, 2, 12]
    assert parsed[2][2].name == b'we"ird name 5' and parsed[2][2].size == 5
    assert (parsed[2][2].uid, parsed[2][2].gid, parsed[2][2].mode) == (1000, 100, 0o100644)
    assert [e.ino for e in parsed[11]] == [11]


def test_run_script_fails_on_any_error_line(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(ToolError) as info:
        debugfs.run_script(image, [b"stat <2>"], epoch=1, write=False)
    assert "debugfs reported errors" in str(info.value)
