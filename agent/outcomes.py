"""The agent's witness statement: after each request, what it saw goes to the telemetry stream.

Brokers judge nodes on these ``OutcomeReport`` s (broker/reputation.py), never on what a
node says about itself. An outcome is measured on the agent's own clock (publish ->
first token -> final result) and names the node the answer came from
(``InferenceResult.node_id``). Publishing is best effort: it runs in the background,
after the result was handed over, and a failure is logged, never raised; the user's
result is neither failed nor delayed by it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel

from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.telemetry import ENTRY_CONFIRM_TIMEOUT_S, publish_entry_best_effort
from proto.topology import Topology

BROKER_NODE_PREFIX = "broker:"  # a broker refused the request itself: no node to judge


@dataclass(frozen=True)
class Observation:
    """What the agent measured for one request, on its own clock."""

    request_id: str
    node_id: str  # who answered; with no answer, whose chunks arrived ("" if none)
    group: str
    answered: bool
    ok: bool
    error_code: int
    deadline_passed: bool
    ttft_s: float  # 0 when no token arrived
    total_s: float
    new_tokens: int
    # the answer's verified signature, forwarded so brokers can check who answered (proto/result_signing.py);
    # all empty when the result was unsigned or refused
    signer_key: bytes = b""
    signature: bytes = b""
    answer_digest: bytes = b""

    def to_proto(self, agent_id: str) -> messages_pb2.OutcomeReport:
        decode = self.total_s - self.ttft_s
        rate = (self.new_tokens - 1) / decode if self.new_tokens > 1 and self.ttft_s > 0 and decode > 0 else 0.0
        return messages_pb2.OutcomeReport(
            request_id=self.request_id,
            node_id=self.node_id,
            group=self.group,
            answered=self.answered,
            ok=self.ok,
            error_code=self.error_code if not self.ok else ErrorCode.ERROR_CODE_UNSPECIFIED,  # type: ignore[arg-type]
            deadline_passed=self.deadline_passed,
            ttft_s=self.ttft_s,
            total_s=self.total_s,
            tokens_per_s=rate,
            new_tokens=self.new_tokens,
            observed_at=time.time(),
            agent_id=agent_id,
            signer_key=self.signer_key,
            signature=self.signature,
            answer_digest=self.answer_digest,
        )


class OutcomeReporter:
    """Publishes outcomes in the background; :meth:`flush` waits (bounded) for the ones in flight."""

    def __init__(self, topology: Topology, agent_id: str, *, timeout_s: float = ENTRY_CONFIRM_TIMEOUT_S) -> None:
        self._topology = topology
        self._agent_id = agent_id
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.published = 0
        self.failed = 0

    def report(self, channel: AbstractChannel | None, observation: Observation) -> None:
        """Queue one outcome for publishing (returns at once; never raises)."""
        if channel is None or observation.node_id.startswith(BROKER_NODE_PREFIX):
            return
        try:
            task = asyncio.get_running_loop().create_task(self._publish(channel, observation))
        except RuntimeError:  # no running loop (the agent is being torn down): nothing to report to
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, channel: AbstractChannel, observation: Observation) -> None:
        report = observation.to_proto(self._agent_id)
        if await publish_entry_best_effort(channel, self._topology, report, app_id=self._agent_id,
                                           timeout_s=self._timeout_s):
            self.published += 1
        else:  # logged; the user has the result already
            self.failed += 1

    async def flush(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for outcomes still being published (called before closing)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
