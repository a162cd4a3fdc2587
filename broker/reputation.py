"""Per-node reputation from the telemetry stream, judged by the agents a node served.

Trust model. A node is never its own witness: its ``TimingReport`` s feed the
meta-training set (scheduler rows) but never move its reputation, since a node that
lies ("ok, fast") would otherwise keep a perfect score. The evidence comes from the
other two parties of each request:

- the **broker** that routed it publishes a ``RoutingRecord`` (request id, requesting
  agent, group, predicted tokens/s, ``routed_at``) *before* the ``RoutedTask``, so a node
  only learns a request id after the genuine record is on the stream;
- the **agent** publishes an ``OutcomeReport`` when the request is over: which node
  answered (``InferenceResult.node_id``), ok or the typed error, and its own clock's
  time to first token, total time and token rate.

The ledger keeps the records in a bounded map (``pending_routes``, oldest dropped) and
judges a node when the outcome of a recorded request arrives, once per request. An
outcome counts only when a record for its request id is known, its ``agent_id`` is the
one that sent the request, and the group it names is the group the request was routed
to; otherwise it is ignored (counted in :attr:`ReputationLedger.ignored`). Counting an
outcome without a record would let any writer of the stream sink any node with
invented request ids. The event time of a judgement is the broker's ``routed_at``,
never a time an agent or a node wrote, so nobody can age evidence away.

Who answered. Nodes sign their results with their DHT record key and agents forward the
signature in their outcome (:mod:`proto.result_signing`); :mod:`broker.evidence` verifies
it over the outcome's own fields. An answered outcome moves the named node's score only
when it is signed by the key that owns that node's DHT record (``owner_key``, the broker's
DHT view), or, for a node with no record in view (static groups, a node gone from the
DHT), by the key its earlier credited answers were signed with (the first signer seen
for a node id is trusted). Otherwise (an
unsigned answer, another node's key) the request is over and nobody is judged; the
reason is counted in :attr:`ReputationLedger.ignored`. So a node that puts another node's
id on its results moves nothing, and an agent cannot report an ok or error the node did
not sign. What can still lie: an agent may withhold or misreport its own timings; streamed
chunks are unsigned, so a deadline missed after chunks arrived is blamed on the node those
chunks name; agent ids are not authenticated on AMQP. A deadline that passed with no
answer and no streamed tokens cannot be blamed on anyone (nobody knows which node, if any,
held the task): it is counted in :attr:`ReputationLedger.unattributed` and moves no score.
The DHT view is each broker's own, so brokers may disagree on an outcome judged while a
node's record was out of one broker's view.

Every broker feeds the same stream, in the same order, into a :class:`ReputationLedger`,
so every broker (and `dinet-broker status`) rebuilds the same table; only the final
read-out ages the evidence to "now".

Score of a node, in [0, 1]::

    success = (S + w * prior) / (S + F + w)         S, F: decayed successes / failures
    latency = 0.5 + 0.5 * (L + w) / (n + w)          L: decayed sum of min(1, observed/predicted) over n
    score   = success * latency

A failure is a node-side error the agent received (NODE_FAILURE, INTERNAL, unspecified),
a deadline the node missed after the agent had received tokens from it (weighted
``timeout_weight``; an answered DEADLINE_EXCEEDED with no token streamed is neutral, the
task may have waited in the group queue), or a stall: a success at an agent-observed
rate under ``stall_ratio`` of the throughput the broker's record predicted. Errors that
are the client's fault (bad prompt, budget, ...) are neutral. Latency alone cannot push
a node below 0.5: a mispredicting scheduler must not ban the whole swarm.
"""


from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.config import ReputationConfig
from broker.evidence import Outcome, Route, attribution_problem
from proto.common_pb2 import ErrorCode

logger = logging.getLogger(__name__)

NODE_FAULTS = frozenset({ErrorCode.ERROR_CODE_UNSPECIFIED, ErrorCode.NODE_FAILURE, ErrorCode.INTERNAL})
ROUTES_PER_REQUEST = 4  # a request routed again (broker crash, redelivery) keeps its first few records
BROKER_NODE_PREFIX = "broker:"  # node id of an error result a broker sent itself: not a node


