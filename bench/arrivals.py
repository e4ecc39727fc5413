"""Arrival times of requests: Poisson, gamma (burstiness) or all at once.

The same construction as ``vllm bench serve``: inter-arrival gaps are drawn
from a gamma distribution with shape ``burstiness`` and mean ``1 / rate``
(shape 1 is the exponential, i.e. a Poisson process; below 1 burstier, above 1
more regular; infinite burstiness is a fixed gap), accumulated, then rescaled
so the last arrival lands at exactly ``n / rate`` seconds, which keeps the
offered load of different seeds identical.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(
    n: int,
    rate: float | None,
    burstiness: float = 1.0,
    seed: int = 0,
    *,
    normalize: bool = True,
) -> list[float]:
    """Seconds from the start at which each of ``n`` requests should be sent.

    ``rate`` None or infinite sends everything at time 0 (the closed loop of a
    concurrency limit then paces the requests).
    """
    if n <= 0:
        return []
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    if rate is None or math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("rate must be positive")
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    t = np.cumsum(gaps)
    if normalize and t[-1] > 0:
        t = t * ((n / rate) / t[-1])
    return [float(x) for x in t]


def interarrival_stats(offsets: list[float]) -> tuple[float, float]:
    """Mean and coefficient of variation of the gaps (CV = 1/√burstiness for gamma)."""
    if len(offsets) < 2:
        return 0.0, 0.0
    gaps = np.diff(np.asarray([0.0, *offsets]))
    mean = float(gaps.mean())
    return mean, float(gaps.std() / mean) if mean > 0 else 0.0
