"""How the methods benchmark turns token times into a cell's figures (scripts/bench/methods_measure.py)."""

from __future__ import annotations

import pytest

from scripts.bench.methods_measure import summarise


def test_a_cell_whose_requests_all_finished_is_measured_exactly():
    # two requests of 4 tokens; the second gets its first token at 0.5 s and finishes at 1.1 s
    r = summarise([[0.1, 0.2, 0.3, 0.4], [0.5, 0.7, 0.9, 1.1]], 4, 1.2, capped=False)
    assert r.complete and not r.capped
    assert r.tokens == 8
    assert r.elapsed_s == pytest.approx(1.1)
    assert r.throughput == pytest.approx(8 / 1.1)
    assert r.ttft_s == pytest.approx(0.3) and r.prefill_s == pytest.approx(0.5)
    # decode window: from the last first token (0.5) to the end (1.2), tokens after it: 0.7, 0.9, 1.1
    assert r.decode_window_s == pytest.approx(0.7)
    assert r.decode_tps == pytest.approx(3 / 0.7)
    assert r.p99_latency_s == pytest.approx(1.1)


def test_an_unfinished_cell_is_projected_from_its_decode_window():
    # the second request produced 2 of 4 tokens when measurement stopped at 1.0 s
    r = summarise([[0.1, 0.2, 0.3, 0.4], [0.5, 0.7]], 4, 1.0, capped=False)
    assert not r.complete and r.tokens == 6
    assert r.decode_tps == pytest.approx(1 / 0.5)  # one token in the window [0.5, 1.0]
    # the 2 missing tokens at the window's aggregate rate of 2 tokens/s: the cell ends at 2.0 s
    assert r.elapsed_s == pytest.approx(2.0)
    assert r.throughput == pytest.approx(8 / 2.0)
    # the unfinished request at its own rate (1 token in 0.5 s): 2 more tokens take 1.0 s
    assert r.p99_latency_s == pytest.approx(2.0)


def test_a_cell_stopped_by_the_safety_cap_says_so():
    r = summarise([[0.1, 0.2], []], 4, 300.0, capped=True)
    assert r.capped and not r.complete
    assert r.decode_tps == 0.0 and r.throughput == 0.0