@dataclass
class NodeStanding:
    """Decayed evidence about one node, as of event time ``updated_at``."""

    node_id: str
    group: str = ""
    successes: float = 0.0
    failures: float = 0.0
    latency_sum: float = 0.0
    latency_n: float = 0.0
    updated_at: float = 0.0  # event time of the evidence above
    reports: int = 0  # outcomes ever attributed to it (not decayed)
    last_error: str = ""

    def decayed(self, now: float, half_life_s: float) -> NodeStanding:
        """A copy aged to ``now`` (event time never runs backwards)."""
        factor = _decay(now - self.updated_at, half_life_s)
        return NodeStanding(
            node_id=self.node_id,
            group=self.group,
            successes=self.successes * factor,
            failures=self.failures * factor,
            latency_sum=self.latency_sum * factor,
            latency_n=self.latency_n * factor,
            updated_at=max(now, self.updated_at),
            reports=self.reports,
            last_error=self.last_error,
        )


def _decay(dt: float, half_life_s: float) -> float:
    return 0.5 ** (dt / half_life_s) if dt > 0 else 1.0


@dataclass(frozen=True)
class NodeReputation:
    """One row of the reputation table."""

    node_id: str
    group: str
    score: float
    eligible: bool
    successes: float
    failures: float
    reports: int
    last_seen: float
    last_error: str


