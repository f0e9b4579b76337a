"""Shell completion scripts, generated from the parser; the bash one run for real."""

from __future__ import annotations

import contextlib
import io
import subprocess

import pytest

from banger_build.cli import COMMANDS, main


def _script(shell: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["completion", shell]) == 0
    return out.getvalue()


def _complete(script: str, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), with the script loaded."""
    words = line.split(" ")
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_banger_build\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_bash_completes_commands_and_each_commands_options() -> None:
    script = _script("bash")
    assert set(_complete(script, "banger-build ")) >= {m.NAME for m in COMMANDS}
    assert _complete(script, "banger-build bu") == ["build", "bundle"]
    gc = _complete(script, "banger-build gc --")
    assert "--dry-run" in gc and "--older-than" in gc and "--substituter" not in gc
    assert "--substituter" in _complete(script, "banger-build build recipes/x.toml --sub")


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_name_every_command(shell: str) -> None:
    script = _script(shell)
    for module in COMMANDS:
        assert module.NAME in script
    if shell == "fish":
        assert "__fish_seen_subcommand_from gc' -l dry-run" in script
    else:
        assert script.startswith("#compdef banger-build") and "bashcompinit" in script
