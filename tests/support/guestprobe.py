"""The guest probe: a unit the boot smoke tests add to a Debian recipe, which
reports from inside the running guest what the tests assert.

``probe_recipe`` copies the checkout's recipes/ and templates/ into a project
and writes ``recipes/probe.toml``: recipes/debian.toml (its [guest] set
included, the agent its agent_ref's for the platform) with another image
reference and platform, a [kernel] (installed modules) and the probe. The
probe unit runs once the guest set's units ran and before the serial getty,
so the login prompt, which ``boot`` waits for by default, comes after every
``BANGER-PROBE`` line. ``facts(console)`` parses those lines; ``assert_agent_ping`` checks what
``boot --ping-agent`` said.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from banger_build.vsock import VSOCK_DEVICE, vsock_cid

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


def probe_recipe(
    top: Path, *, ref: str, platform: str, vmlinuz: Path, initrd: Path, modules: Path
) -> Path:
    """``top/recipes/probe.toml`` (``top`` becomes a project like the checkout)."""
    (top / ".git").mkdir(parents=True)
    for name in ("recipes", "templates"):
        shutil.copytree(REPO / name, top / name, ignore=shutil.ignore_patterns("*.lock"))
    d = top / "recipes"
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
        + f"""
[kernel]
path = "{vmlinuz}"
initrd = "{initrd}"
modules = "{modules}"
install_modules = true

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
