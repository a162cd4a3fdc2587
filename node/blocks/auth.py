"""A shared swarm token on every gRPC call between block servers and drivers.

A private swarm sets one secret (``--swarm-token`` or ``DINET_SWARM_TOKEN``); every call
then carries it as ``dinet-swarm-token`` metadata (:func:`call_metadata`, on every
call a node or driver makes, pushes included) and a server rejects calls
without the right one with UNAUTHENTICATED before any handler runs
(:class:`SwarmTokenServerInterceptor`, compared in constant time). It keeps strangers out
of a swarm, it is not an identity: anyone with the token is a member. Without TLS the
token crosses the network in clear text, so use it on trusted networks or with TLS.
An empty token means an open swarm, the default.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

SWARM_TOKEN_HEADER = "dinet-swarm-token"
SWARM_TOKEN_ENV = "DINET_SWARM_TOKEN"
MAX_TOKEN = 256


def check_swarm_token(token: str) -> str:
    """A token must be printable ASCII without spaces (it travels as gRPC metadata).

    :raises ValueError: naming the rule it breaks.
    """
    if len(token) > MAX_TOKEN or not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"a swarm token is at most {MAX_TOKEN} printable ASCII characters without spaces")
    return token


def swarm_token_from_env(explicit: str | None = None) -> str:
    """``explicit`` (a flag) when given, else ``DINET_SWARM_TOKEN``, else "" (open swarm).

    An explicit empty token is refused rather than read as "open swarm": ``--swarm-token "$UNSET_VAR"``
    would otherwise start a node that its operator believes private, open to anyone.

    :raises ValueError: for an empty flag or a malformed token (never quoting it).
    """
    if explicit is not None and not explicit:
        raise ValueError(f"--swarm-token is empty; give the swarm's token, or leave the flag out (and "
                         f"${SWARM_TOKEN_ENV} unset) for an open swarm")
    return check_swarm_token(explicit if explicit is not None else os.environ.get(SWARM_TOKEN_ENV, ""))


def add_swarm_token_argument(parser: argparse.ArgumentParser | Any) -> None:
    """``--swarm-token`` (a parser or an argument group), the same on every CLI that serves or drives blocks."""
    parser.add_argument("--swarm-token", default=None,
                        help=f"shared secret every gRPC call of the block swarm must carry (default: "
                        f"${SWARM_TOKEN_ENV}; unset = open swarm; prefer the variable, a flag shows in ps)")


class SwarmTokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose ``dinet-swarm-token`` is not the swarm's."""

    def __init__(self, token: str) -> None:
        self._token = check_swarm_token(token).encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        given = dict(handler_call_details.invocation_metadata or ()).get(SWARM_TOKEN_HEADER, "")  # type: ignore[attr-defined]
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        handler = await continuation(handler_call_details)
        if hmac.compare_digest(given_bytes, self._token) or handler is None:
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {SWARM_TOKEN_HEADER} for this swarm")

    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata for every call this side makes (empty for an open swarm).

    Passed per call rather than by a channel interceptor: grpc.aio's interceptors do not
    support the write/read style of the ``Inference`` and ``Push`` streams.
    """
    return ((SWARM_TOKEN_HEADER, check_swarm_token(token)),) if token else ()


class TokenStub:
    """A ``BlockServiceStub`` whose every call carries the swarm token, whatever metadata its caller passes.

    Built by :meth:`node.blocks.access.SwarmAccess.stub` for every client in ``node/``, so callers
    (node/accel's chain driver among them) pass only their own metadata and know nothing of the
    token. The token is added once; a caller that already sends it is left alone.
    """

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self._header = call_metadata(token)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        rpc = getattr(self._stub, name)

        def call(*args: Any, metadata: Any = None, **kwargs: Any) -> Any:
            given = tuple(metadata or ())
            if not any(key == SWARM_TOKEN_HEADER for key, _ in given):
                given += self._header
            return rpc(*args, metadata=given, **kwargs)

        return call


def server_interceptors(token: str) -> list[grpc.aio.ServerInterceptor] | None:
    return [SwarmTokenServerInterceptor(token)] if token else None
