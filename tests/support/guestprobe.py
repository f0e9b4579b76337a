"""The guest probe: a unit the boot smoke tests add to a Debian recipe, which
reports from inside the running guest what the tests assert.

``probe_recipe`` copies the checkout's recipes/ and templates/ into a project
and writes ``recipes/probe.toml``: recipes/debian.toml (its [guest] set
included, the agent its agent_ref's for the platform) with another image
reference and platform, a [kernel] (installed modules) and the probe. The
probe unit runs once the guest set's units ran and before the serial getty,
so the login prompt, which ``boot`` waits for by default, comes after every
``BANGER-PROBE`` line. ``build_probe`` builds it, ``boot`` boots a store path,
``facts(console)`` parses the probe's lines, ``assert_guest_set_ran`` asserts what
every probe boot shows and ``assert_agent_ping`` checks what ``boot --ping-agent`` said.

``copy_project`` and ``kernel_section`` also serve the boot tests' own recipes.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from banger_build.vsock import VSOCK_DEVICE, vsock_cid
from tests.support.bootkernel import BootKernel
from tests.support.e2e import run_cli

REPO = Path(__file__).resolve().parents[2]
DONE = "BANGER-PROBE-DONE"

UNIT = """\
[Unit]
Description=banger guest probe (tests)
Wants=banger-network.service banger-vsock-agent.service banger-first-boot.service
After=banger-network.service banger-vsock-agent.service banger-first-boot.service
Before=getty.target serial-getty@ttyS0.service serial-getty@ttyAMA0.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/libexec/banger-probe

[Install]
WantedBy=multi-user.target
"""

SCRIPT = """\
#!/bin/sh
say() { echo "BANGER-PROBE $*" > /dev/console; }
sleep 2
for u in banger-network banger-vsock-agent banger-first-boot; do
    say "unit $u $(systemctl show -p ActiveState --value $u.service)" \\
        "$(systemctl show -p Result --value $u.service)"
done
say "arch $(uname -m)"
say "addr $(ip -4 -o addr show scope global | tr -s ' ' | cut -d' ' -f2,4 | tr '\\n' ' ')"
say "route $(ip -4 route show default | tr '\\n' ' ')"
say "agent $(stat -c '%a %u %g' /usr/local/bin/banger-vsock-agent)"
if [ -e /var/lib/banger/first-boot-pending ]; then say "marker present"
else say "marker absent"; fi
if [ -d "/lib/modules/$(uname -r)/kernel" ]; then say "modules present"
else say "modules missing"; fi
loaded=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')
for m in vsock vmw_vsock_virtio_transport; do
    case " $loaded" in *" $m "*) say "module $m loaded" ;; *) say "module $m missing" ;; esac
done
echo BANGER-PROBE-DONE > /dev/console
"""


def copy_project(top: Path, names: tuple[str, ...] = ("recipes", "templates")) -> Path:
    """``top`` becomes a project like the checkout: a .git and copies of the checkout's
    ``names`` (lock files left out); returns ``top/recipes``."""
    (top / ".git").mkdir(parents=True)
    for name in names:
        shutil.copytree(
            REPO / name, top / name, symlinks=True, ignore=shutil.ignore_patterns("*.lock")
        )
    return top / "recipes"


def kernel_section(vmlinuz: Path, initrd: Path, modules: Path) -> str:
    """A recipe's [kernel] with these files, its modules installed in the image."""
    return f"""
[kernel]
path = "{vmlinuz}"
initrd = "{initrd}"
modules = "{modules}"
install_modules = true
"""


