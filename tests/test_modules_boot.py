"""Issue 11, loadable modules end to end: the Debian recipe installs the cloud
kernel's modules (a tree with no modules.dep, as the package ships it); booted in
a qemu microVM, systemd-modules-load loads what modules-load.d names through the
indexes the build generated, and a check unit reports from inside the guest:

* the guest set's vsock modules are loaded (``vsock``, ``vmw_vsock_virtio_transport``),
  and ``vmw_vsock_virtio_transport_common``, which only modules.dep names;
* an alias loads its module and that module's dependency (``fs-vfat``: vfat, fat);
* a module built into the kernel (``ext4``) counts as loaded (modules.builtin.bin):
  systemd-modules-load.service succeeds;
* kmod-static-nodes.service does not fail on an image without /bin/kmod.

The guest has no modprobe or lsmod (the image has libkmod, not kmod): the check
reads /proc/modules.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.debian import DebianImage
from tests.support.e2e import run_cli
from tests.support.guestprobe import boot, copy_project, kernel_section
from tests.support.kernel import KernelFiles

pytestmark = pytest.mark.slow

CHECK_UNIT = """\
[Unit]
Description=banger modules check (tests)
After=systemd-modules-load.service kmod-static-nodes.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/libexec/banger-modules-check

[Install]
WantedBy=multi-user.target
"""

CHECK_SCRIPT = """\
#!/bin/sh
say() { echo "BANGER-MODULES $*" > /dev/console; }
for u in systemd-modules-load kmod-static-nodes; do
    say "unit $u $(systemctl show -p ActiveState --value $u.service)" \\
        "$(systemctl show -p Result --value $u.service)"
done
for m in vsock vmw_vsock_virtio_transport vmw_vsock_virtio_transport_common vfat fat; do
    if grep -q "^$m " /proc/modules; then say "module $m loaded"; else say "module $m absent"; fi
done
say "release $(uname -r)"
echo BANGER-MODULES-DONE > /dev/console
"""

LOAD_CONF = "# tests: an alias, and a module built into the kernel\nfs-vfat\next4\n"


def _recipe(top: Path, kernel: KernelFiles) -> Path:
    d = copy_project(top, ("recipes", "templates", "agents"))  # a project, as the checkout is
    (d / "check.service").write_text(CHECK_UNIT)
    (d / "check.sh").write_text(CHECK_SCRIPT)
    (d / "load.conf").write_text(LOAD_CONF)
    recipe = d / "modules-check.toml"
    recipe.write_text(
        (d / "debian.toml").read_text()
        + kernel_section(kernel.vmlinuz, kernel.initrd, kernel.modules_dir)
        + """
[[files]]
src = "load.conf"
dest = "/etc/modules-load.d/banger-tests.conf"

[[files]]
src = "check.service"
dest = "/etc/systemd/system/banger-modules-check.service"

[[files]]
src = "check.sh"
dest = "/usr/local/libexec/banger-modules-check"
mode = "0755"

[[symlinks]]
dest = "/etc/systemd/system/multi-user.target.wants/banger-modules-check.service"
target = "/etc/systemd/system/banger-modules-check.service"
"""
    )
    return recipe


def test_modules_from_the_image_load_in_the_guest(
    debian_image_and_agent: DebianImage, debian_kernel_files: KernelFiles, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, debian_kernel_files)
    home = tmp_path / "home"
    started = time.monotonic()
    code, out, err = run_cli(
        home, str(recipe), "--no-link", "--mirror", debian_image_and_agent.mirror,
        "--allow-source", str(debian_kernel_files.vmlinuz.parent),  # the cached kernel
    )  # fmt: skip
    assert code == 0, err
    print(f"built in {time.monotonic() - started:.1f}s")
    store_path = Path(out.strip())
    _, console, boot_s = boot(
        home, store_path, tmp_path / "console.log",
        "--accel", "tcg", "--expect", "BANGER-MODULES-DONE", "--timeout", "600",
    )  # fmt: skip
    print(f"booted to the check unit in {boot_s:.1f}s")
    said = re.findall(r"BANGER-MODULES (.*?)\r?$", console, re.MULTILINE)
    modules = dict(re.findall(r"module (\S+) (\S+)", "\n".join(said)))
    units = {u: (a, r) for u, a, r in re.findall(r"unit (\S+) (\S+) (\S+)", "\n".join(said))}
    tail = console[-3000:]
    assert modules == {
        "vsock": "loaded",
        "vmw_vsock_virtio_transport": "loaded",
        "vmw_vsock_virtio_transport_common": "loaded",  # a dependency: modules.dep
        "vfat": "loaded",  # an alias: modules.alias
        "fat": "loaded",
    }, tail
    assert units["systemd-modules-load"] == ("active", "success"), tail  # ext4: built in
    assert units["kmod-static-nodes"][1] == "success", tail  # skipped: no /bin/kmod
    assert f"release {debian_kernel_files.version}" in said, tail
