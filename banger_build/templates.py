"""Rendering guest templates with Jinja2 (StrictUndefined, no autoescape).

A template's rendered bytes, not its source, are what the derivation hashes:
two templates that render the same give the same image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from banger_build.errors import InputError, Reason


def _environment(search: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def render_template(src: Path, context: Mapping[str, Any], *, label: str | None = None) -> bytes:
    """Render ``src`` with ``context``; errors name the template file and line."""
    where = label or str(src)
    if not src.is_file():
        raise InputError(f"{where}: template not found", reason=Reason.TEMPLATE_MISSING)
    env = _environment(src.parent)
    try:
        template = env.get_template(src.name)
        return template.render(**context).encode("utf-8")
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"{where}:{exc.lineno}: template syntax error: {exc.message}",
            reason=Reason.TEMPLATE_SYNTAX,
        ) from exc
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, src)
        raise InputError(
            f"{where}{':' + str(line) if line else ''}: {exc.message} "
            f"(define it under [vars] in the recipe)",
            reason=Reason.TEMPLATE_UNDEFINED,
        ) from exc
    except jinja2.TemplateError as exc:
        raise InputError(f"{where}: template error: {exc}", reason=Reason.TEMPLATE_ERROR) from exc


def _template_line(exc: BaseException, src: Path) -> int | None:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(src):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