def probe_recipe(
    top: Path, *, ref: str, platform: str, vmlinuz: Path, initrd: Path, modules: Path
) -> Path:
    """``top/recipes/probe.toml`` (``top`` becomes a project like the checkout)."""
    d = copy_project(top)
    (d / "banger-probe.service.j2").write_text(UNIT)
    (d / "banger-probe.j2").write_text(SCRIPT)
    base = (d / "debian.toml").read_text()
    base = base.replace(
        'ref = "docker.io/library/debian:bookworm"\nplatform = "linux/amd64"\n',
        f'ref = "{ref}"\nplatform = "{platform}"\n',
    )
    assert f'platform = "{platform}"' in base, "recipes/debian.toml's [image] changed"
    recipe = d / "probe.toml"
    recipe.write_text(
        base
        + kernel_section(vmlinuz, initrd, modules)
        + """
[[templates]]
src = "banger-probe.service.j2"
dest = "/etc/systemd/system/banger-probe.service"

[[templates]]
src = "banger-probe.j2"
dest = "/usr/local/libexec/banger-probe"
mode = "0755"

[[symlinks]]
dest = "/etc/systemd/system/multi-user.target.wants/banger-probe.service"
target = "/etc/systemd/system/banger-probe.service"
"""
    )
    return recipe


def build_probe(
    top: Path, *, ref: str, platform: str, mirror: str, kernel: BootKernel
) -> tuple[Path, Path]:
    """Build the probe recipe (project ``top/project``, home ``top/home``) from the image
    ``ref`` served by ``mirror``, with ``kernel``; return (home, store path)."""
    recipe = probe_recipe(
        top / "project", ref=ref, platform=platform,
        vmlinuz=kernel.vmlinuz, initrd=kernel.initrd, modules=kernel.modules_dir,
    )  # fmt: skip
    home = top / "home"
    allow = [a for d in kernel.dirs for a in ("--allow-source", str(d))]
    code, out, err = run_cli(home, str(recipe), "--no-link", "--mirror", mirror, *allow)
    assert code == 0, err
    return home, Path(out.strip())


def boot(home: Path, store_path: Path, log: Path, *options: str) -> tuple[str, str, float]:
    """``boot STORE_PATH OPTIONS --console-log LOG``, asserted to succeed; returns
    (its stderr, the console, the seconds it took)."""
    started = time.monotonic()
    code, _, err = run_cli(home, "boot", str(store_path), *options, "--console-log", str(log))
    seconds = time.monotonic() - started
    console = log.read_text(errors="replace")
    assert code == 0, f"{err}\n--- console (end) ---\n{console[-4000:]}"
    return err, console, seconds


def facts(console: str) -> dict[str, str]:
    """``BANGER-PROBE <name> <value>`` lines as {name: value} (units and modules as
    "unit NAME", "module NAME")."""
    out: dict[str, str] = {}
    for line in re.findall(r"BANGER-PROBE (\S+ .*?)\s*\r?$", console, re.MULTILINE):
        name, _, value = line.partition(" ")
        if name in ("unit", "module"):
            which, _, value = value.partition(" ")
            name = f"{name} {which}"
        out[name] = value.strip()
    return out


def assert_agent_ping(err: str, console: str) -> None:
    """The agent answered, or, on a host without vhost-vsock, the ping was skipped
    saying so (asserted: never a silent pass)."""
    if vsock_cid() is None:
        skipped = re.search(r"banger-build: agent ping skipped: (.*)", err)
        assert skipped is not None, err
        assert VSOCK_DEVICE in skipped.group(1)
        print(f"agent ping skipped: {skipped.group(1)}")
    else:
        assert "the agent answered 'pong' on vsock port 1024" in err, err + console[-3000:]


def assert_guest_set_ran(console: str) -> dict[str, str]:
    """The probe reported before the login prompt: the guest set's units succeeded
    (the agent's runs), eth0 has boot's user-mode address, the agent is root's 0755,
    the first-boot marker is gone, the kernel's modules are installed and the vsock
    modules loaded. Returns the probe's facts."""
    got = facts(console)
    assert DONE in console and console.index(DONE) < console.rindex("login:")
    assert got["unit banger-network"] == "active success", console[-3000:]
    assert got["unit banger-first-boot"] == "active success", console[-3000:]
    assert got["unit banger-vsock-agent"].startswith("active"), console[-3000:]
    assert "10.0.2.15/24" in got["addr"], got
    assert got["agent"] == "755 0 0" and got["marker"] == "absent"
    assert got["modules"] == "present"
    # modules-load.d's vsock modules, loaded from the image's modules (modules.dep made
    # at build time)
    assert got["module vsock"] == got["module vmw_vsock_virtio_transport"] == "loaded", got
    return got
