"""Helpers for node tests: block servers as real processes, and the whole-model reference."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """A ``python -m node.blocks.serve_main`` child; ``info`` is its ready line."""

    proc: subprocess.Popen[str]
    info: dict = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def maddrs(self) -> list[str]:
        return list(self.info["dht_maddrs"])

    def kill(self) -> None:
        """SIGKILL to the node's whole process group (server, its hivemind DHT child, p2pd), like a host
        dying: no clean-up, no DHT withdrawal, sockets die with it, and no orphan is left behind."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server and wait (it withdraws its DHT records and stops its DHT child)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()  # whatever is left of the group


def spawn_server(
    model_path: Path | str,
    blocks: str,
    *,
    initial_peers: Sequence[str] = (),
    name: str = "tiny",
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    threads: int = 1,
) -> ServerProcess:
    """Start a block server (``prefix`` e.g. ``ip netns exec NS``); returns before it is ready."""
    cmd = [
        *prefix, sys.executable, "-m", "node.blocks.serve_main", "--model", str(model_path), "--name", name,
        "--blocks", blocks, "--threads", str(threads), "--announce-period", "2", "--record-ttl", "6",
        "--initial-peers", *initial_peers, *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    return ServerProcess(proc)


def wait_ready(server: ServerProcess, timeout: float = 90.0) -> ServerProcess:
    """Read the server's ready line (JSON) or fail with its exit status."""
    assert server.proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(server.proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = server.proc.stdout.readline()
            if line.startswith("{"):
                server.info = json.loads(line)
                return server
            if not line and server.proc.poll() is not None:
                break
    server.kill()
    raise RuntimeError(f"block server did not start (exit status {server.proc.poll()})")


def start_servers(model_path: Path | str, ranges: Sequence[str], **kwargs: object) -> list[ServerProcess]:
    """The first server bootstraps the DHT; the others join it, started in parallel."""
    first = wait_ready(spawn_server(model_path, ranges[0], **kwargs))  # type: ignore[arg-type]
    rest = [spawn_server(model_path, r, initial_peers=first.maddrs, **kwargs) for r in ranges[1:]]  # type: ignore[arg-type]
    return [first, *(wait_ready(s) for s in rest)]


class FixedRecords:
    """A ``RecordSource`` over a fixed list of block records (tests of the driver without a DHT)."""

    def __init__(self, records: list) -> None:
        self.records = records

    async def block_records(self, model: str, num_blocks: int) -> list:
        return self.records


def reference_generate(model_path: Path | str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of ``transformers`` ``generate`` on the whole model in this process."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path).eval()
    ids = torch.tensor([prompt])
    # an explicit mask: generate() would otherwise mask any prompt token equal to the pad id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(prompt):]]


async def read_until(stream: asyncio.StreamReader, lines: list[str], pattern: re.Pattern[str]) -> re.Match[str]:
    """Read a node process's log lines (kept in ``lines``) until one matches ``pattern``.

    :raises AssertionError: the process exited first (the last lines say why).
    """
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError("the node exited before serving:\n" + "\n".join(lines[-30:]))
        lines.append(raw.decode(errors="replace").rstrip())
        found = pattern.search(lines[-1])
        if found:
            return found
