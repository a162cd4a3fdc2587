"""Route search: which peers, in which order, carry a request through all blocks.

Pure logic over :class:`~proto.records.BlockRecord` s (no I/O), so it is tested without
a network. A route is a list of :class:`Hop` s whose block ranges tile ``[start, end)``.
:func:`find_route` runs Dijkstra over block boundaries; the edge "peer ``s`` computes
blocks ``i..j-1``" costs its expected per-token latency:

    rtt(s) + hop_overhead + (j - i) / blocks(s) * 1000 / throughput(s) * (1 + load(s)) * jitter

``jitter`` is a random factor in ``[1, 1 + spread]`` drawn per peer and per search,
so replicas of the same span with similar costs share requests instead of the fastest
one taking them all, while a clearly faster or less loaded peer still wins. A peer only
hands over to another at a block where some peer's range starts or ends (cost is linear
in between), so the search stays small. Blocks no live peer covers raise :class:`NoRouteError`
naming them.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proto.errors import NoRouteError
from proto.records import BlockRecord


@dataclass(frozen=True)
class Hop:
    """One peer of a route and the blocks it computes for it."""

    peer_id: str
    address: str  # host:port of its BlockService
    start: int
    end: int


@dataclass(frozen=True)
class RouteCosts:
    """Knobs of the latency model (milliseconds)."""

    default_rtt_ms: float = 2.0  # a peer whose RTT was not measured
    hop_overhead_ms: float = 0.5  # serialisation + scheduling per hop, on top of the RTT
    unknown_block_ms: float = 20.0  # per block, for a peer that announced no throughput
    spread: float = 0.15  # jitter that spreads load across similar replicas


def missing_blocks(servers: Iterable[BlockRecord], start: int, end: int) -> list[int]:
    covered: set[int] = set()
    for s in servers:
        covered.update(range(max(s.start_block, start), min(s.end_block, end)))
    return [b for b in range(start, end) if b not in covered]


def find_route(
    servers: Iterable[BlockRecord],
    *,
    start: int,
    end: int,
    model: str = "",
    rtt_ms: Mapping[str, float] | None = None,
    exclude: Iterable[str] = (),
    costs: RouteCosts | None = None,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest chain of peers covering blocks ``start..end-1``.

    :param servers: live block records (one per peer; duplicates of a peer are merged by peer id).
    :param rtt_ms: measured round-trip times by peer id.
    :param exclude: peer ids not to use (failed during this request).
    :raises NoRouteError: naming the blocks no usable peer serves.
    """
    costs = costs or RouteCosts()
    rng = rng or random.Random()
    rtt_ms = rtt_ms or {}
    banned = set(exclude)
    peers: dict[str, BlockRecord] = {}
    for s in servers:
        if s.peer_id not in banned and s.start_block < end and s.end_block > start:
            peers[s.peer_id] = s
    candidates = sorted(peers.values(), key=lambda s: s.peer_id)
    gaps = missing_blocks(candidates, start, end)
    if gaps:
        raise NoRouteError(_no_route_message(model, gaps), missing_blocks=gaps)

    per_block = {s.peer_id: _per_block_ms(s, costs) * (1.0 + rng.random() * costs.spread) for s in candidates}
    edges = [max(s.start_block, start) for s in candidates] + [min(s.end_block, end) for s in candidates]
    boundaries = sorted({start, end, *edges})
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, BlockRecord]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, here = heapq.heappop(queue)
        if here == end:
            break
        if cost > best.get(here, float("inf")):
            continue
        for s in candidates:
            if not s.start_block <= here < s.end_block:
                continue
            stop = min(s.end_block, end)
            fixed = rtt_ms.get(s.peer_id, costs.default_rtt_ms) + costs.hop_overhead_ms
            for there in (b for b in boundaries if here < b <= stop):
                total = cost + fixed + (there - here) * per_block[s.peer_id]
                if total < best.get(there, float("inf")):
                    best[there] = total
                    came_from[there] = (here, s)
                    heapq.heappush(queue, (total, there))
    hops: list[Hop] = []
    at = end
    while at != start:
        prev, s = came_from[at]
        hops.append(Hop(peer_id=s.peer_id, address=s.address, start=prev, end=at))
        at = prev
    return _merge(hops[::-1])


def _per_block_ms(s: BlockRecord, costs: RouteCosts) -> float:
    if s.throughput_tok_s <= 0:
        base = costs.unknown_block_ms
    else:
        base = 1000.0 / s.throughput_tok_s / max(s.end_block - s.start_block, 1)
    return base * (1.0 + s.load)


def _merge(hops: list[Hop]) -> list[Hop]:
    """Join consecutive hops on the same peer (a boundary split that gained nothing)."""
    out: list[Hop] = []
    for hop in hops:
        if out and out[-1].peer_id == hop.peer_id and out[-1].end == hop.start:
            out[-1] = Hop(hop.peer_id, hop.address, out[-1].start, hop.end)
        else:
            out.append(hop)
    return out


def _no_route_message(model: str, gaps: list[int]) -> str:
    spans = _spans(gaps)
    where = f" of model {model!r}" if model else ""
    return (
        f"no live peer serves blocks {', '.join(spans)}{where}; start a node for them "
        f"(dinet-node run --model ... --blocks {spans[0]}) or retry when peers rejoin"
    )


def _spans(blocks: list[int]) -> list[str]:
    """[3, 4, 5, 9] -> ['3:6', '9:10']"""
    out: list[str] = []
    begin = prev = blocks[0]
    for b in blocks[1:]:
        if b != prev + 1:
            out.append(f"{begin}:{prev + 1}")
            begin = b
        prev = b
    out.append(f"{begin}:{prev + 1}")
    return out
