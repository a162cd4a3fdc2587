"""The synchronous routing step: request -> candidates (directory + reputation) -> policy -> decision.

No I/O and no awaits, so its cost is the broker's scheduling latency (``sched_ms``)
and it is unit-tested without RabbitMQ.
"""

from __future__ import annotations

import time

from broker.directory import GroupDirectory, GroupInfo
from broker.features import PrefixTracker, request_features
from broker.reputation import ReputationLedger
from proto import messages_pb2
from proto.errors import NoRouteError, UnknownModelError
from proto.methods import METHODS
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection

ALL_METHODS = tuple(METHODS)
CANDIDATES_TTL_S = 1.0
RouteEntry = tuple[messages_pb2.InferenceRequest, float, int]  # request, now, concurrency at arrival


class Router:
    """Builds the candidates for a request and asks the scheduling policy to choose."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        directory: GroupDirectory,
        ledger: ReputationLedger,
        *,
        broker_id: str,
        methods: tuple[str, ...] = ALL_METHODS,
    ) -> None:
        self.policy = policy
        self.directory = directory
        self.ledger = ledger
        self.broker_id = broker_id
        self.methods = methods
        self.prefixes = PrefixTracker()
        # (model, group hint, method hint) -> (directory list, ledger.observed, built at, candidates)
        self._candidates: dict[tuple[str, str, str], tuple[list[GroupInfo], int, float, list[GroupCandidate]]] = {}

    def candidates(self, request: messages_pb2.InferenceRequest, now: float) -> list[GroupCandidate]:
        """Live groups serving the model, with their eligible nodes and the reputations used.

        Reused for up to ``CANDIDATES_TTL_S`` while neither the directory's view nor the ledger changed
        (reputations only drift with time between reports: a half-life of minutes), so a stream of requests
        for one model costs one candidate list per second, and the policy sees the same objects (its
        per-candidate-set caches then hit by identity).

        :raises UnknownModelError: no live group serves the model (or the hinted group does not).
        :raises NoRouteError: groups exist, but every one of their nodes is below the reputation threshold.
        """
        groups: list[GroupInfo] = self.directory.groups_for(request.model)
        key = (request.model, request.group_hint, request.method_hint)
        hit = self._candidates.get(key)
        fresh = hit is not None and hit[0] is groups and hit[1] == self.ledger.observed
        if fresh and hit is not None and 0 <= now - hit[2] < CANDIDATES_TTL_S:
            return hit[3]
        out = self._build_candidates(request, groups, now)
        if len(self._candidates) > 1024:
            self._candidates.clear()
        self._candidates[key] = (groups, self.ledger.observed, now, out)
        return out

    def _build_candidates(
        self, request: messages_pb2.InferenceRequest, groups: list[GroupInfo], now: float
    ) -> list[GroupCandidate]:
        if request.group_hint:
            groups = [g for g in groups if g.group == request.group_hint]
        if not groups:
            where = f" in group {request.group_hint!r}" if request.group_hint else ""
            raise UnknownModelError(
                f"no live consumer group serves model {request.model!r}{where}; start a node with "
                f"`dinet-node run --model {request.model}` or check `dinet-broker status`"
            )
        wanted = (request.method_hint,) if request.method_hint else self.methods
        threshold = self.ledger.config.threshold
        out: list[GroupCandidate] = []
        without_method: list[str] = []
        for info in groups:
            methods = tuple(m for m in wanted if m in info.methods) if info.methods else wanted
            if not methods:  # e.g. a vLLM group built for another method than the hinted one
                without_method.append(info.group)
                continue
            nodes = info.nodes or tuple(self.ledger.nodes_of_group(info.group, now))
            reputations = {n: self.ledger.score(n, now) for n in nodes}
            trusted = tuple(n for n in nodes if reputations[n] >= threshold)
            if nodes and not trusted:
                continue  # every node of this group is below the threshold: no work for it
            out.append(
                GroupCandidate(
                    group=info.group,
                    hardware=info.hardware,
                    nodes=trusted,
                    reputations={n: reputations[n] for n in trusted},
                    methods=methods,
                )
            )
        if not out and len(without_method) == len(groups):
            raise NoRouteError(
                f"no live group serving model {request.model!r} runs method {request.method_hint!r} "
                f"(groups {', '.join(without_method)} run other methods); drop the method hint or pick another"
            )
        if not out:
            raise NoRouteError(
                f"every node serving model {request.model!r} is below the reputation threshold "
                f"{threshold}; retry later (reputation recovers as nodes behave) or add nodes"
            )
        return out

    def features(self, request: messages_pb2.InferenceRequest, concurrency: int) -> RequestFeatures:
        ratio = self.prefixes.observe(request.model, request.prompt)
        return request_features(request, shared_prefix_ratio=ratio, concurrency=concurrency)

    def route(
        self, request: messages_pb2.InferenceRequest, *, now: float, concurrency: int = 0
    ) -> messages_pb2.RoutingDecision:
        """:raises proto.errors.DinetError: typed, when nothing can serve the request."""
        started = time.perf_counter()
        candidates = self.candidates(request, now)
        selection = self.policy.select(self.features(request, concurrency), candidates)
        return self._decision(request, candidates, selection, now, started)

    def route_many(self, entries: list[RouteEntry]) -> list[messages_pb2.RoutingDecision | Exception]:
        """Route a window of requests with one ``policy.select_many`` (one batched prediction per candidate
        set); each slot holds the decision or the exception routing that request raised."""
        started = time.perf_counter()
        out: list[messages_pb2.RoutingDecision | Exception | None] = [None] * len(entries)
        items: list[tuple[RequestFeatures, list[GroupCandidate]]] = []
        slots: list[int] = []
        for i, (request, now, concurrency) in enumerate(entries):
            try:
                candidates = self.candidates(request, now)
                items.append((self.features(request, concurrency), candidates))
                slots.append(i)
            except Exception as error:
                out[i] = error
        if items:
            selections = self.policy.select_many(items)
            for i, (_, candidates), selection in zip(slots, items, selections, strict=True):
                if isinstance(selection, Exception):
                    out[i] = selection
                    continue
                request, now, _ = entries[i]
                try:
                    out[i] = self._decision(request, candidates, selection, now, started)
                except Exception as error:
                    out[i] = error
        return out  # type: ignore[return-value]

    def _decision(
        self,
        request: messages_pb2.InferenceRequest,
        candidates: list[GroupCandidate],
        selection: Selection,
        now: float,
        started: float,
    ) -> messages_pb2.RoutingDecision:
        chosen = next((c for c in candidates if c.group == selection.group), None)
        if chosen is None:
            raise NoRouteError(
                f"scheduler {self.policy.name!r} chose group {selection.group!r}, which is not a live "
                f"candidate for model {request.model!r}"
            )
        method = request.method_hint or selection.method
        return messages_pb2.RoutingDecision(
            method=method,
            group=selection.group,
            scheduler=selection.scheduler or self.policy.name,
            model_version=selection.model_version,
            predicted_tokens_per_s=selection.predicted_tokens_per_s,
            predicted_cost=selection.predicted_cost,
            reputations=chosen.reputations,
            exploration=selection.exploration,
            broker_id=self.broker_id,
            routed_at=now,
            sched_ms=(time.perf_counter() - started) * 1000.0,
        )
