"""Issue 3 end to end: the Debian recipe with the built-in guest set boots to
multi-user in a qemu microVM, and a check unit inside the running guest reports
what the test asserts: the network, agent and first-boot units ran, the
network unit gave eth0 the address boot put on the command line (banger.ip=,
for boot's user-mode NIC), the first-boot marker is gone, the machine id is
fresh, and the image's owners and modes are what the layers said
(/usr/bin/su root 4755, /etc/shadow root:shadow 0640).

The kernel is Debian's amd64 cloud kernel with an initramfs that also loads
the NIC's driver (tests/support/bootkernel.py); its modules are installed in
the image.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.bootkernel import BootKernel
from tests.support.debian import DebianImage
from tests.support.e2e import run_cli
from tests.support.guestprobe import assert_agent_ping, boot, copy_project, kernel_section

BAKED_ID = "0123456789abcdef0123456789abcdef"  # as if the base image shipped one

pytestmark = pytest.mark.slow

CHECK_UNIT = """\
[Unit]
Description=banger boot check (tests)
Wants=banger-network.service banger-vsock-agent.service banger-first-boot.service
After=banger-network.service banger-vsock-agent.service banger-first-boot.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/libexec/banger-check

[Install]
WantedBy=multi-user.target
"""

CHECK_SCRIPT = """\
#!/bin/sh
say() { echo "BANGER-CHECK $*" > /dev/console; }
sleep 2
for u in banger-network banger-vsock-agent banger-first-boot; do
    say "unit $u $(systemctl show -p ActiveState --value $u.service)" \\
        "$(systemctl show -p Result --value $u.service)"
done
if [ -e /var/lib/banger/first-boot-pending ]; then say "marker present"
else say "marker absent"; fi
say "machine-id $(cat /etc/machine-id)"
say "su $(stat -c '%a %u %g' /usr/bin/su)"
say "shadow $(stat -c '%a %U %G' /etc/shadow)"
say "agent $(stat -c '%a %u %g' /usr/local/bin/banger-vsock-agent)"
say "addr $(ip -4 -o addr show scope global | tr -s ' ' | cut -d' ' -f2,4 | tr '\\n' ' ')"
if [ -d "/lib/modules/$(uname -r)/kernel" ]; then say "modules present"
else say "modules missing"; fi
echo BANGER-CHECK-DONE > /dev/console
"""


def _recipe(top: Path, kernel: BootKernel) -> Path:
    # a project, as the checkout is: ../templates lies inside it
    d = copy_project(top, ("recipes", "templates", "agents"))
    (d / "machine-id").write_text(BAKED_ID + "\n")
    (d / "banger-check.service.j2").write_text(CHECK_UNIT)
    (d / "banger-check.j2").write_text(CHECK_SCRIPT)
    recipe = d / "boot-check.toml"
    recipe.write_text(
        (d / "debian.toml").read_text()
        + kernel_section(kernel.vmlinuz, kernel.initrd, kernel.modules_dir)
        + """
[[files]]
src = "machine-id"
dest = "/etc/machine-id"
mode = "0444"

[[templates]]
src = "banger-check.service.j2"
dest = "/etc/systemd/system/banger-check.service"

[[templates]]
src = "banger-check.j2"
dest = "/usr/local/libexec/banger-check"
mode = "0755"

[[symlinks]]
dest = "/etc/systemd/system/multi-user.target.wants/banger-check.service"
target = "/etc/systemd/system/banger-check.service"
"""
    )
    return recipe


def test_debian_boots_with_the_guest_set_running(
    debian_image_and_agent: DebianImage, amd64_boot_kernel: BootKernel, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, amd64_boot_kernel)
    home = tmp_path / "home"
    allow = [a for d in amd64_boot_kernel.dirs for a in ("--allow-source", str(d))]
    code, out, err = run_cli(
        home, str(recipe), "--no-link", "--mirror", debian_image_and_agent.mirror, *allow
    )  # the cached kernel
    assert code == 0, err
    store_path = Path(out.strip())
    assert (store_path / "vmlinux").is_file() and (store_path / "initrd.img").is_file()

    _, console, boot_s = boot(
        home, store_path, tmp_path / "console.log",
        "--accel", "tcg", "--expect", "BANGER-CHECK-DONE", "--timeout", "600",
    )  # fmt: skip
    print(f"booted to the check unit in {boot_s:.1f}s")
    facts = dict(
        line.split(" ", 1)
        for line in re.findall(r"BANGER-CHECK (\S+ .*?)\r?$", console, re.MULTILINE)
        if " " in line
    )
    units = re.findall(r"BANGER-CHECK unit (\S+) (\S+) (\S+)", console)
    states = {name: (active, result) for name, active, result in units}
    assert states["banger-network"][1] == "success", console[-3000:]
    assert states["banger-first-boot"][1] == "success", console[-3000:]
    assert states["banger-vsock-agent"][0] == "active", console[-3000:]
    assert facts["marker"] == "absent"
    machine_id = facts["machine-id"].strip()
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id) and machine_id != BAKED_ID
    assert facts["su"].strip() == "4755 0 0"
    assert facts["shadow"].strip() == "640 root shadow"
    assert facts["agent"].strip() == "755 0 0"
    assert facts["modules"].strip() == "present"
    assert facts["addr"].strip() == "eth0 10.0.2.15/24", console[-3000:]


def test_boot_recipe_with_user_supplied_kernel(
    debian_image_and_agent: DebianImage, amd64_boot_kernel: BootKernel, tmp_path: Path
) -> None:
    """`banger-build boot recipes/debian.toml --kernel --initrd --ping-agent`: the recipe
    names no kernel, the user supplies one, as a microVM manager would; without
    --expect the login prompt ends the boot; the agent ping is answered or skipped
    with its reason (asserted)."""
    copy_project(tmp_path)  # a project, as the checkout is
    kernel = amd64_boot_kernel
    started = time.monotonic()
    code, _, err = run_cli(
        tmp_path / "home", "boot", str(tmp_path / "recipes" / "debian.toml"), "--accel", "tcg",
        "--mirror", debian_image_and_agent.mirror, "--kernel", str(kernel.vmlinuz),
        "--initrd", str(kernel.initrd), "--ping-agent", "--timeout", "600",
        "--console-log", str(tmp_path / "console.log"),
    )  # fmt: skip
    seconds = time.monotonic() - started
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert code == 0, f"{err}\n{console[-3000:]}"
    print(f"amd64 build and TCG boot to the login prompt: {seconds:.1f} s")
    assert "boot ok under tcg (amd64)" in err and "the login prompt appeared" in err
    assert console.rstrip().endswith("login:")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", console)  # without systemd's colours
    assert "Finished banger-network.se" in plain  # configured eth0 (see above)
    assert "[FAILED]" not in plain, plain[-3000:]  # no unit failed
    assert_agent_ping(err, console)
