"""The reputation fence: a node the brokers would judge below the threshold stops taking its group's tasks.

Why. Brokers route a request to a consumer group's queue, not to a node, and every node of
the group competes on that queue. A broker can leave a node below the reputation threshold
out of its candidate list, but that node still consumes the group queue, so it still gets
work. The fence closes that gap without per-node queues: the node replays the telemetry
stream from its start into the very same :class:`broker.reputation.ReputationLedger`
(with the same :class:`broker.config.ReputationConfig`) that every broker rebuilds, read-only,
through the brokers' own stream reader (:class:`broker.telemetry.TelemetryConsumer`, used
as it is, whatever evidence it hands the ledger). When that ledger says this node's id
(the one it answers and reports under) is not ``eligible``, the worker cancels its consumer
(``basic.cancel``) so RabbitMQ hands the group's tasks to the other nodes; it re-checks
every few seconds, aging the evidence to "now", and consumes again once decay brings it
back above the threshold. Resuming is the probe: new evidence then sinks it again or
confirms the recovery.

Trust: this is compliance, not enforcement. It keeps a faulty but honest node (broken
hardware, overloaded, stalling) from taking work it would fail; a malicious node simply
runs without the fence (``--no-reputation-fence`` or patched code) and keeps consuming,
and brokers cannot stop it while they route to group queues. The stronger next steps are
per-node queues (a broker sends a task only to a node it trusts) or broker-side fencing.

Nothing is lost: the fence only cancels the consumer. Tasks already delivered to the node
run to the end and are settled as usual; a task delivered between the cancel and its
``cancel-ok`` is processed, never nacked; what stays in the queue goes to the group's other
nodes, or waits for this node's return when it is the group's only one (brokers stop
routing to a group whose nodes are all below the threshold: another group gets the request, or,
when no other group serves the model, the agent gets ``NO_ROUTE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker.config import ReputationConfig
from broker.config import check_reputation_config as check_broker_reputation
from broker.reputation import ReputationLedger
from broker.telemetry import TelemetryConsumer
from node.replies import TRANSPORT_ERRORS
from proto.topology import Topology

logger = logging.getLogger(__name__)


def check_reputation_config(config: ReputationConfig) -> ReputationConfig:
    """The same knobs brokers use, checked so a typo fails at start instead of fencing every node
    (:func:`broker.config.check_reputation_config`, which ``ReputationConfig`` also runs when built).

    :raises ValueError: naming the knob and its valid range.
    """
    return check_broker_reputation(config)


class LedgerView(Protocol):
    """What the fence reads of a ledger (:class:`broker.reputation.ReputationLedger` has it)."""

    def eligible(self, node_id: str, now: float) -> bool: ...

    def score(self, node_id: str, now: float) -> float: ...


class FenceAction(enum.Enum):
    """What one check asks of the consumer."""

    NONE = "none"
    FENCE = "fence"  # cancel the group queue consumer
    RESUME = "resume"  # consume the group queue again


@dataclass
class FenceState:
    """The fence's state machine, without I/O: decide from the ledger's verdict, record what was applied.

    A decision changes nothing until :meth:`applied` confirms it, so a cancel or consume that
    failed on the transport is simply decided again at the next check.
    """

    fenced: bool = False
    stopped: bool = False  # the worker is draining: never resume
    fenced_since: float | None = None
    fences: int = 0  # times this node fenced itself
    resumes: int = 0  # times it came back

    def decide(self, eligible: bool) -> FenceAction:
        if self.stopped:
            return FenceAction.NONE
        if not self.fenced and not eligible:
            return FenceAction.FENCE
        if self.fenced and eligible:
            return FenceAction.RESUME
        return FenceAction.NONE

    def applied(self, action: FenceAction, now: float) -> None:
        if action is FenceAction.FENCE:
            self.fenced, self.fenced_since = True, now
            self.fences += 1
        elif action is FenceAction.RESUME:
            self.fenced, self.fenced_since = False, None
            self.resumes += 1

    def stop(self) -> None:
        self.stopped = True


class ReputationFence:
    """Checks the ledger every ``interval_s`` and pauses or resumes the worker's consumer.

    :param pause: cancels the group queue consumer (a no-op when there is none).
    :param resume: starts consuming again; a transport error it raises is retried at the next check.
    :param clock: event-time "now" (unix seconds), the clock the ledger ages evidence to.
    """

    def __init__(
        self,
        node_id: str,
        ledger: LedgerView,
        *,
        threshold: float,
        pause: Callable[[], Awaitable[None]],
        resume: Callable[[], Awaitable[None]],
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"fence interval_s must be > 0, got {interval_s}")
        self.node_id = node_id
        self.ledger = ledger
        self.threshold = threshold
        self.interval_s = interval_s
        self.state = FenceState()
        self._pause = pause
        self._resume = resume
        self._clock = clock

    @property
    def fenced(self) -> bool:
        return self.state.fenced

    async def check(self) -> FenceAction:
        """One look at the ledger; returns the action that was applied (NONE when nothing changed)."""
        now = self._clock()
        action = self.state.decide(self.ledger.eligible(self.node_id, now))
        if action is FenceAction.NONE:
            return action
        score = self.ledger.score(self.node_id, now)
        try:
            await (self._pause if action is FenceAction.FENCE else self._resume)()
        except TRANSPORT_ERRORS as exc:
            logger.warning("node %s: could not %s consuming (%s); retrying in %.1f s",
                           self.node_id, "stop" if action is FenceAction.FENCE else "resume", exc, self.interval_s)
            return FenceAction.NONE
        since = self.state.fenced_since
        self.state.applied(action, now)
        if action is FenceAction.FENCE:
            logger.warning(
                "node %s fenced itself: its reputation %.3f is below the threshold %.3f (the brokers' ledger, "
                "rebuilt from telemetry%s); stopped consuming its group queue so other nodes take the tasks, "
                "tasks in hand finish; re-checking every %.1f s", self.node_id, score, self.threshold,
                _last_error(self.ledger, self.node_id, now), self.interval_s,
            )
        else:
            logger.warning("node %s back above the reputation threshold (%.3f >= %.3f) after %.0f s fenced; "
                           "consuming its group queue again", self.node_id, score, self.threshold,
                           now - (since if since is not None else now))
        return action

    async def run(self) -> None:
        """Check every ``interval_s`` until stopped or cancelled; a bug in one check never ends the loop."""
        while not self.state.stopped:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                logger.exception("node %s: reputation check failed; trying again in %.1f s",
                                 self.node_id, self.interval_s)


def _last_error(ledger: LedgerView, node_id: str, now: float) -> str:
    """``", last error X"`` from the ledger's table when it has one, for the log line."""
    table = getattr(ledger, "table", None)
    if table is None:
        return ""
    row = next((r for r in table(now) if r.node_id == node_id), None)
    return f", last error {row.last_error}" if row is not None and row.last_error else ""


