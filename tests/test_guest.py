"""The built-in guest asset set: schema, resolution, derivation, rendering, the
scripts' behaviour, the agent, and one real build.

Unit tests use a stand-in agent binary; the agent tests build the real one
from agents/ into a temp dir with agents/build (gcc, libc6-dev).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import socket
import stat
import struct
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import jinja2
import jinja2.meta
import pytest

from banger_build import guest
from banger_build.derivation import derive
from banger_build.errors import InputError, RecipeError
from banger_build.inputs import Injected, resolve_injected, resolve_kernel
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor, ImageManifest
from banger_build.oci.reference import Digest
from banger_build.recipe import Recipe, load_recipe
from banger_build.vsock import AgentPing
from tests.support import elf
from tests.support.e2e import BASE, UPPER, push, run_cli, write_recipe
from tests.support.ext4read import fsck, read_image
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots" / "guest"
FAKE_AGENT = elf.stub("amd64", b"stand-in for banger-vsock-agent\n")

IMAGE = ImageManifest(
    digest=Digest("1" * 64),
    media_type=OCI_MANIFEST,
    config=Descriptor("application/vnd.oci.image.config.v1+json", Digest("2" * 64), 1234),
    layers=(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest("3" * 64), 4096),),
)

#: dest -> (kind, mode) of the whole set, as the issue lists it
EXPECTED = {
    "/usr/local/bin/banger-vsock-agent": ("file", 0o755),
    "/usr/local/libexec/banger-network-bootstrap": ("template", 0o755),
    "/usr/local/libexec/banger-first-boot": ("template", 0o755),
    "/etc/systemd/system/banger-network.service": ("template", 0o644),
    "/etc/systemd/system/banger-vsock-agent.service": ("template", 0o644),
    "/etc/systemd/system/banger-first-boot.service": ("template", 0o644),
    "/etc/systemd/system/multi-user.target.wants/banger-network.service": ("symlink", 0o777),
    "/etc/systemd/system/multi-user.target.wants/banger-vsock-agent.service": ("symlink", 0o777),
    "/etc/systemd/system/multi-user.target.wants/banger-first-boot.service": ("symlink", 0o777),
    "/etc/modules-load.d/banger-vsock.conf": ("template", 0o644),
    "/var/lib/banger/first-boot-pending": ("template", 0o644),
}
UNITS = ("banger-network.service", "banger-vsock-agent.service", "banger-first-boot.service")


def recipe_file(
    tmp_path: Path, guest_toml: str | None = 'agent = "bin/agent"\n', extra: str = ""
) -> Path:
    """A recipe with a stand-in agent at bin/agent, a file, a template and ``[guest]``."""
    (tmp_path / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bin" / "agent").write_bytes(FAKE_AGENT)
    (tmp_path / "motd").write_text("hello\n")
    (tmp_path / "hostname.j2").write_text("{{ hostname }}\n")
    path = tmp_path / "recipe.toml"
    guest_table = f"[guest]\n{textwrap.dedent(guest_toml)}" if guest_toml is not None else ""
    path.write_text(
        '[image]\nref = "debian:bookworm"\n\n'
        '[vars]\nhostname = "box"\n\n'
        '[[files]]\nsrc = "motd"\ndest = "/etc/motd"\n\n'
        '[[templates]]\nsrc = "hostname.j2"\ndest = "/etc/hostname"\n\n'
        + textwrap.dedent(extra)
        + "\n"
        + guest_table
    )
    return path


def override(src: str, name: str = "banger-network-bootstrap") -> str:
    """A [guest] table with the stand-in agent and one [guest.templates] entry."""
    return f'agent = "bin/agent"\n[guest.templates]\n"{name}" = "{src}"\n'


def by_dest(items: tuple[Injected, ...]) -> dict[str, Injected]:
    return {i.dest: i for i in items}


def key_of(recipe: Recipe) -> str:
    return derive(
        recipe, IMAGE, diff_ids=(Digest("5" * 64),), injected=resolve_injected(recipe),
        kernel=resolve_kernel(recipe.kernel),
        epoch=1_700_000_000,
    ).key  # fmt: skip


def recipe_error(path: Path) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value


# -- the set and its resolution -----------------------------------------------------


def test_the_definition_matches_the_issue() -> None:
    assert set(guest.DESTS) == set(EXPECTED)
    assert list(guest.DESTS) == sorted(EXPECTED, key=str.encode)
    for t in guest.TEMPLATES:
        assert guest.builtin_template(t.name).is_file(), t.name
    on_disk = {p.name.removesuffix(".j2") for p in (REPO / "templates" / "guest").glob("*.j2")}
    assert on_disk == set(guest.TEMPLATE_NAMES)


def test_the_set_is_injected_root_owned_with_its_modes(tmp_path: Path) -> None:
    recipe = load_recipe(recipe_file(tmp_path))
    assert recipe.guest is not None
    assert recipe.guest.agent == (tmp_path / "bin" / "agent").resolve()
    items = resolve_injected(recipe)
    assert [i.dest for i in items] == sorted((i.dest for i in items), key=str.encode)
    seen = by_dest(items)
    assert set(seen) == set(EXPECTED) | {"/etc/motd", "/etc/hostname"}
    for dest, (kind, mode) in EXPECTED.items():
        item = seen[dest]
        assert (item.kind, item.mode, item.owner) == (kind, mode, "0:0"), dest
    agent = seen["/usr/local/bin/banger-vsock-agent"]
    assert agent.source == recipe.guest.agent
    assert agent.sha256 == hashlib.sha256(FAKE_AGENT).hexdigest()
    for unit in UNITS:
        link = seen[f"/etc/systemd/system/multi-user.target.wants/{unit}"]
        assert link.target == f"../{unit}"
        assert posix_join("/etc/systemd/system/multi-user.target.wants", link.target) in seen
    # every injected path is in the derivation, with its mode, owner and hash
    entries = {e["dest"]: e for e in derive(
        recipe, IMAGE, diff_ids=(), injected=items, kernel=(), epoch=1
    ).data["files"]}  # fmt: skip
    for dest, (kind, mode) in EXPECTED.items():
        assert entries[dest]["kind"] == kind and entries[dest]["owner"] == "0:0"
        if kind != "symlink":
            assert entries[dest]["mode"] == f"{mode:04o}"
            assert entries[dest]["sha256"] == seen[dest].sha256


def posix_join(base: str, rel: str) -> str:
    return posixpath.normpath(posixpath.join(base, rel))


@pytest.mark.parametrize(
    "guest_toml", [None, "agents = false\n", 'agents = false\nagent = "bin/agent"\n']
)
def test_switched_off_removes_exactly_the_set(tmp_path: Path, guest_toml: str | None) -> None:
    on = resolve_injected(load_recipe(recipe_file(tmp_path / "on")))
    off_recipe = load_recipe(recipe_file(tmp_path / "off", guest_toml))
    assert off_recipe.guest is None
    off = resolve_injected(off_recipe)
    assert {i.dest for i in on} - {i.dest for i in off} == set(EXPECTED)
    assert [i.as_dict() for i in off] == [i.as_dict() for i in on if i.dest not in EXPECTED]


def test_overriding_one_template_changes_only_its_entry_and_the_key(tmp_path: Path) -> None:
    base = load_recipe(recipe_file(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "net.j2").write_text("#!/bin/sh\necho my network {{ hostname }}\n")
    custom = load_recipe(recipe_file(tmp_path / "b", override("net.j2")))
    assert custom.guest is not None
    (spec,) = custom.guest.templates
    assert spec.name == "banger-network-bootstrap"
    assert spec.where.key == "guest.templates.banger-network-bootstrap"
    a, b = by_dest(resolve_injected(base)), by_dest(resolve_injected(custom))
    dest = "/usr/local/libexec/banger-network-bootstrap"
    assert b[dest].data == b"#!/bin/sh\necho my network box\n"
    assert (b[dest].mode, b[dest].owner) == (0o755, "0:0")
    assert a.keys() == b.keys()
    assert [d for d in a if a[d].as_dict() != b[d].as_dict()] == [dest]
    assert key_of(base) != key_of(custom)

    # what counts is the rendered bytes: an override identical to the built-in
    # template gives the same key as no override at all
    (tmp_path / "c").mkdir()
    shutil.copy(guest.builtin_template("banger-network-bootstrap"), tmp_path / "c" / "same.j2")
    same = load_recipe(recipe_file(tmp_path / "c", override("same.j2")))
    assert key_of(same) == key_of(base)


def test_the_agent_and_vars_are_in_the_key(tmp_path: Path) -> None:
    base = key_of(load_recipe(recipe_file(tmp_path / "a")))
    other_agent = recipe_file(tmp_path / "b")
    (tmp_path / "b" / "bin" / "agent").write_bytes(FAKE_AGENT + b"v2")
    assert key_of(load_recipe(other_agent)) != base
    path = recipe_file(tmp_path / "d")
    path.write_text(
        path.read_text().replace('hostname = "box"', 'hostname = "box"\nvsock_port = 52')
    )
    recipe = load_recipe(path)
    unit = by_dest(resolve_injected(recipe))["/etc/systemd/system/banger-vsock-agent.service"]
    assert (
        unit.data is not None and b"ExecStart=/usr/local/bin/banger-vsock-agent 52\n" in unit.data
    )
    assert key_of(recipe) != base


def test_agent_sha256_pin(tmp_path: Path) -> None:
    digest = hashlib.sha256(FAKE_AGENT).hexdigest()
    good = load_recipe(
        recipe_file(tmp_path / "a", f'agent = "bin/agent"\nagent_sha256 = "{digest.upper()}"\n')
    )
    assert good.guest is not None and good.guest.agent_sha256 == digest
    resolve_injected(good)
    bad = load_recipe(
        recipe_file(tmp_path / "b", f'agent = "bin/agent"\nagent_sha256 = "{"0" * 64}"\n')
    )
    with pytest.raises(InputError) as info:
        resolve_injected(bad)
    assert info.value.reason == "sha256-mismatch"
    assert digest in str(info.value) and "guest.agent" in str(info.value)


# -- errors name the recipe position ----------------------------------------------------


def test_without_an_agent_key_the_built_in_agent_of_the_platform_is_injected(
    tmp_path: Path,
) -> None:
    path = recipe_file(tmp_path, "agents = true\n")
    original = path.read_text()
    for platform, arch in (("linux/amd64", "amd64"), ("linux/arm64/v8", "arm64")):
        ref = 'ref = "debian:bookworm"\n'
        path.write_text(original.replace(ref, f'{ref}platform = "{platform}"\n'))
        recipe = load_recipe(path)
        assert recipe.guest is not None and recipe.guest.agent is None
        agent = by_dest(resolve_injected(recipe))[guest.AGENT_DEST]
        built = REPO / "agents" / "out" / f"banger-vsock-agent-{arch}"  # scripts/setup made it
        assert agent.source == built and agent.mode == 0o755 and agent.owner == "0:0"
        assert agent.sha256 == hashlib.sha256(built.read_bytes()).hexdigest()
        assert guest.builtin_agent(platform, arch) == built
    assert {"amd64", "arm64"} <= set(guest.builtin_agents())


def test_no_built_in_agent_for_the_platform_is_one_line_at_the_guest_table(
    tmp_path: Path,
) -> None:
    path = recipe_file(tmp_path, "agents = true\n")
    path.write_text(
        path.read_text().replace(
            'ref = "debian:bookworm"\n', 'ref = "debian:bookworm"\nplatform = "linux/riscv64"\n'
        )
    )
    with pytest.raises(InputError) as info:
        resolve_injected(load_recipe(path))
    line = path.read_text().splitlines().index("[guest]") + 1
    message = str(info.value)
    assert info.value.reason == "agent-missing" and "\n" not in message
    assert message.startswith(
        f"{path}:{line}:1: guest: no built-in guest agent for linux/riscv64 in this installation"
    )
    assert "agents/build riscv64" in message and "guest.agent" in message
    assert "guest.agents = false" in message and "built in: amd64, arm64" in message


def test_missing_agent_file_is_an_error_at_the_agent_key(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, 'agent = "bin/nope"\n')
    recipe = load_recipe(path)
    with pytest.raises(InputError) as info:
        resolve_injected(recipe)
    line = path.read_text().splitlines().index('agent = "bin/nope"') + 1
    assert info.value.reason == "missing-input"
    assert str(info.value).startswith(f"{path}:{line}:1: guest.agent: the guest agent ")
    assert str(tmp_path / "bin" / "nope") in str(info.value)


def test_agent_that_is_a_directory(tmp_path: Path) -> None:
    recipe = load_recipe(recipe_file(tmp_path, 'agent = "bin"\n'))
    with pytest.raises(InputError, match="is a directory"):
        resolve_injected(recipe)


def test_missing_override_is_an_error_at_its_key(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, override("nope.j2", "banger-first-boot"))
    with pytest.raises(InputError) as info:
        resolve_injected(load_recipe(path))
    line = path.read_text().splitlines().index('"banger-first-boot" = "nope.j2"') + 1
    assert str(info.value).startswith(f"{path}:{line}:1: guest.templates.banger-first-boot: ")


def test_unknown_override_name(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, override("x.j2", "banger-network-bootstap"))
    err = recipe_error(path)
    line = path.read_text().splitlines().index('"banger-network-bootstap" = "x.j2"') + 1
    assert (err.reason, err.line) == ("unknown-key", line)
    assert "did you mean 'banger-network-bootstrap'?" in str(err)


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("agents = 1\n", "type"),
        ("agent = 5\n", "type"),
        ('agent = "bin/agent"\nagent_sha256 = "abc"\n', "value"),
        ('agent = "bin/agent"\ntemplates = "x"\n', "type"),
        ('agent = "bin/agent"\nagnet = "x"\n', "unknown-key"),
    ],
)
def test_guest_table_type_errors(tmp_path: Path, toml: str, reason: str) -> None:
    assert recipe_error(recipe_file(tmp_path, toml)).reason == reason


@pytest.mark.parametrize(
    ("section", "dest", "what"),
    [
        ("files", "/usr/local/bin/banger-vsock-agent", "is written by"),
        ("templates", "/etc/systemd/system/banger-network.service", "is written by"),
        ("symlinks", "/etc/systemd/system/multi-user.target.wants/banger-first-boot.service",
         "is written by"),
        ("files", "/var/lib/banger", "holds"),
        ("files", "/etc/modules-load.d/banger-vsock.conf/x", "is inside"),
    ],
)  # fmt: skip
def test_a_recipe_entry_on_a_builtin_path_is_an_error(
    tmp_path: Path, section: str, dest: str, what: str
) -> None:
    (tmp_path / "x").write_text("x\n")
    entry = (
        f'[[{section}]]\n{"target" if section == "symlinks" else "src"} = "x"\ndest = "{dest}"\n'
    )
    path = recipe_file(tmp_path, extra=entry)
    err = recipe_error(path)
    index = 1 if section in ("files", "templates") else 0
    line = path.read_text().splitlines().index(f'dest = "{dest}"') + 1
    assert (err.reason, err.key, err.line) == ("duplicate-dest", f"{section}[{index}].dest", line)
    assert f"{what} " in str(err) and "built-in guest set" in str(err)
    # switched off, the same entry is fine
    path.write_text(path.read_text().replace('agent = "bin/agent"', "agents = false"))
    assert load_recipe(path).guest is None


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("vsock_port", '"1024"'),
        ("vsock_port", "0"),
        ("vsock_port", "4294967295"),
        ("vsock_port", "true"),
        ("network_interface", '"eth0; reboot"'),
        ("network_interface", '"a-very-long-interface-name"'),
        ("regenerate_ssh_host_keys", '"no"'),
    ],
)
def test_builtin_vars_are_checked_at_their_position(tmp_path: Path, var: str, value: str) -> None:
    path = recipe_file(tmp_path)
    path.write_text(
        path.read_text().replace('hostname = "box"', f'hostname = "box"\n{var} = {value}')
    )
    err = recipe_error(path)
    line = path.read_text().splitlines().index(f"{var} = {value}") + 1
    assert (err.reason, err.key, err.line) == ("value", f"vars.{var}", line)


def test_an_override_still_fails_on_undefined_variables(tmp_path: Path) -> None:
    (tmp_path / "unit.j2").write_text("[Service]\nExecStart=/x {{ vsock_prot }}\n")
    path = recipe_file(tmp_path, override("unit.j2", "banger-vsock-agent.service"))
    with pytest.raises(InputError) as info:
        resolve_injected(load_recipe(path))
    assert info.value.reason == "template-undefined" and "vsock_prot" in str(info.value)


def test_builtin_templates_read_only_documented_vars() -> None:
    """Each variable a built-in template reads is in guest.VARS (checked, defaulted)."""
    env = jinja2.Environment()
    for t in guest.TEMPLATES:
        ast = env.parse(guest.builtin_template(t.name).read_text())
        used = jinja2.meta.find_undeclared_variables(ast)
        assert used <= set(guest.VARS), (t.name, used)
        # every use sits right under a default filter: no recipe needs [vars] for them
        defaulted = {id(f.node) for f in ast.find_all(jinja2.nodes.Filter) if f.name == "default"}
        for name in ast.find_all(jinja2.nodes.Name):
            assert id(name) in defaulted, (t.name, name.name, name.lineno)


# -- the rendered files ------------------------------------------------------------------


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, bytes]:
    """The built-in set rendered with default vars (a recipe without [vars])."""
    (tmp_path / "agent").write_bytes(FAKE_AGENT)
    path = tmp_path / "recipe.toml"
    path.write_text('[image]\nref = "debian:bookworm"\n[guest]\nagent = "agent"\n')
    items = resolve_injected(load_recipe(path))
    return {i.dest: i.data for i in items if i.data is not None}


@pytest.mark.parametrize("template", guest.TEMPLATES, ids=lambda t: t.name)
def test_rendered_builtin_templates(  # type: ignore[no-untyped-def]
    snapshot, rendered: dict[str, bytes], template: guest.BuiltinTemplate
) -> None:
    snapshot.snapshot_dir = SNAPSHOTS
    snapshot.assert_match(rendered[template.dest].decode(), template.name)


def unit_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif line and not line.startswith("#"):
            current.append(line)
    return sections


def test_unit_files(rendered: dict[str, bytes]) -> None:
    units = {u: rendered[f"/etc/systemd/system/{u}"].decode() for u in UNITS}
    for name, text in units.items():
        # a lone % starts a systemd specifier: none may be meant literally
        assert "%" not in text.replace("%%", ""), name
        s = unit_sections(text)
        assert s["Install"] == ["WantedBy=multi-user.target"], name
    net = unit_sections(units["banger-network.service"])
    assert "Type=oneshot" in net["Service"]
    assert "ExecStart=/usr/local/libexec/banger-network-bootstrap" in net["Service"]
    assert any(x.startswith("Before=") and "network-online.target" in x for x in net["Unit"])
    agent = unit_sections(units["banger-vsock-agent.service"])
    assert "ExecStart=/usr/local/bin/banger-vsock-agent 1024" in agent["Service"]
    assert "Restart=always" in agent["Service"]
    assert "After=systemd-modules-load.service" in agent["Unit"]
    assert "StartLimitIntervalSec=0" in agent["Unit"]  # Restart=always never gives up
    first = unit_sections(units["banger-first-boot.service"])
    assert "Type=oneshot" in first["Service"]
    assert "ConditionPathExists=/var/lib/banger/first-boot-pending" in first["Unit"]
    assert any(
        x.startswith("Before=") and "ssh.service" in x and "sshd.service" in x
        for x in first["Unit"]
    )
    assert "ExecStart=/usr/local/libexec/banger-first-boot" in first["Service"]
    modules = rendered["/etc/modules-load.d/banger-vsock.conf"].decode()
    assert [x for x in modules.splitlines() if not x.startswith("#")] == [
        "vsock", "vmw_vsock_virtio_transport"
    ]  # fmt: skip


# -- the scripts, run by real POSIX shells with stand-in tools -----------------------------


def _which(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    assert found, f"{name} is not installed"
    return found


#: /bin/sh on Debian, bash as sh, and busybox's ash (scripts/setup installs
#: busybox-static). That ash runs its own applets before PATH, so its ``ip``
#: cannot be faked: it runs only the first-boot script.
SHELLS = [[_which("dash")], [_which("bash"), "--posix"]]
FIRST_BOOT_SHELLS = [*SHELLS, [_which("busybox"), "sh"]]


def tool_dir(tmp_path: Path, *real: str, fakes: dict[str, str] | None = None) -> Path:
    """A PATH directory holding only the named real tools and fake scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in real:
        (bin_dir / name).symlink_to(_which(name))
    for name, body in (fakes or {}).items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


