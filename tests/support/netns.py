"""A private test network on this machine: a bridge, and Linux network namespaces joined
to it by veth pairs, each namespace a "host" with its own address. Made by the test that
needs it and removed afterwards, every namespace, link and address of it."""

from __future__ import annotations

import random
import secrets
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _used_subnets() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


@dataclass
class PrivateNetwork:
    hosts: list[str]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""                    # "10.213.N", the first three octets
    namespaces: dict[str, str] = field(default_factory=dict)    # host → namespace
    addresses: dict[str, str] = field(default_factory=dict)     # host → its address

    @property
    def bridge(self) -> str:
        return f"llbr{self.tag}"

    @property
    def gateway_address(self) -> str:
        """The bridge's address: where this (the launcher's) namespace is on the network."""
        return f"{self.subnet}.1"

    def create(self) -> PrivateNetwork:
        used = _used_subnets()
        candidates = [f"10.213.{n}" for n in random.sample(range(1, 255), 254)]
        self.subnet = next(s for s in candidates if f" {s}." not in used)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, host in enumerate(self.hosts):
                namespace = f"llmos-{self.tag}-{host}"
                outside, inside = f"llv{self.tag}{index}", f"llp{self.tag}{index}"
                address = f"{self.subnet}.{10 + index}"
                _ip("netns", "add", namespace)
                self.namespaces[host] = namespace
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", inside, "netns", namespace)
                _ip("link", "set", outside, "master", self.bridge, "up")
                _ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", inside)
                _ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
                _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
                self.addresses[host] = address
        except BaseException:
            self.remove()
            raise
        return self

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host]]

    def remove(self) -> None:
        for index in range(len(self.hosts)):         # each pair goes with its outside end
            subprocess.run(["ip", "link", "del", f"llv{self.tag}{index}"], capture_output=True, timeout=30)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        self.namespaces.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (none after `remove`)."""
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return ([line.split()[0] for line in namespaces.splitlines() if self.tag in line]
                + [word for word in links.split() if self.tag in word])
