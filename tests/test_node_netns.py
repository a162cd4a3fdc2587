"""The chain across real addresses: each node and the driver in a network namespace of its own.

The test builds (and always removes) a small lab: a bridge in a namespace of its own, and
three namespaces (server 0:2, server 2:4, driver) each joined to it by a veth pair, on
10.231.77.0/24. Every host's egress is slowed: ``tc netem delay 5ms`` where the kernel has
netem, otherwise (kernels built without it, such as this project's CI VMs) an HTB shaper
at 256 kbit/s, whose serialisation delay is latency just the same for a small message.
It needs root and ``ip``; it skips cleanly otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers_node import ROOT, reference_generate, spawn_server, wait_ready

pytestmark = pytest.mark.netns

SUBNET = "10.231.77"
PROMPT = [5, 17, 200, 33, 99, 12, 7, 8]
NEW_TOKENS = 12


@dataclass
class Lab:
    suffix: str
    shaping: str = ""  # "netem" or "htb"
    namespaces: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"dinet-{self.suffix}-{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


def shape(lab: Lab, role: str, dev: str) -> None:
    tc = [*lab.exec_prefix(role), "tc", "qdisc", "add", "dev", dev, "root"]
    netem = subprocess.run([*tc, "netem", "delay", "5ms"], capture_output=True, text=True, timeout=20)
    if netem.returncode == 0:
        lab.shaping = "netem"
        return
    subprocess.run([*tc, "handle", "1:", "htb", "default", "10"], check=True, capture_output=True, timeout=20)
    subprocess.run([*lab.exec_prefix(role), "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
                    "htb", "rate", "256kbit"], check=True, capture_output=True, timeout=20)
    lab.shaping = "htb"


def build(lab: Lab) -> dict[str, str]:
    bridge = lab.ns("br")
    ip("netns", "add", bridge)
    lab.namespaces.append(bridge)
    ip("-n", bridge, "link", "add", "br0", "type", "bridge")
    ip("-n", bridge, "link", "set", "br0", "up")
    addresses = {}
    for index, role in enumerate(("a", "b", "drv"), start=2):
        ns, host_dev, bridge_dev = lab.ns(role), f"dn{lab.suffix}{index}", f"dn{lab.suffix}{index}b"
        ip("netns", "add", ns)
        lab.namespaces.append(ns)
        ip("link", "add", host_dev, "type", "veth", "peer", "name", bridge_dev)
        ip("link", "set", host_dev, "netns", ns)
        ip("link", "set", bridge_dev, "netns", bridge)
        ip("-n", bridge, "link", "set", bridge_dev, "master", "br0", "up")
        addresses[role] = f"{SUBNET}.{index}"
        ip("-n", ns, "addr", "add", f"{addresses[role]}/24", "dev", host_dev)
        ip("-n", ns, "link", "set", host_dev, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        shape(lab, role, host_dev)
    return addresses


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict[str, str]]]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root with ip and tc")
    lab = Lab(suffix=uuid.uuid4().hex[:4])
    try:
        addresses = build(lab)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        for ns in reversed(lab.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        pytest.skip(f"cannot build network namespaces here: {getattr(exc, 'stderr', exc)}")
    yield lab, addresses
    for ns in reversed(lab.namespaces):  # deleting a namespace deletes its veth ends and qdiscs
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_chain_across_namespaces_with_latency(lab: tuple[Lab, dict[str, str]], tiny_model_path: Path) -> None:
    net, addr = lab
    servers = []
    try:
        first = wait_ready(spawn_server(tiny_model_path, "0:2", extra=["--host", addr["a"]],
                                        prefix=net.exec_prefix("a")))
        servers.append(first)
        servers.append(wait_ready(spawn_server(tiny_model_path, "2:4", initial_peers=first.maddrs,
                                               extra=["--host", addr["b"]], prefix=net.exec_prefix("b"))))
        driver = subprocess.run(
            [*net.exec_prefix("drv"), sys.executable, "-m", "node.blocks.drive_main", "--model", str(tiny_model_path),
             "--name", "tiny", "--host", addr["drv"], "--initial-peers", *first.maddrs,
             "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)],
            capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        for server in servers:
            server.kill()
    assert driver.returncode == 0, driver.stderr[-2000:]
    result = json.loads(driver.stdout.strip().splitlines()[-1])
    assert result["tokens"] == reference_generate(tiny_model_path, PROMPT, NEW_TOKENS)
    hosts_and_spans = [(hop.split(":")[0], hop.split("/")[1]) for hop in result["hops"]]  # "host:port/start:end"
    assert hosts_and_spans == [(addr["a"], "0:2"), (addr["b"], "2:4")]
    # every token crosses driver->a->driver->b->driver: four shaped links, each >= ~5 ms
    assert result["decode_ms_per_token"] >= 15.0, (net.shaping, result)