class ReputationLedger:
    """Joins brokers' routing records with agents' outcomes into per-node standings; read with :meth:`score`.

    :param owner_key: node id -> the public key owning its DHT record, ``None`` when unknown
        (:meth:`broker.directory.GroupDirectory.owner_key`); without it only first-seen keys are checked.
    """

    def __init__(self, config: ReputationConfig | None = None, *,
                 owner_key: Callable[[str], bytes | None] | None = None) -> None:
        self.config = config or ReputationConfig()
        self._owner_key = owner_key
        self._signers: dict[str, bytes] = {}  # node id -> the key its last credited answer was signed with
        self._nodes: dict[str, NodeStanding] = {}
        self._routes: OrderedDict[str, tuple[Route, ...]] = OrderedDict()  # request id -> records, oldest first
        self.observed = 0  # outcomes attributed to a node (changes whenever a score may have)
        self.unattributed = 0  # outcomes of recorded requests that no node can be blamed for
        self.ignored: Counter[str] = Counter()  # outcomes (and records) not counted, by reason

    def record_route(self, route: Route) -> None:
        """Remember a broker's decision until its agent reports the outcome (bounded, oldest dropped)."""
        known = self._routes.get(route.request_id, ())
        if any(r.group == route.group for r in known) or len(known) >= ROUTES_PER_REQUEST:
            self.ignored["route already recorded"] += 1  # the first record per group wins
            return
        self._routes[route.request_id] = (*known, route)
        while len(self._routes) > self.config.pending_routes:
            self._routes.popitem(last=False)
            self.ignored["route expired unjudged"] += 1

    @property
    def pending_routes(self) -> int:
        return len(self._routes)

    def judge(self, outcome: Outcome) -> bool:
        """Fold one agent outcome in; returns whether it was accepted (attributed or unattributed)."""
        route = self._route_for(outcome)
        if route is None:
            return False
        del self._routes[outcome.request_id]  # one judgement per request
        if not self._signer_stands_for_node(outcome):
            return False
        if not outcome.node_id:
            self.unattributed += 1
            return True
        cfg = self.config
        node = self._nodes.get(outcome.node_id)
        if node is None:
            node = NodeStanding(outcome.node_id)
        aged = node.decayed(max(route.routed_at, node.updated_at), cfg.half_life_s)
        aged.group = route.group
        aged.reports += 1
        self._fold(aged, outcome, route)
        self._nodes[outcome.node_id] = aged
        self.observed += 1
        return True

    def _signer_stands_for_node(self, outcome: Outcome) -> bool:
        """Whether the answer's signer may move ``outcome.node_id``'s score (see the module docstring)."""
        owner = self._owner_key(outcome.node_id) if self._owner_key is not None else None
        problem = attribution_problem(outcome, owner_key=owner, known_key=self._signers.get(outcome.node_id))
        if problem:
            self.ignored[problem] += 1
            log = logger.debug if problem == "answer not signed" else logger.warning
            log("outcome of request %s not credited to node %s: %s", outcome.request_id, outcome.node_id, problem)
            return False
        if outcome.signer_key:
            self._signers[outcome.node_id] = outcome.signer_key
        return True

    def _route_for(self, outcome: Outcome) -> Route | None:
        """The broker record this outcome may be judged against, or None (and why, in :attr:`ignored`)."""
        routes = self._routes.get(outcome.request_id)
        reason = ""
        route = None
        if not routes:
            reason = "no routing record for the request"
        elif outcome.node_id.startswith(BROKER_NODE_PREFIX):
            reason = "answered by a broker, not a node"
        else:
            route = next((r for r in routes if r.group == outcome.group), None) if outcome.group else routes[0]
            if route is None:
                reason = "group differs from the routing record"
            elif route.agent_id != outcome.agent_id:
                reason, route = "agent is not the one that sent the request", None
        if reason:
            self.ignored[reason] += 1
        return route

    def _fold(self, aged: NodeStanding, outcome: Outcome, route: Route) -> None:
        cfg = self.config
        if outcome.ok:
            predicted = route.predicted_tokens_per_s
            rate = outcome.observed_rate()
            if predicted > 0 and rate is not None:
                ratio = rate / predicted
                aged.latency_sum += min(1.0, ratio)
                aged.latency_n += 1.0
                if ratio < cfg.stall_ratio:
                    aged.failures += 1.0
                    aged.last_error = "STALL"
                    return
            aged.successes += 1.0
        elif outcome.deadline_passed or outcome.error_code == ErrorCode.DEADLINE_EXCEEDED:
            if outcome.new_tokens > 0:  # it had started answering, then missed the deadline: it stalled
                aged.failures += cfg.timeout_weight
                aged.last_error = "TIMEOUT"
        elif outcome.answered and outcome.error_code in NODE_FAULTS:
            aged.failures += 1.0
            aged.last_error = ErrorCode.Name(outcome.error_code)  # type: ignore[arg-type]

    def score(self, node_id: str, now: float) -> float:
        node = self._nodes.get(node_id)
        if node is None:
            return self.config.prior
        return self._score(node.decayed(now, self.config.half_life_s))

    def _score(self, node: NodeStanding) -> float:
        cfg = self.config
        w = cfg.prior_weight
        success = (node.successes + w * cfg.prior) / (node.successes + node.failures + w)
        latency = 0.5 + 0.5 * (node.latency_sum + w) / (node.latency_n + w)
        return max(0.0, min(1.0, success * latency))

    def eligible(self, node_id: str, now: float) -> bool:
        return self.score(node_id, now) >= self.config.threshold

    def nodes_of_group(self, group: str, now: float) -> list[str]:
        """Nodes judged in ``group`` within ``node_seen_ttl_s`` (event time)."""
        horizon = now - self.config.node_seen_ttl_s
        return sorted(
            n.node_id for n in self._nodes.values() if n.group == group and n.updated_at >= horizon
        )

    def table(self, now: float) -> list[NodeReputation]:
        rows = []
        for node in self._nodes.values():
            aged = node.decayed(now, self.config.half_life_s)
            score = self._score(aged)
            rows.append(
                NodeReputation(
                    node_id=node.node_id,
                    group=node.group,
                    score=round(score, 4),
                    eligible=score >= self.config.threshold,
                    successes=round(aged.successes, 3),
                    failures=round(aged.failures, 3),
                    reports=node.reports,
                    last_seen=node.updated_at,
                    last_error=node.last_error,
                )
            )
        return sorted(rows, key=lambda r: (r.group, r.node_id))
