"""What both ends of a block hop agree on: message bounds and gRPC channel/server options.

The server (:mod:`node.blocks.server`, which re-exports :class:`ServerLimits` and
:func:`grpc_options`) sizes its gRPC maximum from :class:`ServerLimits`, and the driver's
channels (:mod:`node.blocks.remote`) use the same :func:`grpc_options`; they live here so
that a client does not import the servicer to learn them.
"""

from __future__ import annotations

from dataclasses import dataclass

MESSAGE_ENVELOPE_BYTES = 64 * 1024  # protobuf fields around the one tensor of a message


@dataclass(frozen=True)
class ServerLimits:
    """Hard bounds on what one peer may ask of this node."""

    max_batch: int = 8  # sequences per session
    max_length: int = 2048  # tokens per session (also capped by the model's max positions)
    max_sessions: int = 256  # open sessions, all peers together
    max_sessions_per_peer: int = 64  # open sessions from one peer host (one stranger cannot take them all)
    inline_tokens: int = 4  # steps of at most this many tokens compute on the event loop (no thread hand-off)
    push_timeout_s: float = 5.0  # a push to the next hop must be handed to the transport within this

    def max_tensor_bytes(self, hidden_size: int) -> int:
        return self.max_batch * self.max_length * hidden_size * 4  # fp32 is the widest dtype accepted

    def max_message_bytes(self, hidden_size: int) -> int:
        return self.max_tensor_bytes(hidden_size) + MESSAGE_ENVELOPE_BYTES


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by both ends: deliberate message bounds, keepalive for dead peers."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
