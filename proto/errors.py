"""Typed errors that cross process boundaries as an ``Error`` message with an :class:`ErrorCode`."""

from __future__ import annotations

from proto import common_pb2
from proto.common_pb2 import ErrorCode


class DinetError(Exception):
    """Base class: an error that can be reported to the agent as a typed ``Error``.

    ``recoverable`` tells a caller whether retrying the same request later can succeed.
    """

    code: int = ErrorCode.INTERNAL
    recoverable: bool = False

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def code_name(self) -> str:
        return str(ErrorCode.Name(self.code))  # type: ignore[arg-type]

    def to_proto(self) -> common_pb2.Error:
        return common_pb2.Error(code=self.code, message=str(self))  # type: ignore[arg-type]

    @classmethod
    def from_proto(cls, error: common_pb2.Error) -> DinetError:
        """Rebuild the most specific subclass for the code carried by ``error``."""
        sub: type[DinetError]
        for sub in _all_subclasses(DinetError):
            if getattr(sub, "code", None) == error.code:
                return sub(error.message)
        return DinetError(error.message, code=error.code)

    def __str__(self) -> str:
        return super().__str__()


def _all_subclasses(cls: type[DinetError]) -> list[type[DinetError]]:
    out: list[type[DinetError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


class MalformedMessageError(DinetError):
    code = ErrorCode.MALFORMED_MESSAGE


class InvalidRequestError(DinetError):
    code = ErrorCode.INVALID_REQUEST


class UnknownModelError(DinetError):
    code = ErrorCode.UNKNOWN_MODEL
    recoverable = True  # a node serving the model may join later


class PromptEmptyError(DinetError):
    code = ErrorCode.PROMPT_EMPTY


class PromptTooLongError(DinetError):
    code = ErrorCode.PROMPT_TOO_LONG


class MaxNewTokensError(DinetError):
    code = ErrorCode.MAX_NEW_TOKENS_OUT_OF_RANGE


class BudgetInvalidError(DinetError):
    code = ErrorCode.BUDGET_INVALID


class BudgetTooLowError(DinetError):
    code = ErrorCode.BUDGET_TOO_LOW


class DeadlineExceededError(DinetError):
    code = ErrorCode.DEADLINE_EXCEEDED


class NoRouteError(DinetError):
    """Some blocks of the model are served by no live peer."""

    code = ErrorCode.NO_ROUTE
    recoverable = True

    def __init__(self, message: str, *, missing_blocks: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing_blocks = list(missing_blocks or [])


class NodeFailureError(DinetError):
    code = ErrorCode.NODE_FAILURE
    recoverable = True


class DeliveryLimitError(DinetError):
    code = ErrorCode.DELIVERY_LIMIT
