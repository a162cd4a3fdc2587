"""The contract between the broker and any scheduling policy.

The broker describes the request (:class:`RequestFeatures`) and the live consumer
groups that serve its model (:class:`GroupCandidate`); a policy returns a
:class:`Selection` or raises a typed error from :mod:`proto.errors`
(``BudgetTooLowError`` when no pair fits the budget, ``UnknownModelError`` when
there are no candidates).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from proto.errors import UnknownModelError
from proto.methods import DEFAULT_METHOD
from proto.records import HardwareInfo


@dataclass(frozen=True)
class RequestFeatures:
    """Classical meta-features of one request (part of the data embedding psi)."""

    model: str
    prompt_tokens: int  # estimated by the broker (it does not hold the tokenizer)
    max_new_tokens: int
    shared_prefix_ratio: float = 0.0  # against recent traffic, 0..1
    concurrency: int = 0  # requests in flight at arrival
    priority: str = "normal"
    budget: float = 0.0  # 0 = unlimited
    task_text: str = ""  # prompt prefix or task description, for the LM embedding


@dataclass(frozen=True)
class GroupCandidate:
    """A live consumer group able to serve the request's model."""

    group: str
    hardware: HardwareInfo
    nodes: tuple[str, ...]
    reputations: dict[str, float] = field(default_factory=dict)  # node_id -> [0, 1]
    methods: tuple[str, ...] = (DEFAULT_METHOD,)  # methods its nodes can execute

    @property
    def reputation(self) -> float:
        """Mean reputation of the group's nodes; 1.0 for a group nobody has judged yet."""
        if not self.reputations:
            return 1.0
        return sum(self.reputations.values()) / len(self.reputations)


@dataclass(frozen=True)
class Selection:
    method: str
    group: str
    scheduler: str  # name of the policy that decided, e.g. "fixed-rule", "expert-rules", "metainf"
    model_version: str = ""
    predicted_tokens_per_s: float = 0.0
    predicted_cost: float = 0.0
    exploration: bool = False


class SchedulingPolicy(ABC):
    """Chooses a (method, group) pair for a request."""

    name: str = "abstract"

    @abstractmethod
    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        """:raises proto.errors.DinetError: a typed error when nothing can serve the request."""

    batches = False  # True: select_many does better than one select per request (the broker then batches)

    def select_many(
        self, items: Sequence[tuple[RequestFeatures, Sequence[GroupCandidate]]]
    ) -> list[Selection | Exception]:
        """Select for a window of requests; each slot holds its Selection or the exception its selection raised
        (typed :class:`~proto.errors.DinetError` or a bug), so one bad request never fails the others.

        Policies that can score many requests in one batched prediction override this.
        """
        out: list[Selection | Exception] = []
        for request, candidates in items:
            try:
                out.append(self.select(request, candidates))
            except Exception as error:
                out.append(error)
        return out


class FixedRulePolicy(SchedulingPolicy):
    """The walking skeleton's rule: baseline method on the group with the most nodes.

    A group that runs only some methods (a vLLM group built for one) gets its first method instead, and
    groups that run the baseline are preferred, so the rule never routes a method a group cannot run.

    Kept as the dependency-free default so broker tests run without XGBoost.
    """

    name = "fixed-rule"

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        if not candidates:
            raise UnknownModelError(
                f"no live consumer group serves model {request.model!r}; start a node with "
                f"`dinet-node run --model {request.model}` or check `dinet-broker status`"
            )
        best = max(candidates, key=lambda c: (DEFAULT_METHOD in c.methods, len(c.nodes), c.group))
        method = DEFAULT_METHOD if DEFAULT_METHOD in best.methods else best.methods[0]
        return Selection(method=method, group=best.group, scheduler=self.name)
