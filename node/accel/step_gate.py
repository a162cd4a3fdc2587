"""The driver-wide side of batched steps: when a flush may go at once, and how it splits into pipeline groups.

Split from :mod:`node.accel.batch_link`, which keeps one hop's ``InferenceBatch`` stream (queueing,
writing, reading, failing). What is here spans all hops of a driver: :class:`StepGate` counts the
driver's batched sessions and how many of them wait, so every link can send as soon as no further
step can arrive, and :func:`split_groups` cuts a flush into groups that keep every hop of the chain
busy. Both are pure bookkeeping, called from the links on every step, and take no await.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeVar

T = TypeVar("T")


class GatedLink(Protocol):
    """What the gate needs of a link (:class:`node.accel.batch_link.BatchLink`)."""

    @property
    def queued(self) -> bool: ...  # steps are waiting to be sent

    def flush(self) -> None: ...  # send them now (the link may still hold a straggler group back)


class StepGate:
    """Counts a driver's batched sessions and how many of them are waiting (parked) right now.

    When all are parked, no further step can arrive before some reply does, so links flush at once.
    """

    def __init__(self) -> None:
        self.open = 0
        self.parked = 0
        self.depth = 1  # hops in the chain: how many groups of sessions can be in flight at once
        self.messages_in_flight = 0  # sent on any link, not answered yet: the groups elsewhere in the chain
        self.links: list[GatedLink] = []
        self._scheduled = False

    def session_opened(self) -> None:
        self.open += 1

    def session_closed(self) -> None:
        self.open -= 1
        self.maybe_flush()

    def park(self) -> None:
        self.parked += 1
        self.maybe_flush()

    def unpark(self) -> None:
        self.parked -= 1

    @property
    def all_parked(self) -> bool:
        return self.parked >= self.open

    def maybe_flush(self) -> None:
        if self.all_parked and not self._scheduled and any(link.queued for link in self.links):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.all_parked:
            for link in self.links:
                link.flush()


def split_groups(entries: list[T], sessions: int, depth: int) -> list[list[T]]:
    """Split a flush of more than one pipeline group's share into groups of at most that share.

    With ``depth`` hops, ``depth`` groups of ``sessions / depth`` sessions keep every hop busy (one
    group per hop), while one group of all sessions leaves all but one hop idle at any time. The
    hop runs a stream's messages one after another, so the first group goes on to the next hop
    while the hop computes the second. A group at its share is never split again, so once split
    the groups stay apart.
    """
    share = max(1, -(-sessions // max(1, depth)))  # ceil
    if len(entries) <= share:
        return [entries]
    count = -(-len(entries) // share)
    size, extra = divmod(len(entries), count)
    groups, begin = [], 0
    for g in range(count):
        end = begin + size + (1 if g < extra else 0)
        groups.append(entries[begin:end])
        begin = end
    return groups
