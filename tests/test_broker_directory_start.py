"""Starting the broker directory's DHT process through :func:`proto.process.fork_dht`, as the nodes do.

The child never finalizes the broker's garbage (gRPC objects freed in a forked child crashed it), hivemind's
own start errors reach the broker unchanged, and a child that dies or hangs at start fails the broker's start
with a typed error instead of leaving it waiting forever."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import hivemind
import pytest
from hivemind.p2p import P2PDaemonError

from broker.config import BrokerConfig
from broker.directory import DhtNodeReader
from broker.service import BrokerService
from proto.process import DhtStartError, DhtStartTimeout, fork_dht
from proto.topology import Topology


class _Finalized:
    """Garbage in a reference cycle; appends the pid of the process that finalizes it to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cycle = self

    def __del__(self) -> None:
        with open(self.path, "a") as out:
            out.write(f"{os.getpid()}\n")


@pytest.fixture
def collecting_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DHT child runs a full collection before serving, as its collector would at some point."""
    serve: Callable[[hivemind.DHT], None] = hivemind.DHT.run

    def collect_then_serve(self: hivemind.DHT) -> None:
        gc.enable()
        gc.collect()
        serve(self)

    monkeypatch.setattr(hivemind.DHT, "run", collect_then_serve)



def _finalized_in(tmp_path: Path) -> list[int]:
    """Pids of the processes that finalized one piece of garbage left in this process across a reader's start."""
    path = tmp_path / "finalized"
    path.touch()
    _Finalized(path)  # unreachable at once: only its cycle keeps it
    reader = DhtNodeReader()
    try:
        assert reader.visible_maddrs()
    finally:
        reader.shutdown()
        reader.dht.join(10)
    gc.collect()  # the broker frees its garbage itself
    return [int(line) for line in path.read_text().split()]


def _live_dht_children() -> list[multiprocessing.Process]:
    return [c for c in multiprocessing.active_children() if isinstance(c, hivemind.DHT)]


def test_the_readers_dht_child_never_finalizes_the_brokers_garbage(
    no_automatic_gc: None, collecting_child: None, tmp_path: Path
) -> None:
    assert _finalized_in(tmp_path) == [os.getpid()]  # once, here; never in the child
    assert gc.get_freeze_count() == 0  # the broker unfroze right after the fork


def test_without_the_freeze_the_readers_child_would_finalize_it(
    no_automatic_gc: None, collecting_child: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: a reader started as before (a plain fork) lets its child finalize the broker's garbage."""
    monkeypatch.setattr(gc, "freeze", lambda: None)
    finalized_in = _finalized_in(tmp_path)
    assert len(finalized_in) == 2 and os.getpid() in finalized_in  # in the child too


async def test_a_dht_child_that_dies_at_start_fails_the_brokers_start_with_a_typed_error(
    amqp_url: str, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: hivemind.DHT) -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # as a SIGSEGV would, before the child said it was ready

    monkeypatch.setattr(hivemind.DHT, "run", crash)
    service = BrokerService(BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, dht=True))
    began = time.monotonic()
    with pytest.raises(DhtStartError, match=r"died while starting \(exit code -9\)"):
        await service.start()
    assert time.monotonic() - began < 10  # seen at once; hivemind's own start waited forever
    assert _live_dht_children() == []


def test_a_stuck_dht_child_times_out_and_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(self: hivemind.DHT) -> None:
        time.sleep(600)

    monkeypatch.setattr(hivemind.DHT, "run", hang)
    with pytest.raises(DhtStartTimeout, match="not ready within 1 s") as caught:
        DhtNodeReader(start_timeout_s=1)
    assert isinstance(caught.value, TimeoutError)
    deadline = time.monotonic() + 10  # hivemind's shutdown: a grace period, then SIGTERM
    while _live_dht_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_dht_children() == []  # it does not outlive the failed start


@pytest.fixture(scope="module")
def dead_peer() -> list[str]:
    """The multiaddrs of a DHT peer that has stopped: a bootstrap peer nobody can reach."""
    peer = hivemind.DHT(start=True)
    maddrs = [str(a) for a in peer.get_visible_maddrs()]
    peer.shutdown()
    return maddrs


@pytest.mark.parametrize(
    ("peers", "message"),
    [("dead", "failed to connect to bootstrap peers"), ("garbage", 'failed to parse multiaddr "garbage"')],
)
def test_hiveminds_own_start_errors_reach_the_broker_unchanged(
    dead_peer: list[str], peers: str, message: str
) -> None:
    initial_peers = dead_peer if peers == "dead" else [peers]
    with pytest.raises(P2PDaemonError, match=message):
        DhtNodeReader(initial_peers)
    assert _live_dht_children() == []


def test_an_error_the_child_reports_just_before_exiting_is_not_lost(dead_peer: list[str]) -> None:
    """The child's report travels through a pipe: fork_dht may see the child gone before its error arrived."""

    class ReportArrivesLate(hivemind.DHT):
        waits = 0

        def wait_until_ready(self, timeout: float | None = None) -> None:
            self.waits += 1
            if self.waits == 1:  # the first wait ends with the child already gone, its report still unread
                self.join(10)
                raise TimeoutError
            super().wait_until_ready(timeout)

    dht = ReportArrivesLate(initial_peers=dead_peer, start=False)
    with pytest.raises(P2PDaemonError, match="failed to connect to bootstrap peers"):
        fork_dht(dht, timeout_s=10)
    assert not dht.is_alive()
