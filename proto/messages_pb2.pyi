from proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "has_seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    has_seed: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "max_new_tokens", "sampling", "priority", "budget", "reply_to", "deadline_unix", "submitted_at", "agent_id", "method_hint", "group_hint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_HINT_FIELD_NUMBER: _ClassVar[int]
    GROUP_HINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    priority: str
    budget: float
    reply_to: str
    deadline_unix: float
    submitted_at: float
    agent_id: str
    method_hint: str
    group_hint: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[str] = ..., budget: _Optional[float] = ..., reply_to: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., submitted_at: _Optional[float] = ..., agent_id: _Optional[str] = ..., method_hint: _Optional[str] = ..., group_hint: _Optional[str] = ...) -> None: ...

class RoutingDecision(_message.Message):
    __slots__ = ("method", "group", "scheduler", "model_version", "predicted_tokens_per_s", "predicted_cost", "reputations", "exploration", "broker_id", "routed_at", "sched_ms")
    class ReputationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COST_FIELD_NUMBER: _ClassVar[int]
    REPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    BROKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTED_AT_FIELD_NUMBER: _ClassVar[int]
    SCHED_MS_FIELD_NUMBER: _ClassVar[int]
    method: str
    group: str
    scheduler: str
    model_version: str
    predicted_tokens_per_s: float
    predicted_cost: float
    reputations: _containers.ScalarMap[str, float]
    exploration: bool
    broker_id: str
    routed_at: float
    sched_ms: float
    def __init__(self, method: _Optional[str] = ..., group: _Optional[str] = ..., scheduler: _Optional[str] = ..., model_version: _Optional[str] = ..., predicted_tokens_per_s: _Optional[float] = ..., predicted_cost: _Optional[float] = ..., reputations: _Optional[_Mapping[str, float]] = ..., exploration: _Optional[bool] = ..., broker_id: _Optional[str] = ..., routed_at: _Optional[float] = ..., sched_ms: _Optional[float] = ...) -> None: ...

class RoutedTask(_message.Message):
    __slots__ = ("request", "decision")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    request: InferenceRequest
    decision: RoutingDecision
    def __init__(self, request: _Optional[_Union[InferenceRequest, _Mapping]] = ..., decision: _Optional[_Union[RoutingDecision, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("request_id", "index", "token_ids", "text", "node_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    node_id: str
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("prompt_tokens", "new_tokens", "ttft_s", "total_s", "tokens_per_s", "queue_s")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    tokens_per_s: float
    queue_s: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., queue_s: _Optional[float] = ...) -> None: ...

class InferenceResult(_message.Message):
    __slots__ = ("request_id", "ok", "error", "token_ids", "text", "timing", "node_id", "group", "method", "finish_reason", "signer_key", "signature")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ok: bool
    error: _common_pb2.Error
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    timing: Timing
    node_id: str
    group: str
    method: str
    finish_reason: str
    signer_key: bytes
    signature: bytes
    def __init__(self, request_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., node_id: _Optional[str] = ..., group: _Optional[str] = ..., method: _Optional[str] = ..., finish_reason: _Optional[str] = ..., signer_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TimingReport(_message.Message):
    __slots__ = ("request_id", "node_id", "group", "model", "method", "ok", "error_code", "timing", "max_new_tokens", "shared_prefix_ratio", "concurrency_at_arrival", "task_text", "hardware", "decision", "finished_at", "broker_reported")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIX_RATIO_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_AT_ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    TASK_TEXT_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    BROKER_REPORTED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    node_id: str
    group: str
    model: str
    method: str
    ok: bool
    error_code: _common_pb2.ErrorCode
    timing: Timing
    max_new_tokens: int
    shared_prefix_ratio: float
    concurrency_at_arrival: int
    task_text: str
    hardware: _common_pb2.HardwareProfile
    decision: RoutingDecision
    finished_at: float
    broker_reported: str
    def __init__(self, request_id: _Optional[str] = ..., node_id: _Optional[str] = ..., group: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., ok: _Optional[bool] = ..., error_code: _Optional[_Union[_common_pb2.ErrorCode, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., shared_prefix_ratio: _Optional[float] = ..., concurrency_at_arrival: _Optional[int] = ..., task_text: _Optional[str] = ..., hardware: _Optional[_Union[_common_pb2.HardwareProfile, _Mapping]] = ..., decision: _Optional[_Union[RoutingDecision, _Mapping]] = ..., finished_at: _Optional[float] = ..., broker_reported: _Optional[str] = ...) -> None: ...

class OutcomeReport(_message.Message):
    __slots__ = ("request_id", "node_id", "group", "answered", "ok", "error_code", "deadline_passed", "ttft_s", "total_s", "tokens_per_s", "new_tokens", "observed_at", "agent_id", "signer_key", "signature", "answer_digest")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_PASSED_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    node_id: str
    group: str
    answered: bool
    ok: bool
    error_code: _common_pb2.ErrorCode
    deadline_passed: bool
    ttft_s: float
    total_s: float
    tokens_per_s: float
    new_tokens: int
    observed_at: float
    agent_id: str
    signer_key: bytes
    signature: bytes
    answer_digest: bytes
    def __init__(self, request_id: _Optional[str] = ..., node_id: _Optional[str] = ..., group: _Optional[str] = ..., answered: _Optional[bool] = ..., ok: _Optional[bool] = ..., error_code: _Optional[_Union[_common_pb2.ErrorCode, str]] = ..., deadline_passed: _Optional[bool] = ..., ttft_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., new_tokens: _Optional[int] = ..., observed_at: _Optional[float] = ..., agent_id: _Optional[str] = ..., signer_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., answer_digest: _Optional[bytes] = ...) -> None: ...

class RoutingRecord(_message.Message):
    __slots__ = ("request_id", "agent_id", "model", "decision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    agent_id: str
    model: str
    decision: RoutingDecision
    def __init__(self, request_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., model: _Optional[str] = ..., decision: _Optional[_Union[RoutingDecision, _Mapping]] = ...) -> None: ...

class RoutingRecordBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[RoutingRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[RoutingRecord, _Mapping]]] = ...) -> None: ...
