"""How one cell of the methods benchmark is measured: concurrent requests, two phases, no cap deciding a winner.

A cell starts ``concurrency`` requests at once and records the time of every token of every request.

- **Prefill phase**: until every request has its first token. Always run to the end (a safety cap,
  ``safety_s``, only guards against a hang; a cell that hits it is marked ``capped`` and a full run
  must show none). TTFT is the mean time to first token; ``prefill_s`` the time until the last one.
- **Decode phase**: from the moment every request has its first token, for up to ``window_s``
  (or until every request finished, whichever comes first). ``decode_tps`` = tokens produced in
  that window / its length: a steady-state rate with every request in flight, independent of how
  long the prefill took.

When every request finished within the window, throughput (all tokens / elapsed) and p99
latency are measured exactly (``complete``). Otherwise (``complete`` false) the cell's end is
projected: throughput assumes the window's aggregate rate ``decode_tps`` holds for the remaining
tokens, and p99 latency projects each unfinished request at its own rate in the window. The
projection ignores that batching methods batch fewer sessions once some requests have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from node.accel.chain import AccelChain
from node.engine import GenerationRequest


@dataclass
class CellResult:
    throughput: float  # generated tokens per second, all requests together, prefill included
    ttft_s: float  # mean time to first token
    prefill_s: float  # time until every request had its first token
    decode_tps: float  # tokens per second in the decode window (every request past its first token)
    decode_window_s: float  # length of that window
    p99_latency_s: float  # 99th percentile request latency (projected when not complete)
    tokens: int  # tokens actually produced
    elapsed_s: float  # wall time of the cell (when complete) or projected end of its last request
    complete: bool  # every request finished in the measured time: nothing projected
    capped: bool  # the safety cap ended the prefill phase (a hang; the cell's figures are not trustworthy)


def summarise(stamps: list[list[float]], max_new: int, window_end: float, capped: bool) -> CellResult:
    """Figures of a cell from each request's token times (seconds since the cell began).

    ``window_end``: when measurement stopped. A request with fewer than ``max_new`` stamps was still
    running then (requests here never stop early: no end-of-sequence token is set).
    """
    firsts = [s[0] for s in stamps if s]
    all_first = max(firsts) if len(firsts) == len(stamps) else window_end
    window = max(0.0, window_end - all_first)
    in_window = [sum(1 for t in s[1:] if all_first < t <= window_end) for s in stamps]
    decode_tps = sum(in_window) / window if window > 0 else 0.0
    done = [len(s) >= max_new for s in stamps]
    complete = all(done)
    fallback = decode_tps / max(1, sum(1 for d in done if not d))  # a request that got nothing in the window
    ends: list[float] = []
    for s, finished, own in zip(stamps, done, in_window, strict=True):
        if finished:
            ends.append(s[-1])
            continue
        rate = own / window if own > 0 and window > 0 else fallback
        ends.append(window_end + (max_new - len(s)) / rate if rate > 0 else math.inf)
    total = max_new * len(stamps)
    produced = sum(len(s) for s in stamps)
    if complete:
        elapsed = max(ends) if ends else window_end
    else:  # the aggregate rate is steadier than each request's own (speculative steps come in bursts)
        elapsed = window_end + (total - produced) / decode_tps if decode_tps > 0 else math.inf
    ordered = sorted(ends)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return CellResult(
        throughput=total / elapsed if 0 < elapsed < math.inf else 0.0,
        ttft_s=sum(firsts) / len(firsts) if firsts else window_end,
        prefill_s=all_first,
        decode_tps=decode_tps,
        decode_window_s=window,
        p99_latency_s=p99,
        tokens=produced,
        elapsed_s=elapsed,
        complete=complete,
        capped=capped,
    )


async def run_requests(chain: AccelChain, prompts: list[list[int]], method: str, max_new: int, *,
                       window_s: float, safety_s: float) -> CellResult:
    """Run ``prompts`` concurrently with ``method``; see the module docstring for what is measured."""
    begin = time.perf_counter()
    stamps: list[list[float]] = [[] for _ in prompts]
    all_first = asyncio.Event()
    waiting_first = [len(prompts)]

    async def one(i: int) -> None:
        request = GenerationRequest(prompt_ids=tuple(prompts[i]), max_new_tokens=max_new, method=method)
        async for _ in chain.generate(request):
            stamps[i].append(time.perf_counter() - begin)
            if len(stamps[i]) == 1:
                waiting_first[0] -= 1
                if waiting_first[0] == 0:
                    all_first.set()

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    capped = False
    try:
        await asyncio.wait_for(all_first.wait(), safety_s)
    except TimeoutError:
        capped = True
    if not capped:
        await asyncio.wait(tasks, timeout=window_s)
    window_end = time.perf_counter() - begin
    for task in tasks:
        if not task.done():
            task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a failed request raises here: the cell must not silently count it
    return summarise(stamps, max_new, window_end, capped)
