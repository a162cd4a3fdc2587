"""Pure validation of an incoming request: bytes in, a parsed request or a typed error out.

No I/O: every rule here is unit-tested without RabbitMQ. The broker calls
:func:`reply_target` first (so it knows where an error can be sent even when the
rest of the request is bad), then :func:`parse_request` and :func:`validate_request`.
Whether the model is served is not checked here: that needs the live directory.
"""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError

from broker.config import ValidationLimits
from proto import messages_pb2
from proto.errors import (
    BudgetInvalidError,
    DeadlineExceededError,
    InvalidRequestError,
    MalformedMessageError,
    MaxNewTokensError,
    PromptEmptyError,
    PromptTooLongError,
)
from proto.methods import METHODS
from proto.topology import PRIORITIES, Topology, validate_name


def _valid_name(name: str) -> bool:
    try:
        validate_name("name", name)
    except ValueError:
        return False
    return True


def reply_target(topology: Topology, *candidates: str | None) -> str | None:
    """The first candidate that names a reply queue of this namespace, else None.

    Only ``<namespace>.reply.<agent>`` queues are accepted, so a request cannot make
    the broker publish into a group or request queue.
    """
    prefix = topology.namespace + ".reply."
    for name in candidates:
        if name and name.startswith(prefix) and _valid_name(name[len(prefix):]) and len(name) <= 255:
            return name
    return None


def parse_request(body: bytes, limits: ValidationLimits) -> messages_pb2.InferenceRequest:
    """:raises MalformedMessageError: the bytes are not an ``InferenceRequest``."""
    if len(body) > limits.max_body_bytes:
        raise MalformedMessageError(
            f"request of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}; send a shorter prompt"
        )
    request = messages_pb2.InferenceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError) as exc:
        raise MalformedMessageError(
            f"message body is not a valid dinet.v1.InferenceRequest protobuf ({exc}); "
            "publish InferenceRequest.SerializeToString() bytes (the dinet agent does this)"
        ) from None
    return request


def _finite(value: float) -> bool:
    return math.isfinite(value)


def validate_request(
    request: messages_pb2.InferenceRequest,
    limits: ValidationLimits,
    topology: Topology,
    *,
    now: float,
) -> None:
    """Check every field an agent controls; the first problem found is raised.

    :raises proto.errors.DinetError: a typed error whose message says what to fix.
    """
    if not request.request_id or len(request.request_id) > limits.max_request_id_chars:
        raise InvalidRequestError(
            f"request_id must be 1-{limits.max_request_id_chars} characters (a UUID is a good choice)"
        )
    if reply_target(topology, request.reply_to) is None:
        raise InvalidRequestError(
            f"reply_to {request.reply_to!r} is not a reply queue of namespace {topology.namespace!r}; "
            f"use {topology.namespace}.reply.<agent-id>"
        )
    if not request.model or len(request.model) > limits.max_model_chars:
        raise InvalidRequestError(f"model must be a name of 1-{limits.max_model_chars} characters")
    if not request.prompt.strip():
        raise PromptEmptyError("prompt is empty; send at least one non-blank character")
    if len(request.prompt) > limits.max_prompt_chars:
        raise PromptTooLongError(
            f"prompt has {len(request.prompt)} characters, the limit is {limits.max_prompt_chars}; shorten it"
        )
    if not limits.min_new_tokens <= request.max_new_tokens <= limits.max_new_tokens:
        raise MaxNewTokensError(
            f"max_new_tokens={request.max_new_tokens} is outside "
            f"{limits.min_new_tokens}..{limits.max_new_tokens}"
        )
    if not _finite(request.budget) or request.budget < 0:
        raise BudgetInvalidError(f"budget={request.budget} must be a finite number >= 0 (0 = unlimited)")
    if request.priority and request.priority not in PRIORITIES:
        raise InvalidRequestError(
            f"priority {request.priority!r} is unknown; choose one of {', '.join(PRIORITIES)}"
        )
    sampling = request.sampling
    if not _finite(sampling.temperature) or not 0.0 <= sampling.temperature <= limits.max_temperature:
        raise InvalidRequestError(
            f"temperature={sampling.temperature} must be within 0..{limits.max_temperature} (0 = greedy)"
        )
    if not _finite(sampling.top_p) or not 0.0 <= sampling.top_p <= 1.0:
        raise InvalidRequestError(f"top_p={sampling.top_p} must be within 0..1 (0 or 1 disables it)")
    if request.method_hint and request.method_hint not in METHODS:
        raise InvalidRequestError(
            f"method_hint {request.method_hint!r} is unknown; known methods: {', '.join(METHODS)}"
        )
    if request.group_hint and not _valid_name(request.group_hint):
        raise InvalidRequestError(f"group_hint {request.group_hint!r} is not a valid group name")
    if not _finite(request.deadline_unix) or request.deadline_unix < 0:
        raise InvalidRequestError(f"deadline_unix={request.deadline_unix} must be 0 (none) or unix seconds")
    check_deadline(request, now=now)


def check_deadline(request: messages_pb2.InferenceRequest, *, now: float) -> None:
    """:raises DeadlineExceededError: the request's deadline has passed; it must not be computed."""
    if request.deadline_unix and now >= request.deadline_unix:
        raise DeadlineExceededError(
            f"request {request.request_id} missed its deadline by {now - request.deadline_unix:.3f}s "
            "before it was routed; resubmit with a later deadline or a higher priority"
        )
