"""Real-time CPU priority for the broker's event loop (``dinet-broker run --realtime-priority N``).

Why: a broker routes a request in about 0.1-0.2 ms of CPU, but on a host it shares with
RabbitMQ (and, in the benchmark, with the load generator) the kernel preempts it in the middle
of a decision one to two times per request. Those waits for a core, not the scheduler's work,
are the tail of the scheduling latency: measured on the 2-core development VM, metainf's
``sched_p99_ms`` drops from 0.8-1.7 ms to 0.4-0.5 ms and involuntary context switches from
~2,000 to 0 per 1,000 requests when the loop runs under ``SCHED_FIFO`` (docs/benchmarks.md).

Only the calling thread (the event loop's) is raised. ``SCHED_RESET_ON_FORK`` makes every
thread and process created afterwards (the DHT child, the text-encoder thread, ...) start
again under the normal policy, so background work never outranks RabbitMQ. The loop blocks in
``epoll`` whenever it has nothing to route, so it yields the CPU on its own; should it ever spin,
the kernel's real-time throttling (``/proc/sys/kernel/sched_rt_runtime_us``, 95 % by default)
still leaves the rest of the host 5 % of every second. It needs ``CAP_SYS_NICE`` (root, or
``AmbientCapabilities=CAP_SYS_NICE`` in a systemd unit).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

MIN_PRIORITY, MAX_PRIORITY = 1, 99  # SCHED_FIFO's range on Linux


class RealtimePriorityError(RuntimeError):
    """The loop could not be given the real-time priority the operator asked for."""


def check_realtime_priority(priority: int) -> int:
    """:raises ValueError: outside 0 (off) or 1..99."""
    if priority != 0 and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"realtime priority must be 0 (off) or {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    return priority


def use_realtime_priority(priority: int) -> None:
    """Run the calling thread under ``SCHED_FIFO`` at ``priority`` (children reset to the normal policy).

    ``0`` leaves the scheduling policy alone.

    :raises ValueError: for a priority outside 0..99.
    :raises RealtimePriorityError: when the platform or the process's privileges do not allow it.
    """
    if check_realtime_priority(priority) == 0:
        return
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_RESET_ON_FORK"):
        raise RealtimePriorityError("real-time priority needs Linux (SCHED_FIFO with SCHED_RESET_ON_FORK)")
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except PermissionError:
        raise RealtimePriorityError(
            f"SCHED_FIFO priority {priority} was refused: run the broker as root or grant it CAP_SYS_NICE "
            "(or drop --realtime-priority)"
        ) from None
    except OSError as exc:
        raise RealtimePriorityError(f"SCHED_FIFO priority {priority} was refused: {exc}") from None
    logger.info("event loop runs under SCHED_FIFO priority %d (threads and processes started later do not)",
                priority)


def current_policy() -> str:
    """The calling thread's scheduling policy, for logs and benchmark output."""
    if not hasattr(os, "sched_getscheduler"):
        return "unknown"
    policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    names = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                                    "SCHED_IDLE") if hasattr(os, name)}
    return names.get(policy, str(policy))
