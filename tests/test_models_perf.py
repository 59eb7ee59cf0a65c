"""Memory behaviour of TDA-MIL's attention, measured side by side as ratios (never wall-clock limits).

Each point runs in a fresh subprocess through the benchmark's own measurement code
(``benchmarks/bench_attention.py``), at a small width so the whole file stays within ~30 s on 2 idle cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
SMALL = {"device": "cpu", "dim": 32, "in_dim": 32, "depth": 2, "heads": 2, "repeats": 1, "threads": 0, "mem_cap_gb": 4.0}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(bench, n: int, impl: str, **extra) -> dict:
    row = bench.measure_in_subprocess({**SMALL, "n": n, "impl": impl, **extra}, timeout=300)
    return row


@pytest.mark.slow
def test_sdpa_memory_is_far_below_explicit_softmax(bench):
    sdpa = _point(bench, 2000, "sdpa")
    explicit = _point(bench, 2000, "explicit")
    assert sdpa["status"] == "ok" and explicit["status"] == "ok", (sdpa, explicit)
    # Explicit attention holds n x n matrices per head (2000^2 * 2 heads * 4 B = 32 MB each, several
    # alive for backward); SDPA holds only O(n d) activations.
    assert sdpa["peak_mb"] < 0.25 * explicit["peak_mb"], (sdpa, explicit)


@pytest.mark.slow
def test_sdpa_memory_grows_linearly_with_bag_size(bench):
    small = _point(bench, 1500, "sdpa")
    large = _point(bench, 6000, "sdpa")
    assert small["status"] == "ok" and large["status"] == "ok", (small, large)
    growth = large["peak_mb"] / small["peak_mb"]
    # 4x the patches: linear memory gives ~4x, quadratic would give ~16x.
    assert 2.0 < growth < 6.0, (small, large)


def test_memory_cap_turns_an_oversized_run_into_a_clean_out_of_memory(bench):
    # Each 8k x 8k attention matrix (2 heads) is 512 MB; under a 0.25 GB cap the run must fail cleanly.
    row = _point(bench, 8000, "explicit", mem_cap_gb=0.25)
    assert row["status"] == "oom", row
