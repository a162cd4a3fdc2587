"""Loading a scheduling policy (and its online learner) by name.

``fixed-rule`` is the dependency-free default (:class:`scheduler.interface.FixedRulePolicy`).
``metainf`` loads the learned MetaInf policy from :mod:`scheduler.metainf` (its
``build_policy(model_path)`` or ``load_policy(model_path)``, else ``MetaInfPolicy.load(path)`` /
``MetaInfPolicy()``); any other policy can be named as ``package.module:factory``. A
factory is called with the model path (``--scheduler-model``) when one is given, else
with no argument, and must return a :class:`~scheduler.interface.SchedulingPolicy`. A policy that also has an
``observe(report)`` method is fed every TimingReport from the telemetry stream
(that is how an online learner sees the outcomes of its own decisions). Sinks see
nodes' own reports only; reputation is judged on agents' outcomes (broker/reputation.py).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol, runtime_checkable

from proto import messages_pb2
from scheduler.interface import FixedRulePolicy, SchedulingPolicy

logger = logging.getLogger(__name__)

NAMED = {
    "fixed-rule": "scheduler.interface:FixedRulePolicy",
    "metainf": "scheduler.metainf",
}


@runtime_checkable
class TelemetrySink(Protocol):
    """Anything fed the telemetry stream, one report at a time (e.g. an online learner)."""

    def observe(self, report: messages_pb2.TimingReport) -> None: ...


def _call(factory: Any, model_path: str | None) -> Any:
    return factory(model_path) if model_path else factory()


def _metainf(module: Any, model_path: str | None) -> SchedulingPolicy:
    for factory_name in ("build_policy", "load_policy"):
        factory = getattr(module, factory_name, None)
        if callable(factory):
            return _call(factory, model_path)  # type: ignore[no-any-return]
    cls = getattr(module, "MetaInfPolicy", None)
    if cls is None:
        raise ValueError(f"{module.__name__} has neither build_policy() nor MetaInfPolicy")
    if model_path and hasattr(cls, "load"):
        return cls.load(model_path)  # type: ignore[no-any-return]
    return cls()  # type: ignore[no-any-return]


def load_policy(name: str, model_path: str | None = None) -> SchedulingPolicy:
    """:raises ValueError: unknown name, or the factory did not return a SchedulingPolicy."""
    if name == "fixed-rule":
        return FixedRulePolicy()
    target = NAMED.get(name, name)
    module_name, _, attr = target.partition(":")
    if not module_name or (name not in NAMED and not attr):
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(NAMED)} or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"scheduler {name!r}: cannot import {module_name} ({exc})") from exc
    if attr and not callable(getattr(module, attr, None)):
        raise ValueError(f"scheduler {name!r}: {module_name} has no factory {attr!r}")
    policy = _metainf(module, model_path) if not attr else _call(getattr(module, attr), model_path)
    if not isinstance(policy, SchedulingPolicy):
        raise ValueError(f"scheduler {name!r} built a {type(policy).__name__}, not a SchedulingPolicy")
    return policy
