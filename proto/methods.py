"""Acceleration methods: the small typed configs a scheduler picks and a node executes.

A method is chosen per request; the weight format (fp32/bf16/int8) belongs to the
consumer group, because it is how that group's nodes loaded their weights. The
method's embedding for the meta-predictor is :meth:`AccelerationMethod.features`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AccelerationMethod:
    name: str
    dynamic_batching: bool = False
    continuous_batching: bool = False
    prefix_caching: bool = False
    prefill_chunk: int = 0  # 0 = prefill the whole prompt at once
    speculative: str = ""  # "" | "ngram" | "draft"
    draft_tokens: int = 0  # tokens proposed per speculative step
    batch_window_ms: float = 0.0  # dynamic batching: how long to wait for companions
    max_batch: int = 1

    def features(self) -> dict[str, float]:
        """Numeric embedding phi of the method: its flags and parameters."""
        out: dict[str, float] = {}
        for key, value in asdict(self).items():
            if key == "name":
                continue
            if key == "speculative":
                out["method.spec_ngram"] = float(value == "ngram")
                out["method.spec_draft"] = float(value == "draft")
            else:
                out[f"method.{key}"] = float(value)
        return out


METHODS: dict[str, AccelerationMethod] = {
    m.name: m
    for m in (
        AccelerationMethod("baseline"),
        AccelerationMethod("dynamic_batching", dynamic_batching=True, batch_window_ms=10.0, max_batch=16),
        AccelerationMethod("continuous_batching", continuous_batching=True, max_batch=16),
        AccelerationMethod("prefix_caching", prefix_caching=True),
        AccelerationMethod("chunked_prefill", prefill_chunk=128),
        AccelerationMethod("spec_ngram", speculative="ngram", draft_tokens=4),
        AccelerationMethod("spec_draft", speculative="draft", draft_tokens=4),
        AccelerationMethod(
            "all",
            continuous_batching=True,
            prefix_caching=True,
            prefill_chunk=128,
            speculative="ngram",
            draft_tokens=4,
            max_batch=16,
        ),
    )
}
DEFAULT_METHOD = "baseline"


def get_method(name: str) -> AccelerationMethod:
    """:raises ValueError: naming the known methods when ``name`` is not one of them."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown acceleration method {name!r}; known: {', '.join(METHODS)}") from None
