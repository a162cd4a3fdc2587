"""`--realtime-priority`: the broker's routing loop under SCHED_FIFO, nothing else it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from broker.config import BrokerConfig
from broker.priority import check_realtime_priority
from proto.topology import Topology
from tests.helpers_broker import ROOT

SCHED_FIFO = getattr(os, "SCHED_FIFO", 1)
RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # a thread that ended meanwhile
        return ""


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid) & ~RESET_ON_FORK


def test_priorities_outside_the_fifo_range_are_refused_by_the_config() -> None:
    assert check_realtime_priority(0) == 0  # off
    assert check_realtime_priority(1) == 1 and check_realtime_priority(99) == 99
    for bad in (-1, 100, 1000):
        with pytest.raises(ValueError, match=r"0 \(off\) or 1\.\.99"):
            BrokerConfig(realtime_priority=bad)


def test_the_cli_rejects_a_bad_priority_before_connecting(amqp_url: str, topology: Topology) -> None:
    out = subprocess.run([sys.executable, "-m", "broker", "run", "--amqp-url", amqp_url, "--namespace",
                          topology.namespace, "--static-group", "g=tiny", "--realtime-priority", "150"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "1..99" in out.stderr


def test_only_the_calling_thread_is_raised_and_children_start_normal() -> None:
    # in a child interpreter, so that this test process keeps its own policy whatever happens
    script = textwrap.dedent("""
        import os, subprocess, sys, threading
        from broker.priority import RealtimePriorityError, use_realtime_priority
        try:
            use_realtime_priority(7)
        except RealtimePriorityError as exc:
            print("REFUSED", exc)
            sys.exit(0)
        reset = os.SCHED_RESET_ON_FORK
        seen = []
        t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0) & ~reset))
        t.start(); t.join()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                               capture_output=True, text=True).stdout.strip()
        print("POLICIES", os.sched_getscheduler(0) & ~reset, os.sched_getparam(0).sched_priority, seen[0], child)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("REFUSED"):  # no CAP_SYS_NICE here: the error must say how to get it
        assert "CAP_SYS_NICE" in out.stdout
        return
    main_policy, priority, thread_policy, child_policy = out.stdout.split()[1:]
    assert (int(main_policy), int(priority)) == (SCHED_FIFO, 7)
    assert int(thread_policy) == os.SCHED_OTHER and int(child_policy) == os.SCHED_OTHER


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root or CAP_SYS_NICE")
def test_a_broker_runs_its_loop_under_fifo_while_its_threads_and_dht_child_stay_normal(
    amqp_url: str, topology: Topology
) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "broker", "run", "--amqp-url", amqp_url, "--namespace",
                             topology.namespace, "--static-group", "g=tiny", "--dht", "--realtime-priority", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read() if proc.poll() is not None else line
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert _policy(proc.pid) == SCHED_FIFO and os.sched_getparam(proc.pid).sched_priority == 5
        others = [t for t in threads if t != proc.pid]
        children = [int(c) for t in threads for c in _read(f"/proc/{proc.pid}/task/{t}/children").split()]
        # --dht: the reader starts in a worker thread, and hivemind runs the DHT in a child process
        assert others and children
        assert all(_policy(t) == os.SCHED_OTHER for t in others + children)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