class Net:
    """banger-network-bootstrap in a sandbox: fake /proc/cmdline, /sys/class/net, ip."""

    def __init__(self, tmp_path: Path, script: bytes, shell: list[str]) -> None:
        self.dir = tmp_path
        self.script = tmp_path / "banger-network-bootstrap"
        self.script.write_bytes(script)
        self.log = tmp_path / "ip.log"
        self.sys = tmp_path / "sys"
        self.sys.mkdir()
        (self.sys / "lo").mkdir()
        self.resolv = tmp_path / "resolv.conf"
        self.resolv.write_text("nameserver 192.0.2.53\n")
        self.bin = tool_dir(tmp_path, "sleep", "chmod", "mv",
                            fakes={"ip": f'echo "ip $*" >> {self.log}\n'})  # fmt: skip
        self.shell = shell

    def run(self, cmdline: str, *ifaces: str) -> subprocess.CompletedProcess[str]:
        for name in ifaces:
            (self.sys / name).mkdir(exist_ok=True)
        (self.dir / "cmdline").write_text(cmdline + "\n")
        env = {"PATH": str(self.bin), "BANGER_CMDLINE": str(self.dir / "cmdline"),
               "BANGER_SYS_NET": str(self.sys), "BANGER_RESOLV_CONF": str(self.resolv),
               "BANGER_NET_WAIT": "0"}  # fmt: skip
        return subprocess.run([*self.shell, str(self.script)], env=env, capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture(params=SHELLS, ids=lambda s: Path(s[0]).name)
def net(request: pytest.FixtureRequest, tmp_path: Path, rendered: dict[str, bytes]) -> Net:
    return Net(tmp_path, rendered["/usr/local/libexec/banger-network-bootstrap"], request.param)


def test_network_without_configuration_does_nothing(net: Net) -> None:
    for cmdline in ("console=ttyS0 root=/dev/vda rw", "ip=dhcp", "ip=::::::dhcp", ""):
        proc = net.run(cmdline, "eth0")
        assert proc.returncode == 0, proc.stderr
        assert "nothing to do" in proc.stderr
    assert net.calls() == []
    assert net.resolv.read_text() == "nameserver 192.0.2.53\n"


def test_network_from_banger_parameters(net: Net) -> None:
    proc = net.run("console=ttyS0 banger.ip=10.0.0.2/24 banger.gw=10.0.0.1 "
                   "banger.dns=1.1.1.1,9.9.9.9 quiet", "eth0", "eth1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert net.calls() == [
        "ip link set dev lo up",
        "ip link set dev eth0 up",
        "ip addr replace 10.0.0.2/24 dev eth0",
        "ip route replace default via 10.0.0.1 dev eth0 onlink",
    ]
    lines = net.resolv.read_text().splitlines()
    assert lines[1:] == ["nameserver 1.1.1.1", "nameserver 9.9.9.9"]
    assert stat.S_IMODE(net.resolv.stat().st_mode) == 0o644


def test_network_from_the_kernel_ip_parameter(net: Net) -> None:
    proc = net.run("ip=172.16.0.2::172.16.0.1:255.255.255.252::ens3:off:8.8.8.8:8.8.4.4", "ens3")
    assert proc.returncode == 0, proc.stderr
    assert net.calls()[1:] == [
        "ip link set dev ens3 up",
        "ip addr replace 172.16.0.2/30 dev ens3",
        "ip route replace default via 172.16.0.1 dev ens3 onlink",
    ]
    assert net.resolv.read_text().splitlines()[1:] == ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]


