"""The rendering child's side of templating: a job's template read (checked and
bounded), rendered in jinja2's ``ImmutableSandboxedEnvironment`` with
``StrictUndefined``, and any problem at all turned into one ``Failure`` that
names the file and line. ``templating`` imports this module (and so jinja2)
when there is a template to render: a build that renders none does not load
the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.sandbox
from jinja2.loaders import split_template_path

from banger_build.errors import Reason
from banger_build.sources import SourceRefused, SourceRoots, read_regular
from banger_build.templating import (
    MAX_RENDERED,
    MAX_RENDERED_TOTAL,
    MAX_TEMPLATE_SOURCE,
    RENDER_MEMORY,
    Failure,
    Limit,
    TemplateJob,
)

#: Characters of an error message taken from inside a template.
_MAX_MESSAGE = 500


class _Loader(jinja2.BaseLoader):
    """The job's template, and what it includes from its directory (checked, bounded)."""

    def __init__(self, job: TemplateJob, text: str) -> None:
        self.job = job
        self.text = text
        self.files: set[str] = {job.label}

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        if template == self.job.name:
            return self.text, self.job.label, lambda: True
        if self.job.path is None:
            raise jinja2.TemplateNotFound(template)
        directory = self.job.path.parent
        path = directory.joinpath(*split_template_path(template))  # refuses ".."
        roots = self.job.roots or SourceRoots((Path(os.path.realpath(directory)),))
        try:
            raw = read_regular(roots.check(path), MAX_TEMPLATE_SOURCE, "template")
        except SourceRefused as exc:
            if exc.reason == Reason.MISSING_INPUT:  # what `ignore missing` looks for
                raise jinja2.TemplateNotFound(template) from None
            raise
        text = _decode(raw, str(path))
        self.files.add(str(path))
        return text, str(path), lambda: True


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def _decode(raw: bytes, label: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise Failure(
            Reason.TEMPLATE_SYNTAX, f"{label}:{line}: the template is not valid UTF-8"
        ) from None


def _read_main(job: TemplateJob) -> str:
    if job.builtin is not None:
        try:
            raw = job.builtin.read_bytes()
        except OSError as exc:
            raise Failure(
                Reason.GUEST_TEMPLATES_MISSING,
                f"{job.label}: cannot read it ({exc.strerror or exc}): the installation is "
                "incomplete",
            ) from None
    else:
        assert job.path is not None
        try:  # checked again: a symlink on the way may have changed since loading
            path = job.roots.check(job.path) if job.roots is not None else job.path
            raw = read_regular(path, MAX_TEMPLATE_SOURCE, "template")
        except SourceRefused as exc:
            raise Failure(exc.reason, exc.message) from None
    return _decode(raw, job.label)


def render_job(job: TemplateJob, context: Mapping[str, Any], budget: int) -> bytes:
    """The rendered bytes, or ``Failure`` for any problem at all."""
    loader: _Loader | None = None
    try:
        loader = _Loader(job, _read_main(job))
        template = _environment(loader).get_template(job.name)
        out: list[bytes] = []
        size = 0
        for chunk in template.generate(dict(context)):  # a dict: any [vars] name works
            data = chunk.encode("utf-8")
            size += len(data)
            if size > budget:
                raise Limit
            out.append(data)
        return b"".join(out)
    except Failure:
        raise
    except BaseException as exc:  # everything becomes one clean error
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        files = loader.files if loader is not None else {job.label}
        raise _failure(job, exc, files, budget) from None


def _failure(job: TemplateJob, exc: BaseException, files: set[str], budget: int) -> Failure:
    try:
        where = _where(job, exc, files)
        reason, what = _describe(exc, budget)
        return Failure(reason, f"{where}: {what}"[: _MAX_MESSAGE * 2])
    except BaseException:  # e.g. MemoryError while describing one
        return Failure(Reason.TEMPLATE_ERROR, f"{job.label}: the template failed to render")


def _where(job: TemplateJob, exc: BaseException, files: set[str]) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        name = exc.filename or job.label
        return f"{name}:{exc.lineno}" if exc.lineno else name
    found: tuple[str, int] | None = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in files:
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return f"{found[0]}:{found[1]}" if found else job.label


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(exc: BaseException, budget: int) -> tuple[Reason, str]:
    if isinstance(exc, Limit):
        if budget < MAX_RENDERED:
            return Reason.TEMPLATE_LIMIT, (
                f"the recipe's templates render to more than {MAX_RENDERED_TOTAL >> 20} MiB in all"
            )
        return Reason.TEMPLATE_LIMIT, f"renders to more than {MAX_RENDERED >> 20} MiB"
    if isinstance(exc, SourceRefused):
        return exc.reason, exc.message
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return Reason.TEMPLATE_SYNTAX, f"template syntax error: {_short(exc.message or '')}"
    if isinstance(exc, jinja2.UndefinedError):
        return Reason.TEMPLATE_UNDEFINED, (
            f"{_short(exc.message or '')} (define it under [vars] in the recipe)"
        )
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return Reason.TEMPLATE_UNSAFE, f"refused by the template sandbox: {_short(str(exc))}"
    if isinstance(exc, jinja2.TemplateNotFound):
        return Reason.TEMPLATE_MISSING, f"template not found: {_short(str(exc.name))}"
    if isinstance(exc, RecursionError):
        return Reason.TEMPLATE_LIMIT, "recursion too deep (a macro or include calls itself?)"
    if isinstance(exc, MemoryError):
        return Reason.TEMPLATE_LIMIT, (
            f"needs more than the {RENDER_MEMORY >> 20} MiB of memory a template may use"
        )
    if isinstance(exc, jinja2.TemplateError):
        return Reason.TEMPLATE_ERROR, f"template error: {_short(str(exc))}"
    return Reason.TEMPLATE_ERROR, f"{type(exc).__name__}: {_short(str(exc))}"
