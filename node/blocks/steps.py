"""One step of an open session: order it, compute it, push it on, answer the driver.

A step reaches a session from its driver (``Inference``) or from the previous hop
(``Push``); either way the same rules apply, here:

- **Order.** Steps are numbered by the driver; a session applies each ``step_id`` at most
  once, in increasing order, so a stale push (the driver already carried the step itself
  after a failure) or a cycle is dropped rather than recomputed. A ``position`` below
  the cache length rolls the cache back first (replays, speculative rejections).
- **Where it computes.** A decode step (at most ``ServerLimits.inline_tokens`` tokens)
  computes inline on the event loop: it takes milliseconds, and a thread hand-off each
  way is most of what a hop costs on loopback. Larger steps run on one dedicated thread,
  so the loop keeps serving other streams meanwhile and no two steps touch the modules
  at once.
- **Push on.** With a ``route`` the output goes first into ``route[0]``'s session over a
  ``Push`` stream (:mod:`node.blocks.push`), which is the critical path, and only then to
  the driver, who keeps it for replays.

Kept apart from the servicer (:mod:`node.blocks.server`), which owns the streams and
their status codes, as Petals keeps ``block_functions.iterate_rpc_inference`` apart from
its handler. The decode path here adds no await, copy or thread hop to the compute.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from node.blocks.block_functions import BlockSpan, run_span
from node.blocks.kv_cache import CacheManager, SessionCache
from node.blocks.peer_input import InputChecks, StepError, check_position
from node.blocks.push import PushChannels, PushError, PushPolicy, PushTarget, RouteError, parse_route
from node.blocks.sessions import LiveSession
from proto import blocks_pb2
from proto.codec import encode_tensor


class StepRunner:
    """Applies steps to the sessions of one :class:`BlockSpan`; owns the compute thread and the push links' channels."""

    def __init__(
        self,
        span: BlockSpan,
        caches: CacheManager,
        inputs: InputChecks,
        *,
        inline_tokens: int,
        push_policy: PushPolicy,
        push_channels: PushChannels,
    ) -> None:
        self.span = span
        self.caches = caches
        self.inputs = inputs
        self.inline_tokens = inline_tokens  # steps of at most this many tokens (batch x tokens) compute inline
        self.push_policy = push_policy
        self.push_channels = push_channels
        self.num_blocks = int(span.config.num_hidden_layers)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocks-compute")

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def run(
        self, hidden: torch.Tensor, *, start: int, end: int, position: int, cache: SessionCache | None
    ) -> torch.Tensor:
        """Blocks ``start..end-1`` on ``hidden``: inline for a decode step, else on the compute thread."""
        if hidden.shape[0] * hidden.shape[1] <= self.inline_tokens:
            # a decode step takes milliseconds: computing it right here saves two thread hand-offs per
            # token, which is most of what a hop costs on loopback
            return run_span(self.span, hidden, position=position, cache=cache, start=start, end=end)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._compute, lambda: run_span(self.span, hidden, position=position, cache=cache, start=start, end=end)
        )

    async def apply(self, live: LiveSession, step: blocks_pb2.InferenceStep, *, pushed: bool) -> None:
        """Apply one step (from the driver, or ``pushed`` by the previous hop), push it on, answer the driver.

        The caller holds ``live.lock``. :raises StepError: for a step this session cannot apply.
        """
        if self.caches.get(live.session_id) is None:
            raise StepError(grpc.StatusCode.ABORTED, f"session {live.session_id} expired; replay it")
        if (pushed or step.route) and not step.step_id:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "pushed steps and steps with a route need a step_id")
        if step.step_id and step.step_id <= live.last_step:
            if pushed:  # stale: the driver carried this step itself after a failure (or a cycle came back)
                return
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"step_id {step.step_id} after {live.last_step}: step ids must increase")
        hidden = self.inputs.decode_hidden(step.hidden, batch=live.cache.spec.batch)
        check_position(live.cache, step.position, hidden.shape[1])
        try:
            route = parse_route(step.route, after=live.end, num_blocks=self.num_blocks) if step.route else ()
        except RouteError as exc:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        out = await self.run(hidden, start=live.start, end=live.end, position=step.position, cache=live.cache)
        if step.step_id:
            live.last_step = step.step_id
        result = blocks_pb2.InferenceStepResult(hidden=encode_tensor(out), position=live.cache.length,
                                                step_id=step.step_id)
        if route:  # the next hop first: it is the critical path; the driver's copy is for replays
            try:
                await self._push(live, route[0], step, result.hidden)
                result.pushed = True
            except PushError as exc:
                result.push_error = str(exc)
        await self.answer(live, result)

    async def _push(
        self, live: LiveSession, target: PushTarget, step: blocks_pb2.InferenceStep, hidden: blocks_pb2.Tensor
    ) -> None:
        model_name = self.inputs.model_name
        if live.link is None or live.link.target != target:
            if not await self.push_policy.allows(model_name, target):
                raise PushError(f"{target.address} is not a peer this node knows to serve blocks "
                                f"{target.start}:{target.end} of {model_name!r}")
            if live.link is not None:
                live.link.abort()
            live.link = self.push_channels.link(target)
        await live.link.send(blocks_pb2.InferenceStep(
            session_id=target.session_id, hidden=hidden, position=step.position, step_id=step.step_id,
            route=step.route[1:],
        ))

    @staticmethod
    async def answer(live: LiveSession, result: blocks_pb2.InferenceStepResult) -> None:
        """Write ``result`` to the session's driver stream."""
        await live.context.write(result)