def test_network_picks_the_first_interface_that_is_not_lo(net: Net) -> None:
    proc = net.run("banger.ip=192.168.1.9", "enp0s2", "enp0s3")
    assert proc.returncode == 0, proc.stderr
    assert "ip addr replace 192.168.1.9/32 dev enp0s2" in net.calls()
    assert not any("route" in c for c in net.calls())  # no gateway given
    assert net.resolv.read_text() == "nameserver 192.0.2.53\n"  # no DNS given: untouched


def test_network_interface_from_the_command_line_wins(net: Net) -> None:
    proc = net.run("banger.ip=10.1.0.2/16 banger.iface=eth1", "eth0", "eth1")
    assert proc.returncode == 0, proc.stderr
    assert "ip addr replace 10.1.0.2/16 dev eth1" in net.calls()


@pytest.mark.parametrize("mask", ["255.0.255.0", "255.255.255", "255.255.255.1", "abc.0.0.0"])
def test_network_refuses_a_bad_netmask(net: Net, mask: str) -> None:
    proc = net.run(f"ip=10.0.0.2::10.0.0.1:{mask}::eth0:off", "eth0")
    assert proc.returncode == 1 and "not a netmask" in proc.stderr
    assert net.calls() == []


def test_network_fails_without_an_interface(net: Net) -> None:
    proc = net.run("banger.ip=10.0.0.2/24")
    assert proc.returncode == 1 and "no network interface" in proc.stderr


