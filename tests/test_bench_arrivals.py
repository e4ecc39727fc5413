"""Arrival times (rate, burstiness), workload lengths and seeds, send order. Fixed seeds, generous bounds."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from bench.arrivals import arrival_offsets, interarrival_stats
from bench.config import BenchConfig
from bench.workload import build_workload, interleave, load_dataset, sample_lengths

N = 20_000


@pytest.mark.parametrize("rate", [0.5, 10.0, 200.0])
def test_rate_is_met(rate: float) -> None:
    raw = arrival_offsets(N, rate, 1.0, seed=1, normalize=False)
    mean, _ = interarrival_stats(raw)
    assert mean == pytest.approx(1.0 / rate, rel=0.03)
    norm = arrival_offsets(N, rate, 1.0, seed=1)
    assert norm[-1] == pytest.approx(N / rate)  # vLLM rescales to exactly n / rate
    assert all(b >= a for a, b in itertools.pairwise(norm))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_burstiness_sets_the_coefficient_of_variation(burstiness: float) -> None:
    offs = arrival_offsets(N, 20.0, burstiness, seed=2)
    _, cv = interarrival_stats(offs)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_poisson_counts_have_dispersion_one_and_bursty_more() -> None:
    def dispersion(b: float) -> float:
        offs = np.asarray(arrival_offsets(N, 20.0, b, seed=3))
        counts = np.bincount(offs.astype(int))[:-1]  # whole 1-s windows
        return float(counts.var() / counts.mean())

    assert dispersion(1.0) == pytest.approx(1.0, abs=0.2)
    assert dispersion(0.25) > 2.0
    assert dispersion(4.0) < 0.5


def test_seeded_and_special_cases() -> None:
    assert arrival_offsets(50, 5.0, 1.0, seed=7) == arrival_offsets(50, 5.0, 1.0, seed=7)
    assert arrival_offsets(50, 5.0, 1.0, seed=7) != arrival_offsets(50, 5.0, 1.0, seed=8)
    assert arrival_offsets(5, None) == [0.0] * 5
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert arrival_offsets(0, 2.0) == []
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, -1.0)


def test_range_ratio_lengths() -> None:
    assert sample_lengths(5, 100, 0.0, seed=1) == [100] * 5
    ls = sample_lengths(5000, 100, 0.5, seed=1)
    assert min(ls) >= 50 and max(ls) <= 150
    assert min(ls) <= 52 and max(ls) >= 148  # the whole range is used
    assert np.mean(ls) == pytest.approx(100, rel=0.03)
    assert min(sample_lengths(100, 2, 0.9, seed=1)) >= 1


def test_workload_seeds_and_lengths() -> None:
    cfg = BenchConfig(input_tokens=200, output_tokens=50, prefix_share=0.25, range_ratio=0.2, seed=5)
    a = build_workload(cfg, 30, "step0")
    b = build_workload(cfg, 30, "step1")
    assert [x.input_tokens for x in a] == [x.input_tokens for x in b]  # same lengths every step
    seeds = {it.seed_for(p) for ws in (a, b) for it in ws for p in ("pipeline", "direct")}
    assert len(seeds) == 120  # no two sends share a suffix
    assert a == build_workload(cfg, 30, "step0")  # reproducible
    assert build_workload(cfg.model_copy(update={"seed": 6}), 30, "step0") != a
    assert all(it.prefix_share == 0.25 for it in a)


def test_interleave_sends_each_item_once_per_path_in_random_pair_order() -> None:
    cfg = BenchConfig(input_tokens=10, output_tokens=5, prefix_share=0.5)
    items = build_workload(cfg, 200, "step0")
    sends = interleave(items, ["pipeline", "direct"], seed=1)
    assert len(sends) == 400
    for k in range(0, 400, 2):
        (i1, p1), (i2, p2) = sends[k], sends[k + 1]
        assert i1 is i2 and {p1, p2} == {"pipeline", "direct"}
    firsts = [sends[k][1] for k in range(0, 400, 2)]
    assert 60 < firsts.count("pipeline") < 140  # a fair coin, not a fixed order
    assert interleave(items, ["direct"], seed=1) == [(it, "direct") for it in items]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": ""}', "non-empty string 'prompt'"),
        ('{"prompt": "hi", "output_tokens": 0}', "from 1 to 32768"),
        ('{"prompt": "hi", "output_tokens": 1000000000}', "from 1 to 32768"),
        ('{"prompt": "hi", "output_tokens": true}', "from 1 to 32768"),
    ],
)
def test_dataset_lines_are_bounded_and_named(tmp_path: Path, line: str, needle: str) -> None:
    ds = tmp_path / "d.jsonl"
    ds.write_text('{"prompt": "fine", "output_tokens": 4}\n' + line + "\n")
    with pytest.raises(ValueError, match="line 2") as err:
        load_dataset(ds)
    assert needle in str(err.value)
