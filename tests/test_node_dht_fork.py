"""Starting hivemind's forked DHT child: the child never finalizes the parent's garbage (gRPC objects freed in a
forked child crashed it: SIGSEGV while "Garbage-collecting"), and a child that dies at start is an error, not a
hang."""

from __future__ import annotations

import gc
import os
import signal
import time

import hivemind
import pytest

from node.blocks.dht import SwarmDHT
from proto.process import fork_dht


class _Finalized:
    """Garbage in a reference cycle; says in which process it was finalized."""

    def __init__(self, pipe_w: int) -> None:
        self.pipe_w = pipe_w
        self.cycle = self

    def __del__(self) -> None:
        os.write(self.pipe_w, f"{os.getpid()}\n".encode())


class _ForkingStub:
    """Stands in for ``hivemind.DHT``: its child runs a full collection and exits, as a DHT child's collector would."""

    def __init__(self) -> None:
        self.child = 0

    def start(self) -> None:
        self.child = os.fork()
        if self.child == 0:
            gc.enable()
            gc.collect()
            os._exit(0)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        os.waitpid(self.child, 0)

    def is_alive(self) -> bool:
        return False



def _finalized_in() -> list[int]:
    """Pids of the processes that finalized one piece of garbage left in this process across :func:`fork_dht`."""
    read_fd, write_fd = os.pipe()
    try:
        _Finalized(write_fd)  # unreachable at once: only its cycle keeps it
        fork_dht(_ForkingStub(), timeout_s=10)
        gc.collect()  # the parent frees its garbage itself
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd) as pipe:
            read_fd = -1
            return [int(line) for line in pipe.read().split()]
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


def test_the_child_never_finalizes_the_parents_garbage(no_automatic_gc: None) -> None:
    assert _finalized_in() == [os.getpid()]  # once, here; never in the child
    assert gc.get_freeze_count() == 0  # the parent unfroze right after the fork


def test_without_the_freeze_the_child_would_finalize_it(
    no_automatic_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: what crashed DHT children forked after gRPC calls (a gRPC object's finalizer in the child)."""
    monkeypatch.setattr(gc, "freeze", lambda: None)
    finalized_in = _finalized_in()
    assert len(finalized_in) == 2 and os.getpid() in finalized_in  # in the child too


def test_a_dht_child_that_dies_at_start_is_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: hivemind.DHT) -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # as the SIGSEGV did, before the child said it was ready

    monkeypatch.setattr(hivemind.DHT, "run", crash)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start answering after 3 attempts"):
        SwarmDHT.start()
    assert time.monotonic() - began < 30  # three attempts, each noticing the death within a fraction of a second


def test_a_dht_started_this_way_serves_and_the_parent_is_left_unfrozen() -> None:
    swarm = SwarmDHT.start()
    try:
        assert gc.get_freeze_count() == 0
        assert swarm.maddrs
    finally:
        swarm.shutdown()