def test_network_interface_from_recipe_vars(tmp_path: Path) -> None:
    path = recipe_file(tmp_path / "r")
    path.write_text(
        path.read_text().replace('hostname = "box"', 'hostname = "box"\nnetwork_interface = "wan0"')
    )
    script = by_dest(resolve_injected(load_recipe(path)))[
        "/usr/local/libexec/banger-network-bootstrap"
    ].data
    assert script is not None
    n = Net(tmp_path, script, SHELLS[0])
    assert n.run("banger.ip=10.0.0.2/24", "eth0", "wan0").returncode == 0
    assert "ip addr replace 10.0.0.2/24 dev wan0" in n.calls()


class FirstBoot:
    def __init__(
        self, tmp_path: Path, script: bytes, shell: list[str], keygen: bool = True
    ) -> None:
        self.root = tmp_path / "root"
        (self.root / "etc" / "ssh").mkdir(parents=True)
        (self.root / "var" / "lib" / "banger").mkdir(parents=True)
        self.marker = self.root / "var" / "lib" / "banger" / "first-boot-pending"
        self.machine_id = self.root / "etc" / "machine-id"
        self.machine_id.write_text("0123456789abcdef0123456789abcdef\n")
        self.old_key = self.root / "etc" / "ssh" / "ssh_host_ed25519_key"
        self.old_key.write_text("baked-in key\n")
        self.script = tmp_path / "banger-first-boot"
        self.script.write_bytes(script)
        self.log = tmp_path / "keygen.log"
        fakes = {"ssh-keygen": f'echo "ssh-keygen $*" >> {self.log}\n'} if keygen else {}
        self.bin = tool_dir(tmp_path, "tr", "chmod", "mv", "rm", "mkdir", "grep", "ln", fakes=fakes)
        self.shell = shell

    def run(self) -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(self.bin), "BANGER_ROOT": str(self.root)}
        return subprocess.run([*self.shell, str(self.script)], env=env, capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip


@pytest.fixture(params=FIRST_BOOT_SHELLS, ids=lambda s: Path(s[0]).name)
def first_boot(
    request: pytest.FixtureRequest, tmp_path: Path, rendered: dict[str, bytes]
) -> FirstBoot:
    return FirstBoot(tmp_path, rendered["/usr/local/libexec/banger-first-boot"], request.param)


def test_first_boot_does_nothing_without_the_marker(first_boot: FirstBoot) -> None:
    proc = first_boot.run()
    assert proc.returncode == 0, proc.stderr
    assert first_boot.machine_id.read_text() == "0123456789abcdef0123456789abcdef\n"
    assert first_boot.old_key.exists() and not first_boot.log.exists()


def test_first_boot_new_machine_id_and_host_keys_then_no_marker(first_boot: FirstBoot) -> None:
    first_boot.marker.write_text("# pending\n")
    proc = first_boot.run()
    assert proc.returncode == 0, proc.stderr
    new_id = first_boot.machine_id.read_text()
    assert new_id != "0123456789abcdef0123456789abcdef\n"
    assert len(new_id) == 33 and all(c in "0123456789abcdef" for c in new_id[:32])
    assert stat.S_IMODE(first_boot.machine_id.stat().st_mode) == 0o444
    assert not first_boot.old_key.exists()  # the image's key is every clone's
    assert first_boot.log.read_text() == f"ssh-keygen -A -f {first_boot.root}\n"
    assert not first_boot.marker.exists()
    # a second boot changes nothing
    assert first_boot.run().returncode == 0
    assert first_boot.machine_id.read_text() == new_id


def test_first_boot_without_ssh_keygen(tmp_path: Path, rendered: dict[str, bytes]) -> None:
    script = rendered["/usr/local/libexec/banger-first-boot"]
    fb = FirstBoot(tmp_path, script, SHELLS[0], keygen=False)
    fb.marker.write_text("")
    proc = fb.run()
    assert proc.returncode == 0, proc.stderr
    assert fb.old_key.exists() and not fb.marker.exists()


def test_first_boot_can_keep_host_keys(tmp_path: Path) -> None:
    path = recipe_file(tmp_path / "r")
    path.write_text(
        path.read_text().replace(
            'hostname = "box"', 'hostname = "box"\nregenerate_ssh_host_keys = false'
        )
    )
    script = by_dest(resolve_injected(load_recipe(path)))[
        "/usr/local/libexec/banger-first-boot"
    ].data
    assert script is not None
    fb = FirstBoot(tmp_path, script, SHELLS[0])
    fb.marker.write_text("")
    assert fb.run().returncode == 0
    assert fb.old_key.exists()  # ssh-keygen -A only adds the missing ones
    assert fb.log.read_text() == f"ssh-keygen -A -f {fb.root}\n"


# -- banger-build render ------------------------------------------------------------------


def test_render_prints_every_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from banger_build.cli import main

    path = recipe_file(tmp_path)
    assert main(["render", str(path)]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    templates = sorted([t for t in guest.TEMPLATES], key=lambda t: t.dest.encode())
    expected = sorted([(t.dest, t.mode) for t in templates] + [("/etc/hostname", 0o644)],
                      key=lambda x: x[0].encode())  # fmt: skip
    assert headers == [f"==> {d} ({m:04o} 0:0) <==" for d, m in expected]
    assert "==> /etc/hostname (0644 0:0) <==\nbox\n" in out
    assert "ExecStart=/usr/local/bin/banger-vsock-agent 1024\n" in out


def test_render_writes_a_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from banger_build.cli import main

    path = recipe_file(tmp_path / "r")
    out = tmp_path / "out"
    for _ in range(2):  # again over the first rendering
        assert main(["render", str(path), "-o", str(out)]) == 0
    items = resolve_injected(load_recipe(path))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(i.dest[1:] for i in items if i.kind == "template")
    for i in items:
        if i.kind == "template":
            f = out / i.dest[1:]
            assert f.read_bytes() == i.data
            assert stat.S_IMODE(f.stat().st_mode) == i.mode
    assert capsys.readouterr().out == ""


def test_render_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from banger_build.cli import main

    path = recipe_file(tmp_path)
    assert main(["render", str(path), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    items = resolve_injected(load_recipe(path))
    assert len(lines) == len(items)
    for line, item in zip(lines, items, strict=True):
        fields = line.split()
        assert fields[:5] == [item.dest, f"{item.mode:04o}", item.owner, item.kind, item.sha256]
        if item.kind == "symlink":
            assert fields[5:] == ["->", item.target]


def test_render_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from banger_build.cli import main

    path = recipe_file(tmp_path, 'agent = "bin/missing"\n')
    assert main(["render", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"banger-build: error: {path}:") and "guest.agent" in err
    assert "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["render", str(recipe_file(tmp_path / "ok")), "-o", str(blocker)]) == 1
    assert "banger-build: error: " in capsys.readouterr().err


# -- a real build -----------------------------------------------------------------------


def test_build_injects_the_set(tmp_path: Path, registry: RegistryServer) -> None:
    push(registry, "guest/set", [BASE, UPPER])
    directory = tmp_path / "r"
    directory.mkdir()
    (directory / "agent").write_bytes(FAKE_AGENT)
    recipe = write_recipe(directory, f"{registry.host}/guest/set:v1",
                          extra='[guest]\nagent = "agent"\n')  # fmt: skip
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    image = Path(out.strip()) / "rootfs.ext4"
    assert fsck(image).returncode == 0
    seen = read_image(image)
    items = by_dest(resolve_injected(load_recipe(recipe)))
    for dest, (kind, mode) in EXPECTED.items():
        got = seen[dest[1:]]
        assert (got.uid, got.gid) == (0, 0), dest
        if kind == "symlink":
            assert got.type == "symlink"
            assert got.target == items[dest].target
            assert posix_join(os.path.dirname(dest), got.target or "")[1:] in seen
        else:
            assert (got.type, stat.S_IMODE(got.mode)) == ("reg", mode), dest
            assert got.sha256 == items[dest].sha256, dest
    for directory_ in ("usr/local/libexec", "var/lib/banger", "etc/modules-load.d",
                       "etc/systemd/system/multi-user.target.wants"):  # fmt: skip
        d = seen[directory_]
        assert (d.type, d.uid, d.gid, stat.S_IMODE(d.mode)) == ("dir", 0, 0, 0o755), directory_
    # the recipe's own entries are still there, beside the set
    assert seen["etc/systemd/system/multi-user.target.wants/test.service"].type == "symlink"


# -- the agent ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """agents/build run on a copy of agents/ in a temp dir: arch -> agent."""
    work = tmp_path_factory.mktemp("agent") / "agents"
    work.mkdir()
    for name in ("build", "banger-vsock-agent.c"):
        shutil.copy2(REPO / "agents" / name, work / name)
    proc = subprocess.run(["sh", str(work / "build")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    built = {p.name.rpartition("-")[2]: p for p in (work / "out").iterdir()}
    assert set(built) == {"amd64", "arm64"}
    return built


@pytest.fixture(scope="module")
def agent(agents: dict[str, Path]) -> Path:
    """The agent for this (amd64) host."""
    return agents["amd64"]


ELF_MACHINE = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_agent_build_is_static_and_reproducible(
    agents: dict[str, Path], arch: str, tmp_path: Path
) -> None:
    agent = agents[arch]
    data = agent.read_bytes()
    assert data[:4] == b"\x7fELF" and stat.S_IMODE(agent.stat().st_mode) == 0o755
    assert struct.unpack_from("<H", data, 0x12)[0] == ELF_MACHINE[arch]
    # no PT_INTERP program header: statically linked
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types and 1 in types
    # the same source elsewhere, under another umask, gives the same bytes
    other = tmp_path / "some" / "other" / "agents"
    other.mkdir(parents=True)
    for name in ("build", "banger-vsock-agent.c"):
        shutil.copy2(REPO / "agents" / name, other / name)
    proc = subprocess.run(["sh", "-c", 'umask 077 && exec sh "$0" "$1"', str(other / "build"),
                           arch], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (other / "out").iterdir()] == [agent.name]  # only the one asked for
    assert (other / "out" / agent.name).read_bytes() == data
    assert stat.S_IMODE((other / "out" / agent.name).stat().st_mode) == 0o755


def test_agent_build_says_what_is_missing(tmp_path: Path) -> None:
    work = tmp_path / "agents"
    work.mkdir()
    for name in ("build", "banger-vsock-agent.c"):
        shutil.copy2(REPO / "agents" / name, work / name)
    env = {**os.environ, "CC_arm64": "no-such-gcc"}
    proc = subprocess.run(["sh", str(work / "build"), "arm64"], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "no-such-gcc not found: install the Debian packages gcc-aarch64-linux-gnu" in proc.stderr
    proc = subprocess.run(["sh", str(work / "build"), "riscv64"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and "unknown architecture riscv64" in proc.stderr


@contextlib.contextmanager
def activated(agent: Path, path: Path, runner: tuple[str, ...] = ()) -> Iterator[Path]:
    """``agent`` serving a UNIX socket handed over by socket activation (LISTEN_FDS),
    run through ``runner`` (qemu-user for another architecture's agent)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    # systemd's convention: the socket is fd 3, LISTEN_PID the service's own pid
    shell = 'export LISTEN_FDS=1 LISTEN_PID=$$; fd=$1; shift; exec "$@" 3<&"$fd"'
    proc = subprocess.Popen(["bash", "-c", shell, "sh", str(fd), *runner, str(agent)],
                            pass_fds=(fd,), env={}, stderr=subprocess.PIPE)  # fmt: skip
    listener.close()
    try:
        yield path
        assert proc.poll() is None  # it never exits on its own
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture
def activated_agent(agent: Path, tmp_path: Path) -> Iterator[Path]:
    with activated(agent, tmp_path / "agent.sock") as path:
        yield path


def test_the_arm64_agent_answers_under_qemu_user(agents: dict[str, Path], tmp_path: Path) -> None:
    qemu = shutil.which("qemu-aarch64-static")
    assert qemu is not None, "qemu-aarch64-static is missing (scripts/setup: qemu-user-static)"
    with activated(agents["arm64"], tmp_path / "arm64.sock", (qemu,)) as path:
        assert ask(path, b"ping\nstatus\n") == b"pong\nerror: unknown command\n"


def test_agent_ping_retries_until_the_agent_answers(agent: Path, tmp_path: Path) -> None:
    """boot --ping-agent's pinger against the real agent (a UNIX socket here: vsock
    needs a VM); it keeps trying while nothing listens yet."""
    path = tmp_path / "late.sock"
    pinger = AgentPing(str(path), socket.AF_UNIX)
    pinger.start()
    time.sleep(1.5)  # refused meanwhile: no agent yet
    assert not pinger.done() and pinger.attempts >= 1 and pinger.answer is None
    with activated(agent, path):
        deadline = time.monotonic() + 20
        while not pinger.done() and time.monotonic() < deadline:
            time.sleep(0.1)
    pinger.stop()
    assert pinger.answer == "pong" and pinger.attempts >= 2
    assert pinger.where() == str(path)
    silent = AgentPing((3, 1024))  # vsock: no such guest here
    assert silent.where() == "vsock cid 3 port 1024"


def ask(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except ConnectionResetError:  # closed with our unread bytes (a line too long)
            pass
        return out


def test_agent_answers_ping_with_pong(activated_agent: Path) -> None:
    assert ask(activated_agent, b"ping\n") == b"pong\n"
    assert ask(activated_agent, b"ping\r\nstatus\nping") == b"pong\nerror: unknown command\npong\n"
    assert ask(activated_agent, b"x" * 1000) == b"error: line too long\n"
    assert ask(activated_agent, b"") == b""
    assert ask(activated_agent, b"ping\n") == b"pong\n"  # still serving


@pytest.mark.parametrize("args", [["0"], ["x"], ["1", "2"], ["4294967295"], ["-1"], ["+5"], [""]])
def test_agent_refuses_a_bad_port(agent: Path, args: list[str]) -> None:
    proc = subprocess.run([str(agent), *args], capture_output=True, timeout=10, check=False)
    assert proc.returncode == 2 and b"usage: banger-vsock-agent [PORT]" in proc.stderr


def test_agent_keeps_retrying_until_it_can_listen(agent: Path, tmp_path: Path) -> None:
    """Without vsock, or with the port taken, it stays up and retries every 5 s."""
    port = 40000 + os.getpid() % 20000
    holder: socket.socket | None = None
    try:
        holder = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        holder.bind((socket.VMADDR_CID_ANY, port))
        holder.listen()
    except OSError:  # no vsock on this host: the agent cannot listen either
        holder = None
    log = tmp_path / "agent.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([str(agent), str(port)], stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        while b"retrying" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"retrying every 5s" in log.read_bytes()
        time.sleep(1)
        assert proc.poll() is None
        assert log.read_bytes().count(b"retrying") == 1  # said once, not every 5 s
        if holder is not None:
            holder.close()
            holder = None
            deadline = time.monotonic() + 15
            while b"listening" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert f"listening on vsock port: {port}".encode() in log.read_bytes()
            probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            with probe, pytest.raises(OSError):
                probe.bind((socket.VMADDR_CID_ANY, port))  # the agent has it
            assert proc.poll() is None
    finally:
        if holder is not None:
            holder.close()
        proc.kill()
        proc.wait()
