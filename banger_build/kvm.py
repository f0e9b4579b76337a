"""KVM or TCG for a boot: ``choose_accel``.

/dev/kvm is no proof that KVM works: on some hosts a guest hangs silently in
early boot. So ``auto`` uses KVM only after a short diskless probe boot got
as far as starting init (or, without an initrd, panicking on the missing
root and stopping the VM). The probe's answer is kept per host in
``ProbeCache`` (``$XDG_CACHE_HOME/banger-build/kvm-probe.json``, default
``~/.cache``), keyed by the host kernel's release, the qemu binary's version
and the guest architecture: a new kernel or qemu probes again. A guest of
another architecture than the host's never uses KVM.

The probe itself (a boot) is ``boot.probe_kvm``, handed in as a function.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from banger_build.errors import BangerError, InputError, Reason
from banger_build.machines import Machine
from banger_build.run import run
from banger_build.vmrun import BootError

ACCELS = ("auto", "kvm", "tcg")
CACHE_NAME = "kvm-probe.json"
CACHE_FORMAT = 1


def kvm_available(device: str = "/dev/kvm") -> bool:
    return os.access(device, os.R_OK | os.W_OK)


def host_machine() -> str:
    return os.uname().machine


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "banger-build" / CACHE_NAME


def qemu_version(qemu: str) -> str:
    """The first line of ``qemu --version`` ("" when it cannot be run)."""
    try:
        proc = run([qemu, "--version"], check=False, timeout=30)
    except BangerError:
        return ""
    text = proc.stdout.decode("utf-8", "replace").strip()
    return text.split("\n", 1)[0] if proc.returncode == 0 else ""


class ProbeCache:
    """Probe answers in a small JSON file: {"format": 1, "answers": {key: bool}}.

    Unreadable or foreign content counts as empty; writes are atomic (a temp
    file renamed); a write that fails is skipped (the answer is only lost).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: remember nothing across processes

    @staticmethod
    def key(qemu: str, arch: str) -> str:
        return f"{os.uname().release} | {qemu_version(qemu) or qemu} | {arch}"

    def _answers(self) -> dict[str, bool]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        answers = data.get("answers") if isinstance(data, dict) else None
        if data.get("format") != CACHE_FORMAT or not isinstance(answers, dict):
            return {}
        return {k: v for k, v in answers.items() if isinstance(v, bool)}

    def get(self, key: str) -> bool | None:
        return self._answers().get(key)

    def put(self, key: str, works: bool) -> None:
        if self.path is None:
            return
        answers = {**self._answers(), key: works}
        body = json.dumps({"format": CACHE_FORMAT, "answers": answers}, indent=2, sort_keys=True)
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(body + "\n")
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


#: Answers of this process, for callers without a cache file (the library's default).
_probed: dict[str, bool] = {}


def choose_accel(
    requested: str,
    machine: Machine,
    qemu: str,
    probe: Callable[[], bool],
    cache: ProbeCache,
    note: Callable[[str], None] = lambda _: None,
) -> str:
    """``kvm`` or ``tcg`` for ``requested``; ``auto`` probes KVM (``probe()``) once
    per host, qemu and guest architecture, remembered in ``cache``."""
    if requested not in ACCELS:
        raise InputError(f"--accel {requested}: expected one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return "tcg"
    host = host_machine()
    if host not in machine.hosts:
        if requested == "kvm":
            raise BootError(
                f"--accel kvm: an {machine.arch} guest cannot use KVM on this {host} host "
                "(use --accel tcg or auto)",
                reason=Reason.NO_KVM,
            )
        note(f"an {machine.arch} guest on a {host} host: TCG")
        return "tcg"
    if not kvm_available():
        if requested == "kvm":
            raise BootError(
                "--accel kvm: /dev/kvm is missing or not accessible", reason=Reason.NO_KVM
            )
        return "tcg"
    if requested == "kvm":
        return "kvm"
    key = cache.key(qemu, machine.arch)
    works = _probed.get(key)
    if works is None:
        works = cache.get(key)
        if works is not None:
            where = f" (remembered in {cache.path}; delete it to probe again)"
            note(("KVM works" if works else "KVM probe failed before: using TCG") + where)
    if works is None:
        note("probing KVM (a short diskless boot)")
        works = probe()
        cache.put(key, works)
        note("KVM works" if works else "KVM probe failed: using TCG")
    _probed[key] = works
    return "kvm" if works else "tcg"