class ReputationWatch:
    """Replays ``<ns>.telemetry`` from its start into a :class:`ReputationLedger`, read-only, as brokers do.

    :param owner_key: node id -> the key that alone may sign for it, ``None`` when unknown (the node passes its
        own id and key: without it, whoever signed first in its name would own its score, as brokers with no
        DHT record in view assume).
    """

    def __init__(self, topology: Topology, config: ReputationConfig, *, prefetch: int = 256,
                 owner_key: Callable[[str], bytes | None] | None = None) -> None:
        self.ledger = ReputationLedger(check_reputation_config(config), owner_key=owner_key)
        self.consumer = TelemetryConsumer(topology, self.ledger, prefetch=prefetch)
        self._channel: AbstractChannel | None = None

    async def start(self, connection: AbstractRobustConnection, *, catch_up_s: float) -> bool:
        """Start reading; returns whether the replay went quiet (caught up) within ``catch_up_s``."""
        self._channel = await connection.channel()
        await self.consumer.start(self._channel)
        caught_up = await self.consumer.wait_caught_up(timeout_s=catch_up_s)
        if not caught_up:
            logger.warning("telemetry replay still running after %.0f s; judging this node on what was read so far "
                           "(the fence re-checks as the rest arrives)", catch_up_s)
        return caught_up

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await self._channel.close()
        self._channel = None
