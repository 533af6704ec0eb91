"""A private network on this machine: one Linux network namespace per host (each cluster node,
PostgreSQL, agent workers), all on one bridge, and faults injected between them.

The test process stays in the machine's own namespace and reaches every host through the
bridge's address (``client_address``); nothing is routed off the machine. A partition is made
with nftables inside the hosts' namespaces: each host drops packets to and from the addresses
in its ``blocked`` set, so a cut is silent (no reset, no refusal), as a real one is. Creating
namespaces and rules needs root, as CI has here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_STATE = Path("/run/convsvc-netlab")
"""Which lab indices are taken, by which process (a killed run's lab is removed later)."""

_RULES = """
table inet lab {
  set blocked { type ipv4_addr; }
  chain input { type filter hook input priority 0; ip saddr @blocked drop; }
  chain output { type filter hook output priority 0; ip daddr @blocked drop; }
}
"""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    blocked: set[str] = field(default_factory=set)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Lab:
    """One bridge (10.213.<index>.0/24; the test process is .1) and its hosts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.bridge = f"cvlab{index}"
        self.client_address = f"10.213.{index}.1"
        self.hosts: dict[str, Host] = {}

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[Lab]:
        if os.geteuid() != 0:
            raise RuntimeError(
                "the partition tests make network namespaces and firewall rules: run them "
                "as root (CI does)"
            )
        _remove_abandoned_labs()
        lab = cls._claim_index()
        try:
            yield lab
        finally:
            lab.remove()

    @classmethod
    def _claim_index(cls) -> Lab:
        _STATE.mkdir(exist_ok=True)
        for index in range(10, 250):
            marker = _STATE / str(index)
            try:
                with marker.open("x") as claimed:
                    claimed.write(str(os.getpid()))
            except FileExistsError:
                continue
            lab = cls(index)
            _run("ip", "link", "add", lab.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{lab.client_address}/24", "dev", lab.bridge)
            _run("ip", "link", "set", lab.bridge, "up")
            return lab
        raise RuntimeError(f"no free network lab index (see {_STATE})")

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 2
        host = Host(name, f"cvlab{self.index}-{name}", f"10.213.{self.index}.{number}")
        outside = f"cvl{self.index}h{number}"  # an interface name has at most 15 characters
        # Leftovers of a run killed mid-way would make the names clash.
        _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", outside, check=False)
        _run("ip", "netns", "add", host.netns)
        self.hosts[name] = host
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns",
             host.netns)  # fmt: skip
        _run("ip", "link", "set", outside, "master", self.bridge, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        subprocess.run(
            host.command("nft", "-f", "-"), input=_RULES, check=True, capture_output=True, text=True
        )
        return host

    # -- faults ----------------------------------------------------------------------------

    def _set(self, host: Host, verb: str, addresses: set[str]) -> None:
        if addresses:
            elements = "{ " + ", ".join(sorted(addresses)) + " }"
            _run(*host.command("nft", verb, "element", "inet", "lab", "blocked", elements))

    def cut(self, a: Host, b: Host) -> None:
        """No packet between ``a`` and ``b``, either way (each drops the other's)."""
        for one, other in ((a, b), (b, a)):
            if other.address not in one.blocked:
                self._set(one, "add", {other.address})
                one.blocked.add(other.address)

    def mend(self, a: Host, b: Host) -> None:
        for one, other in ((a, b), (b, a)):
            if other.address in one.blocked:
                self._set(one, "delete", {other.address})
                one.blocked.discard(other.address)

    def isolate(self, host: Host) -> None:
        """``host`` cut from every other host and from the test's clients."""
        for other in self.hosts.values():
            if other is not host:
                self.cut(host, other)
        added = {self.client_address} - host.blocked
        self._set(host, "add", added)
        host.blocked |= added

    def heal(self) -> None:
        """Every cut mended."""
        for host in self.hosts.values():
            self._set(host, "delete", set(host.blocked))
            host.blocked.clear()

    def remove(self) -> None:
        for host in self.hosts.values():
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        (_STATE / str(self.index)).unlink(missing_ok=True)


def _remove_abandoned_labs() -> None:
    """Labs of runs that were killed before they could clean up (their process is gone)."""
    if not _STATE.exists():
        return
    namespaces = _run("ip", "netns", "list", check=False).stdout.split()
    for marker in _STATE.iterdir():
        with contextlib.suppress(ValueError, OSError):
            pid = int(marker.read_text() or 0)
            if pid and Path(f"/proc/{pid}").exists():
                continue
            for netns in namespaces:
                if netns.startswith(f"cvlab{marker.name}-"):
                    _run("ip", "netns", "del", netns, check=False)
            _run("ip", "link", "del", f"cvlab{marker.name}", check=False)
            marker.unlink()
