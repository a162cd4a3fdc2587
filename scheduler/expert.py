"""The expert rules: how the broker picks a method and a group before any model is trained (cold start).

Documented in docs/scheduler.md ("Expert rules"); the same rules are the ``expert``
baseline of :mod:`scheduler.evaluation`. Kept apart from Algorithm 2 (selection.py)
because they need neither a model nor numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proto.errors import BudgetInvalidError, BudgetTooLowError, UnknownModelError
from proto.methods import DEFAULT_METHOD
from scheduler.embeddings import repetition_score
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection

repetition = lru_cache(maxsize=4096)(repetition_score)  # task texts recur: score each once


def no_candidates(request: RequestFeatures) -> UnknownModelError:
    return UnknownModelError(
        f"no live consumer group serves model {request.model!r}; start a node with "
        f"`dinet-node run --model {request.model}` or check `dinet-broker status`"
    )


def check_budget(budget: float) -> None:
    if not math.isfinite(budget) or budget < 0:
        raise BudgetInvalidError(f"budget must be a finite number >= 0 (0 = unlimited), got {budget!r}")


@dataclass(frozen=True)
class ExpertRules:
    """Thresholds of the documented expert rules (docs/scheduler.md, "Expert rules")."""

    prefix_ratio: float = 0.5  # rule 1: shared prefix ratio at least this ...
    prefix_min_prompt: int = 256  # ... on a prompt at least this long -> prefix_caching
    concurrency: int = 4  # rule 2: this many requests in flight -> continuous_batching
    long_prompt: int = 1024  # rule 3: prompts at least this long -> chunked_prefill
    long_output: int = 128  # rule 4: outputs at least this long ...
    repetition: float = 0.3  # ... on text at least this repetitive -> spec_ngram


def expert_method(
    prompt_tokens: float,
    max_new_tokens: float,
    shared_prefix_ratio: float,
    concurrency: float,
    repetition: float,
    available: Sequence[str],
    rules: ExpertRules = ExpertRules(),
) -> str:
    """The expert rules: the first rule that fires and whose method is available, else baseline.

    1. prefix caching when ``shared_prefix_ratio >= 0.5`` and ``prompt_tokens >= 256``;
    2. continuous batching when ``concurrency >= 4``;
    3. chunked prefill when ``prompt_tokens >= 1024``;
    4. prompt-lookup speculative decoding (spec_ngram) when ``max_new_tokens >= 128``
       and ``repetition >= 0.3`` (repeated word trigrams in the task text);
    5. otherwise baseline (or, when baseline is not available, the first available method).

    Missing (NaN) values never fire a rule.
    """

    def ge(x: float, t: float) -> bool:
        return x is not None and not math.isnan(x) and x >= t

    wanted: list[str] = []
    if ge(shared_prefix_ratio, rules.prefix_ratio) and ge(prompt_tokens, rules.prefix_min_prompt):
        wanted.append("prefix_caching")
    if ge(concurrency, rules.concurrency):
        wanted.append("continuous_batching")
    if ge(prompt_tokens, rules.long_prompt):
        wanted.append("chunked_prefill")
    if ge(max_new_tokens, rules.long_output) and ge(repetition, rules.repetition):
        wanted.append("spec_ngram")
    wanted.append(DEFAULT_METHOD)
    for method in wanted:
        if method in available:
            return method
    return sorted(available)[0] if available else DEFAULT_METHOD


class ExpertRulesPolicy(SchedulingPolicy):
    """Cold start: a method from :func:`expert_method`, then the best group that can run it.

    Group choice: among groups under the budget, those able to run the rule's
    method first, then the highest ``reputation x measured GFLOP/s``, then the
    most nodes. Without a model there is no runtime prediction, so the cost of a
    pair is estimated as ``price x max_new_tokens / ASSUMED_TOKENS_PER_S``.
    """

    name = "expert-rules"
    ASSUMED_TOKENS_PER_S = 20.0

    def __init__(self, rules: ExpertRules | None = None) -> None:
        self.rules = rules or ExpertRules()

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        if not candidates:
            raise no_candidates(request)
        check_budget(request.budget)
        rep = repetition(request.task_text) if request.task_text else math.nan
        args = (request.prompt_tokens, request.max_new_tokens, request.shared_prefix_ratio, request.concurrency, rep)
        all_methods = sorted({m for c in candidates for m in c.methods})
        preferred = expert_method(*args, all_methods, self.rules)
        runtime = max(1, request.max_new_tokens) / self.ASSUMED_TOKENS_PER_S
        best: tuple[Any, ...] | None = None
        cheapest = math.inf
        for c in candidates:
            cost = c.hardware.price_per_hour / 3600.0 * runtime
            cheapest = min(cheapest, cost)
            if request.budget > 0 and cost > request.budget:
                continue
            method = preferred if preferred in c.methods else expert_method(*args, c.methods, self.rules)
            key = (method == preferred, c.reputation * max(c.hardware.gflops, 1.0), len(c.nodes), c.group)
            if best is None or key > best[0]:
                best = (key, c, method, cost)
        if best is None:
            raise BudgetTooLowError(
                f"budget {request.budget:g} is below the estimated cost of every group (cheapest "
                f"{cheapest:.3g}); raise the budget or send 0 for no limit"
            )
        _, group, method, cost = best
        return Selection(method=method, group=group.group, scheduler=self.name, predicted_cost=cost)
