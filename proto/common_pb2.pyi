from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    MALFORMED_MESSAGE: _ClassVar[ErrorCode]
    INVALID_REQUEST: _ClassVar[ErrorCode]
    UNKNOWN_MODEL: _ClassVar[ErrorCode]
    PROMPT_EMPTY: _ClassVar[ErrorCode]
    PROMPT_TOO_LONG: _ClassVar[ErrorCode]
    MAX_NEW_TOKENS_OUT_OF_RANGE: _ClassVar[ErrorCode]
    BUDGET_INVALID: _ClassVar[ErrorCode]
    BUDGET_TOO_LOW: _ClassVar[ErrorCode]
    DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    NO_ROUTE: _ClassVar[ErrorCode]
    NODE_FAILURE: _ClassVar[ErrorCode]
    DELIVERY_LIMIT: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
MALFORMED_MESSAGE: ErrorCode
INVALID_REQUEST: ErrorCode
UNKNOWN_MODEL: ErrorCode
PROMPT_EMPTY: ErrorCode
PROMPT_TOO_LONG: ErrorCode
MAX_NEW_TOKENS_OUT_OF_RANGE: ErrorCode
BUDGET_INVALID: ErrorCode
BUDGET_TOO_LOW: ErrorCode
DEADLINE_EXCEEDED: ErrorCode
NO_ROUTE: ErrorCode
NODE_FAILURE: ErrorCode
DELIVERY_LIMIT: ErrorCode
INTERNAL: ErrorCode

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class HardwareProfile(_message.Message):
    __slots__ = ("cpu_cores", "ram_gb", "accelerator", "gflops", "mem_bandwidth_gbs", "net_rtt_ms", "weight_format", "threads", "price_per_hour", "description")
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    RAM_GB_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEM_BANDWIDTH_GBS_FIELD_NUMBER: _ClassVar[int]
    NET_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    cpu_cores: int
    ram_gb: float
    accelerator: str
    gflops: float
    mem_bandwidth_gbs: float
    net_rtt_ms: float
    weight_format: str
    threads: int
    price_per_hour: float
    description: str
    def __init__(self, cpu_cores: _Optional[int] = ..., ram_gb: _Optional[float] = ..., accelerator: _Optional[str] = ..., gflops: _Optional[float] = ..., mem_bandwidth_gbs: _Optional[float] = ..., net_rtt_ms: _Optional[float] = ..., weight_format: _Optional[str] = ..., threads: _Optional[int] = ..., price_per_hour: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...
