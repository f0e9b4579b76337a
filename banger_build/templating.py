"""Rendering templates: Jinja2's sandbox, StrictUndefined, bounded, in a child process.

A recipe's templates are data, not code. They render in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (no attribute of Python's
internals, no mutation of the recipe's values: ``{{ cycler.__init__.__globals__
.os.popen("id").read() }}`` is refused), with StrictUndefined and no
autoescape, exactly as plain Jinja renders a template that stays inside it.

The sandbox bounds what a template may *touch*, not what it may *cost*: a
template can loop 10^10 times, build a 10 GB string or recurse through a
macro. So all templates of a recipe render in one forked child process with

* an address-space limit (``RENDER_MEMORY`` above what the process maps already),
* a wall-clock limit for the whole batch (``RENDER_TIMEOUT``), after which
  the child is killed,
* output limits: ``MAX_RENDERED`` per template (the render is streamed with
  ``generate()`` and stops past it), ``MAX_RENDERED_TOTAL`` for the batch,
* ``MAX_TEMPLATE_SOURCE`` per template file read (the template and each
  ``{% include %}``).

Whatever goes wrong inside (a syntax error, ``{{ 1/0 }}``, RecursionError,
MemoryError, a non-UTF-8 file, a FIFO as template, the child dying) becomes
one ``InputError`` naming the recipe position, the template file and, when
known, its line. A template's rendered bytes, not its source, are what the
derivation hashes: two templates that render the same give the same image.

This module is the parent's side (jobs, the child, its limits and its report);
the child's side, the sandbox itself, is ``sandbox``: imported when there is a
template to render, so a build that renders none does not load jinja2.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from banger_build.errors import InputError, Reason
from banger_build.sources import SourceRoots

#: Bytes of one template file read (a template or one it includes): templates
#: are a few KiB; this only stops a huge or endless file early.
MAX_TEMPLATE_SOURCE = 1 << 20
#: Bytes one template may render to: config files and scripts, not images.
MAX_RENDERED = 16 << 20
#: Bytes all templates of one recipe may render to (they are held in memory
#: until the build writes them).
MAX_RENDERED_TOTAL = 256 << 20
#: Seconds (wall clock) all templates of one recipe may take to render.
RENDER_TIMEOUT = 30.0
#: Bytes of address space the rendering child may map beyond what it inherits.
RENDER_MEMORY = 1 << 30

_OK, _ERR = b"O", b"E"
_HEADER = 9  # status byte + 8-byte length


@dataclass(frozen=True)
class TemplateJob:
    """One template to render: a recipe file (``path``) or package data (``builtin``)."""

    label: str  # how errors name it: the file's path, or "built-in template NAME"
    path: Path | None = None
    builtin: Traversable | None = None
    #: where a recipe template's {% include %} may read from; None: only files
    #: resolving inside the template's own directory
    roots: SourceRoots | None = None
    prefix: str = ""  # put in front of every error: the recipe position, "file:l:c: key: "

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "template"


class Failure(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Limit(Exception):
    pass


def render_template(src: Path, context: Mapping[str, Any], *, label: str | None = None) -> bytes:
    """Render one template file with ``context``; errors name the file and line."""
    return render_templates([TemplateJob(label or str(src), path=src)], context)[0]


def render_templates(jobs: Sequence[TemplateJob], context: Mapping[str, Any]) -> list[bytes]:
    """The rendered bytes of each job, in order; the first failure is an ``InputError``."""
    if not jobs:
        return []
    # jinja2 is imported here, before the fork: never by a forked child, where an
    # import lock another thread held at the fork would stay held
    from banger_build import sandbox

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, report, never return into the caller's code
        code = 70
        try:
            os.close(rfd)
            _child(jobs, context, wfd, sandbox.render_job)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    reaped: list[int] = []  # the child's wait status, once reaped (its pid is free then)
    try:
        return _supervise(pid, rfd, jobs, reaped)
    finally:
        os.close(rfd)
        if not reaped:  # done, failed or interrupted: the child has nothing left to say
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- the parent --------------------------------------------------------------------


def _supervise(pid: int, rfd: int, jobs: Sequence[TemplateJob], reaped: list[int]) -> list[bytes]:
    deadline = time.monotonic() + RENDER_TIMEOUT
    results: list[bytes] = []
    for job in jobs:
        header = _read_exact(rfd, _HEADER, deadline, job)
        if len(header) < _HEADER:
            raise _died(pid, job, reaped)
        status, size = header[:1], int.from_bytes(header[1:], "big")
        if size > MAX_RENDERED:  # the child stops before; never trust a length blindly
            raise InputError(f"{job.prefix}{job.label}: the renderer sent a bad answer")
        payload = _read_exact(rfd, size, deadline, job)
        if len(payload) < size:
            raise _died(pid, job, reaped)
        if status == _OK:
            results.append(payload)
            continue
        try:
            answer = json.loads(payload)
            reason, message = Reason(answer["reason"]), str(answer["message"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{job.prefix}{job.label}: the renderer sent a bad answer") from None
        raise InputError(job.prefix + message, reason=reason)
    return results


def _read_exact(fd: int, size: int, deadline: float, job: TemplateJob) -> bytes:
    chunks: list[bytes] = []
    got = 0
    poller = select.poll()  # not select(): any descriptor number works
    poller.register(fd, select.POLLIN)
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise InputError(
                f"{job.prefix}{job.label}: rendering took longer than {RENDER_TIMEOUT:g} s "
                "(the limit for all templates of a recipe)",
                reason=Reason.TEMPLATE_LIMIT,
            )
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _died(pid: int, job: TemplateJob, reaped: list[int]) -> InputError:
    _, status = os.waitpid(pid, 0)
    reaped.append(status)
    if os.WIFSIGNALED(status):
        how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(status)}"
    return InputError(
        f"{job.prefix}{job.label}: rendering stopped: the renderer {how} "
        f"(a template may use at most {RENDER_MEMORY >> 20} MiB of memory)",
        reason=Reason.TEMPLATE_LIMIT,
    )


# -- the child ---------------------------------------------------------------------


def _child(
    jobs: Sequence[TemplateJob],
    context: Mapping[str, Any],
    wfd: int,
    render_job: Callable[[TemplateJob, Mapping[str, Any], int], bytes],
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)  # the parent reports; the child just stops
    _limit_memory()
    total = 0
    with os.fdopen(wfd, "wb") as out:
        for job in jobs:
            budget = min(MAX_RENDERED, MAX_RENDERED_TOTAL - total)
            try:
                data = render_job(job, context, budget)
            except Failure as failure:
                payload = json.dumps({"reason": failure.reason, "message": failure.message})
                out.write(_ERR + _frame(payload.encode()))
                return
            total += len(data)
            out.write(_OK + _frame(data))
            out.flush()


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "big") + payload


def _limit_memory() -> None:
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + RENDER_MEMORY
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass  # the wall-clock limit still holds
