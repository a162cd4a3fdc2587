from proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model", "start_block", "end_block", "hidden")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_block: int
    end_block: int
    hidden: Tensor
    def __init__(self, model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("address", "session_id", "start_block", "end_block")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    start_block: int
    end_block: int
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ...) -> None: ...

class InferenceStep(_message.Message):
    __slots__ = ("session_id", "model", "start_block", "end_block", "hidden", "position", "max_length", "close", "step_id", "route")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    start_block: int
    end_block: int
    hidden: Tensor
    position: int
    max_length: int
    close: bool
    step_id: int
    route: _containers.RepeatedCompositeFieldContainer[PushTarget]
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., max_length: _Optional[int] = ..., close: _Optional[bool] = ..., step_id: _Optional[int] = ..., route: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ...) -> None: ...

class InferenceStepResult(_message.Message):
    __slots__ = ("hidden", "position", "step_id", "pushed", "push_error", "rejected")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    position: int
    step_id: int
    pushed: bool
    push_error: str
    rejected: str
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., step_id: _Optional[int] = ..., pushed: _Optional[bool] = ..., push_error: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[InferenceStep]
    def __init__(self, steps: _Optional[_Iterable[_Union[InferenceStep, _Mapping]]] = ...) -> None: ...

class BatchStepResult(_message.Message):
    __slots__ = ("session_id", "result", "error_code", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    result: InferenceStepResult
    error_code: int
    error: str
    def __init__(self, session_id: _Optional[str] = ..., result: _Optional[_Union[InferenceStepResult, _Mapping]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StepBatchResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchStepResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchStepResult, _Mapping]]] = ...) -> None: ...

class PushReceipt(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "model", "start_block", "end_block", "num_blocks", "hardware", "throughput_tok_s", "free_cache_bytes", "active_sessions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOK_S_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model: str
    start_block: int
    end_block: int
    num_blocks: int
    hardware: _common_pb2.HardwareProfile
    throughput_tok_s: float
    free_cache_bytes: int
    active_sessions: int
    def __init__(self, node_id: _Optional[str] = ..., model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., hardware: _Optional[_Union[_common_pb2.HardwareProfile, _Mapping]] = ..., throughput_tok_s: _Optional[float] = ..., free_cache_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ...) -> None: ...
