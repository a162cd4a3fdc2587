"""Where a driver's chain sessions come from: the route, the channels and batch links, the prefix answer.

Split from :mod:`node.accel.chain` along the line between the connections and the request: a
:class:`ChainOpener` owns everything that outlives one request (the gRPC channels it opened, one
:class:`~node.accel.batch_link.BatchLink` per hop and the driver's :class:`~node.accel.batch_link.StepGate`)
and opens a :class:`~node.accel.chain_session.ChainSession` on the current route, asking each hop
which prompt prefix it already holds. :class:`~node.accel.chain.AccelChain` keeps the method logic
(prefill, decoding, speculation) and what to do when a hop fails. Nothing here runs per token:
opening happens once per request and again only after a change of route.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from node.accel.batch_link import BatchLink, StepGate
from node.accel.chain_session import ChainSession, Hop, HopError, LogitsBatcher, SwarmTokenError
from node.accel.session_metadata import MD_METHOD, MD_PREFIX_BLOCK, MD_PREFIX_HASHES, MD_PREFIX_HIT
from node.blocks.access import PeerChannels, SwarmAccess
from proto import blocks_pb2_grpc
from proto.methods import AccelerationMethod

RouteFn = Callable[[], Awaitable[list[Hop]]]
StubFn = Callable[[str], blocks_pb2_grpc.BlockServiceStub]


def check_cover(hops: list[Hop], num_layers: int) -> None:
    """Refuse a chain that does not run blocks ``0:num_layers`` exactly once, in order (ValueError)."""
    expected = 0
    for hop in hops:
        if hop.start != expected:
            raise ValueError(f"hops must cover blocks 0:{num_layers} in order; gap or overlap at {expected}")
        expected = hop.end
    if expected != num_layers:
        raise ValueError(f"hops end at block {expected}, the model has {num_layers}")


class ChainOpener:
    """Opens sessions on the driver's current route over the channels and batch links it keeps."""

    def __init__(
        self,
        *,
        model_name: str,
        num_layers: int,
        route: RouteFn,
        logits: LogitsBatcher,
        access: SwarmAccess,
        stub_for: StubFn | None,
        max_message_bytes: int,
        prefix_block_tokens: int,
        prefix_answer_s: float,
        step_timeout_s: float,
        batched_steps: bool,
        pipeline_groups: int,
    ) -> None:
        """The arguments are :class:`~node.accel.chain.AccelChain`'s of the same names (documented there)."""
        self.model_name = model_name
        self.num_layers = num_layers
        self.route = route
        self.logits = logits
        self.prefix_block_tokens = prefix_block_tokens
        self.prefix_answer_s = prefix_answer_s  # how long a hop may take to say which prefix it holds
        self.step_timeout_s = step_timeout_s
        self._stub_for = stub_for
        self._peers = PeerChannels(access, [("grpc.max_send_message_length", max_message_bytes),
                                            ("grpc.max_receive_message_length", max_message_bytes)])
        # continuous batching: one InferenceBatch stream per hop carries all sessions' steps (batch_link.py)
        self.batched_steps = batched_steps
        if pipeline_groups < 0:
            raise ValueError("pipeline_groups must be >= 0 (0 = one group per hop)")
        self.pipeline_groups = pipeline_groups  # groups a hop's batched sessions are split into; 0 = one per hop
        self.gate = StepGate()
        self.links: dict[Hop, BatchLink] = {}

    def stub(self, address: str) -> blocks_pb2_grpc.BlockServiceStub:
        return self._stub_for(address) if self._stub_for is not None else self._peers.stub(address)

    def _link(self, hop: Hop) -> BatchLink:
        link = self.links.get(hop)
        if link is None:
            stub = self.stub(hop.address)
            link = BatchLink(hop, stub.InferenceBatch, self.gate, timeout_s=self.step_timeout_s)
            self.links[hop] = link
        return link

    async def open(self, method: AccelerationMethod, hashes: list[str], max_length: int) -> tuple[ChainSession, int]:
        """Open a session on the current route; returns it and the prefix length every hop holds."""
        hops = await self.route()
        check_cover(hops, self.num_layers)
        metadata: list[tuple[str, str]] = [(MD_METHOD, method.name)]
        if hashes:
            metadata += [(MD_PREFIX_BLOCK, str(self.prefix_block_tokens)), (MD_PREFIX_HASHES, ",".join(hashes))]
        links: list[tuple[BatchLink, int] | None] = [None] * len(hops)
        if self.batched_steps and method.continuous_batching and not hashes:
            self.gate.depth = self.pipeline_groups or len(hops)
            for i, hop in enumerate(hops):
                link = self._link(hop)
                if not link.unsupported:  # a plain block server: per-session stream below
                    links[i] = (link, link.ensure_open())
        calls = [
            None if link is not None else self.stub(hop.address).Inference(metadata=tuple(metadata))
            for hop, link in zip(hops, links, strict=True)
        ]
        hit = len(hashes) * self.prefix_block_tokens
        for hop, call in zip(hops, calls, strict=True):
            if not hashes or call is None:  # (batch links carry no prefix hashes)
                break  # nothing to ask: plain servers send no metadata before their first reply
            try:
                answer = dict(await asyncio.wait_for(call.initial_metadata(), self.prefix_answer_s) or ())
            except TimeoutError:  # a plain block server: it holds no prefixes
                answer = {}
            except grpc.aio.AioRpcError as exc:
                for c in calls:
                    if c is not None:
                        c.cancel()
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise SwarmTokenError(hop, exc.details()) from None
                raise HopError(hop, f"{exc.code().name}: {exc.details()}", retryable=True) from None
            hit = min(hit, int(str(answer.get(MD_PREFIX_HIT, "0")) or 0))
        session = ChainSession(self.model_name, hops, calls, max_length, self.step_timeout_s, self.logits,
                               links=links, gate=self.gate)
        return session, hit

    async def close_links(self) -> None:
        """End every batched stream (their sessions' steps fail); the next batched session opens new ones."""
        links, self.links = list(self.links.values()), {}
        self.gate.links.clear()
        for link in links:
            await link.close()

    async def close_channels(self) -> None:
        """Close the channels this opener opened itself (not those of ``stub_for``'s owner)."""
        await self._peers.close()
