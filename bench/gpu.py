"""GPU figures of a run window, from the NVML samples inference workers publish to Redis.

Per-job GPU stats overlap when jobs run together (each job's window sees the
whole GPU), so the run's energy comes from here: for every GPU of every node,
the energy counter's rise over the window (or, without a counter, power
integrated over the samples), summed, and divided by the run's output tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.contracts import GpuSample, Keys
from services.queue import REDIS_DOWN, redis_client
from services.settings import Settings
from services.telemetry import SAMPLES_FIELD, decode_samples


def parse_entry(fields: dict[str, str]) -> list[GpuSample]:
    """The samples of one stream entry (one tick: every GPU of the node), as the worker publishes them."""
    raw = fields.get(SAMPLES_FIELD)
    if raw is None:
        return []
    try:
        return decode_samples(raw)
    except (ValueError, ValidationError):
        return []


def summarize_samples(
    samples: list[tuple[str, GpuSample]], output_tokens: int, t_start_ns: int, t_end_ns: int
) -> dict[str, Any] | None:
    """Per-GPU and total figures of ``(node, sample)`` pairs inside the window."""
    per: dict[tuple[str, int], list[GpuSample]] = {}
    for node, smp in samples:
        if t_start_ns <= smp.t <= t_end_ns:
            per.setdefault((node, smp.index), []).append(smp)
    if not per:
        return None
    gpus: list[dict[str, Any]] = []
    total_energy = 0.0
    for (node, index), lst in sorted(per.items()):
        lst.sort(key=lambda x: x.t)
        util = [x.util_pct for x in lst if x.util_pct is not None]
        power = [x.power_w for x in lst if x.power_w is not None]
        vram = [x.vram_used_bytes for x in lst if x.vram_used_bytes is not None]
        energy: float | None = None
        counters = [x for x in lst if x.energy_mj is not None]
        if len(counters) >= 2:
            energy = (counters[-1].energy_mj - counters[0].energy_mj) / 1000.0  # type: ignore[operator]
        elif len(lst) >= 2 and all(x.power_w is not None for x in lst):
            ts = np.array([x.t for x in lst]) / 1e9
            energy = float(np.trapezoid([x.power_w for x in lst], ts))
        if energy is not None:
            total_energy += energy
        gpus.append(
            {
                "node": node,
                "index": index,
                "name": lst[0].name,
                "samples": len(lst),
                "util_mean_pct": float(np.mean(util)) if util else None,
                "util_max_pct": float(np.max(util)) if util else None,
                "vram_peak_bytes": max(vram) if vram else None,
                "vram_total_bytes": lst[0].vram_total_bytes,
                "power_mean_w": float(np.mean(power)) if power else None,
                "energy_j": energy,
            }
        )
    have_energy = any(g["energy_j"] is not None for g in gpus)
    return {
        "available": True,
        "gpus": gpus,
        "window_s": (t_end_ns - t_start_ns) / 1e9,
        "energy_j": total_energy if have_energy else None,
        "energy_per_output_token_j": (total_energy / output_tokens)
        if have_energy and output_tokens
        else None,
        "util_mean_pct": float(np.mean([g["util_mean_pct"] for g in gpus if g["util_mean_pct"] is not None]))
        if any(g["util_mean_pct"] is not None for g in gpus)
        else None,
        "vram_peak_bytes": max((g["vram_peak_bytes"] or 0) for g in gpus) or None,
    }


async def run_window(
    settings: Settings, t_start_ns: int, t_end_ns: int, output_tokens: int
) -> dict[str, Any] | None:
    """GPU figures of every registered node over the window, or None (no Redis, no GPU samples)."""
    keys = Keys(settings.redis_prefix)
    r = redis_client(settings)
    try:
        nodes = sorted(await r.smembers(keys.nodes))
        pairs: list[tuple[str, GpuSample]] = []
        lo, hi = t_start_ns // 1_000_000 - 2000, t_end_ns // 1_000_000 + 2000
        for node in nodes:
            for _id, fields in await r.xrange(keys.gpu_samples(node), min=f"{lo}-0", max=f"{hi}-0"):
                pairs.extend((node, smp) for smp in parse_entry(fields))
        return summarize_samples(pairs, output_tokens, t_start_ns, t_end_ns)
    except (*REDIS_DOWN, RedisError):
        return None
    finally:
        await r.aclose()
