"""Metrics of a run, with ``vllm bench serve``'s definitions and key names.

:func:`vllm_metrics` reproduces vLLM's ``calculate_metrics`` (vllm/benchmarks/serve.py)
on :class:`~bench.records.RequestRecord` lists:

* failed requests are excluded from every latency and token figure and counted
  in ``failed``;
* TTFT per request; TPOT = (latency − TTFT) / (output_len − 1) for output_len > 1
  (requests with one output token have no TPOT, and count as TPOT 0 for goodput);
  ITL = every gap between successive token chunks, pooled over requests;
  E2EL = the request's latency;
* mean, median, population std and ``numpy.percentile`` (linear) in ms; an empty
  list counts as ``[0]`` as in vLLM;
* throughputs divide by the benchmark duration; goodput counts requests meeting
  every SLO given (``slo >= value``);
* peak output tokens per second from 1-second buckets of token times, and peak
  concurrency from a sweep over [start, start + latency) intervals.

The pipeline's own figures (stages, engine time, efficiency, schedule lag,
token mismatches, retries) sit beside them under keys of their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bench.records import BREAKDOWN_NAMES, RequestRecord
from services.contracts import VllmMetric
from services.engine_client import Sample, metric_sum

MS = 1000.0


def pkey(p: float) -> str:
    """vLLM's spelling of a percentile in key names: 99 → 'p99', 99.9 → 'p99.9'."""
    return f"p{int(p)}" if int(p) == p else f"p{p}"


def stats_ms(values_s: Sequence[float], percentiles: Iterable[float], name: str) -> dict[str, float]:
    """``mean_/median_/std_/pNN_{name}_ms`` of values in seconds, vLLM style (empty → 0)."""
    arr: Any = list(values_s) or 0
    out = {
        f"mean_{name}_ms": float(np.mean(arr)) * MS,
        f"median_{name}_ms": float(np.median(arr)) * MS,
        f"std_{name}_ms": float(np.std(arr)) * MS,
    }
    for p in percentiles:
        out[f"{pkey(p)}_{name}_ms"] = float(np.percentile(arr, p)) * MS
    return out


def _peaks(ok: list[RequestRecord]) -> tuple[float, int]:
    """Peak output tokens in any 1-s bucket, and peak concurrent requests (vLLM's method)."""
    if not ok:
        return 0.0, 0
    starts = [r.sent_s for r in ok]
    ends = [r.sent_s + (r.latency_s or 0.0) for r in ok]
    t_min, t_max = min(starts), max(ends)
    n_buckets = math.ceil(t_max - t_min) + 1
    tokens = np.zeros(n_buckets)
    for r in ok:
        first = r.first_token_s if r.first_token_s is not None else r.sent_s + (r.ttft_s or 0.0)
        times = np.concatenate(([first], first + np.cumsum(r.itl_s))) if r.itl_s else np.array([first])
        idx = (times - t_min).astype(int)
        idx = idx[(idx >= 0) & (idx < n_buckets)]
        np.add.at(tokens, idx, 1)
    events = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return float(tokens.max()), peak


def vllm_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float],
    goodput: dict[str, float] | None = None,
    *,
    max_concurrency: int | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """The result keys of ``vllm bench serve`` for these records over ``duration_s``.

    ``goodput`` holds SLOs in ms (``ttft``, ``tpot``, ``e2el``); without it
    ``request_goodput`` is None, as in vLLM. ``max_concurrency`` and ``rate``
    add vLLM's client queue figures where vLLM reports them.
    """
    ok = [r for r in records if r.success]
    failed = len(records) - len(ok)
    dur = duration_s if duration_s > 0 else float("nan")
    out_lens = [r.output_len for r in ok]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(out_lens)
    ttfts = [r.ttft_s or 0.0 for r in ok]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    all_tpots = [r.tpot_s or 0.0 for r in ok]  # one output token: TPOT 0 for goodput
    itls = [x for r in ok for x in r.itl_s]
    e2els = [r.latency_s or 0.0 for r in ok]

    good: int | None = None
    if goodput:
        good = 0
        for ttft, tpot, e2el in zip(ttfts, all_tpots, e2els, strict=True):
            checks = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
            if all(goodput[k] / MS >= checks[k] for k in goodput):
                good += 1

    peak_tok, peak_conc = _peaks(ok)
    res: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": failed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": None if good is None else good / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_output_tokens_per_s": peak_tok,
        "max_concurrent_requests": peak_conc,
    }
    res.update(stats_ms(ttfts, percentiles, "ttft"))
    res.update(stats_ms(tpots, percentiles, "tpot"))
    res.update(stats_ms(itls, percentiles, "itl"))
    res.update(stats_ms(e2els, percentiles, "e2el"))
    if max_concurrency is not None:
        res.update(stats_ms([r.client_queue_s for r in ok], percentiles, "client_queue_time"))
        if rate is not None and not math.isinf(rate):
            res.update(
                stats_ms(
                    [(r.latency_s or 0) + r.client_queue_s for r in ok],
                    percentiles,
                    "e2el_including_client_queue",
                )
            )
    return res


def client_metrics(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict[str, Any]:
    """Schedule lag (coordinated omission made visible), token mismatches, retries, cache use."""
    lags = [r.schedule_lag_s for r in records]
    res: dict[str, Any] = stats_ms(lags, percentiles, "schedule_lag")
    res["max_schedule_lag_ms"] = max(lags) * MS if lags else 0.0
    mism = [r for r in records if r.success and r.token_mismatch]
    res["token_mismatches"] = len(mism)
    res["token_mismatch_examples"] = [f"#{r.index} {r.path}: {'; '.join(r.token_mismatch)}" for r in mism[:5]]
    cached = [r.cached_tokens for r in records if r.success and r.cached_tokens is not None]
    res["total_cached_tokens"] = sum(cached) if cached else None
    res["refused_429"] = sum(r.refused_429 for r in records)
    res["submit_retries"] = sum(r.submit_retries for r in records)
    res["errors"] = _error_counts(records)
    return res


def _error_counts(records: Sequence[RequestRecord], top: int = 5) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error or "unknown error")[:160]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def pipeline_metrics(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict[str, Any]:
    """Per-stage breakdown, engine time, efficiency and retries of pipeline records."""
    ok = [r for r in records if r.success]
    e2el_mean = float(np.mean([r.latency_s or 0.0 for r in ok])) if ok else 0.0
    stages: dict[str, dict[str, float | None]] = {}
    for name in BREAKDOWN_NAMES:
        vals = [
            v for r in ok if (v := (r.client_s if name == "client" else r.stages_s.get(name))) is not None
        ]
        st: dict[str, float | None] = {
            k.replace(f"_{name}", ""): v for k, v in stats_ms(vals, percentiles, name).items()
        }
        st["share"] = (st["mean_ms"] or 0.0) / (e2el_mean * MS) if vals and e2el_mean > 0 else None
        st["count"] = len(vals)
        stages[name] = st
    eng = [r.engine_time_s for r in ok if r.engine_time_s is not None]
    eff = [r.engine_time_s / r.latency_s for r in ok if r.engine_time_s is not None and r.latency_s]
    server = [r.server_e2e_s for r in ok if r.server_e2e_s is not None]
    # The pipeline's own share of a job's server time: everything but the engine's work.
    own = [
        r.server_e2e_s - r.engine_time_s
        for r in ok
        if r.server_e2e_s is not None and r.engine_time_s is not None
    ]
    res: dict[str, Any] = {"stages": stages}
    res.update(stats_ms(eng, percentiles, "engine_time"))
    res.update(stats_ms(server, percentiles, "server_e2e"))
    res.update(stats_ms(own, percentiles, "server_overhead"))
    res["mean_efficiency"] = float(np.mean(eff)) if eff else None
    res["median_efficiency"] = float(np.median(eff)) if eff else None
    total_lat = sum(r.latency_s or 0.0 for r in ok if r.engine_time_s is not None)
    res["engine_time_share"] = sum(eng) / total_lat if eng and total_lat > 0 else None
    res["redelivered_jobs"] = sum(1 for r in records if (r.attempt or 0) > 1)
    res["gpu_jobs"] = gpu_job_metrics(ok)
    return res


def gpu_job_metrics(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Aggregate of per-job GPU figures (None when no job reported a GPU).

    Jobs that overlap share the GPU, so per-job energies overlap too: the run's
    energy comes from the node's samples over the run window (see ``bench.gpu``),
    not from summing these.
    """
    stats = [r.gpu for r in records if r.gpu and r.gpu.get("available")]
    if not stats:
        reasons = {str(r.gpu.get("reason")) for r in records if r.gpu and r.gpu.get("reason")}
        return {"available": False, "reason": "; ".join(sorted(reasons)) or None} if reasons else None
    utils = [s["util_mean_pct"] for s in stats if s.get("util_mean_pct") is not None]
    vram = [s["vram_peak_bytes"] for s in stats if s.get("vram_peak_bytes") is not None]
    power = [s["power_mean_w"] for s in stats if s.get("power_mean_w") is not None]
    epot = [s["energy_per_output_token_j"] for s in stats if s.get("energy_per_output_token_j") is not None]
    return {
        "available": True,
        "jobs": len(stats),
        "gpu_count": max(int(s.get("gpu_count") or 0) for s in stats),
        "util_mean_pct": float(np.mean(utils)) if utils else None,
        "vram_peak_bytes": max(vram) if vram else None,
        "vram_total_bytes": max((s.get("vram_total_bytes") or 0) for s in stats) or None,
        "power_mean_w": float(np.mean(power)) if power else None,
        "mean_job_energy_per_output_token_j": float(np.mean(epot)) if epot else None,
    }


def path_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float],
    goodput: dict[str, float] | None,
    *,
    max_concurrency: int | None,
    rate: float | None,
) -> dict[str, Any]:
    """Everything about one path's records: vLLM's keys, the client's, and the pipeline's if any."""
    res = vllm_metrics(records, duration_s, percentiles, goodput, max_concurrency=max_concurrency, rate=rate)
    res["num_requests"] = len(records)
    res.update(client_metrics(records, percentiles))
    if any(r.path == "pipeline" for r in records):
        res.update(pipeline_metrics(records, percentiles))
    return res


#: Keys compared between paths (and between runs) when their quantities match.
def comparable_keys(percentiles: Sequence[float]) -> list[str]:
    """The latency and throughput keys worth a side-by-side difference and ratio."""
    keys = ["request_throughput", "output_throughput", "total_token_throughput"]
    for m in ("ttft", "tpot", "itl", "e2el"):
        keys += [f"mean_{m}_ms", f"median_{m}_ms"] + [f"{pkey(p)}_{m}_ms" for p in percentiles]
    return keys


def diff_ratio(a: float | None, b: float | None) -> tuple[float | None, float | None]:
    """(a − b, a / b), with None where undefined."""
    if a is None or b is None or not isinstance(a, int | float) or not isinstance(b, int | float):
        return None, None
    return a - b, (a / b if b else None)


def overhead(
    pipeline: dict[str, Any], direct: dict[str, Any], percentiles: Sequence[float]
) -> dict[str, Any]:
    """Pipeline minus direct, and pipeline over direct, for every comparable key."""
    out: dict[str, Any] = {}
    for k in comparable_keys(percentiles):
        d, r = diff_ratio(pipeline.get(k), direct.get(k))
        out[k] = {"pipeline": pipeline.get(k), "direct": direct.get(k), "diff": d, "ratio": r}
    return out


def paired_e2el(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict[str, Any] | None:
    """Pipeline E2EL minus direct E2EL of the same request, over every request both paths served.

    ``--path both`` sends each request on both paths, so the difference is taken per request:
    with varied lengths the two paths' medians each move with the lengths they happen to hold,
    and their difference is far noisier than the median of the paired differences. None when no
    request succeeded on both paths.
    """
    e2el: dict[tuple[int, int], dict[str, float]] = {}
    for r in records:
        if r.success and r.latency_s is not None:
            e2el.setdefault((r.step, r.index), {})[r.path] = r.latency_s
    diffs = [v["pipeline"] - v["direct"] for v in e2el.values() if "pipeline" in v and "direct" in v]
    if not diffs:
        return None
    return {"pairs": len(diffs), **stats_ms(diffs, percentiles, "e2el_diff")}


def pipeline_cpu(
    usage: dict[str, Any] | None, records: Sequence[RequestRecord], duration_s: float
) -> dict[str, Any] | None:
    """The pipeline's own CPU over the measured window, per job and per 1,000 streamed tokens.

    ``usage`` is :func:`services.procstats.cpu_between` over the window; the jobs
    and tokens are the pipeline path's measured requests (the direct path costs
    the pipeline nothing).
    """
    jobs = [r for r in records if r.path == "pipeline"]
    if usage is None or not jobs:
        return None
    tokens = sum(r.completion_tokens or 0 for r in jobs)
    cpu = float(usage["cpu_s"])
    return {
        "cpu_s": cpu,
        "jobs": len(jobs),
        "output_tokens": tokens,
        "per_job_ms": cpu / len(jobs) * MS,
        "per_1k_tokens_s": cpu / tokens * 1000 if tokens else None,
        "cores": cpu / duration_s if duration_s > 0 else None,
        "processes": usage["processes"],
    }


def _peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one moment ([start, end): an end before a start at the same time)."""
    events = sorted([(a, 1) for a, b in intervals] + [(b, -1) for a, b in intervals])
    peak = cur = 0
    for _t, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def routing_metrics(
    records: Sequence[RequestRecord],
    live_nodes: Sequence[str] | None = None,
    *,
    policy: str | None = None,
    prefix_groups: int | None = None,
) -> dict[str, Any] | None:
    """Per-node figures of the pipeline's successful jobs, and how well routing used the caches.

    Per node: share of jobs, prefix-cache hit rate (Σ cached / Σ prompt tokens from each job's
    ``usage``), peak jobs in flight (dispatched → result back) and median TTFT. ``hotspot`` =
    nodes × largest share (1.0 = perfectly even), over the nodes that were live at the start
    (``live_nodes``; else those that served). ``hit_rate_allowed`` is the most the workload
    allows: its shared-prefix tokens less each prefix group's first (cold) request, over all
    prompt tokens; ``hit_rate_of_allowed`` is the hit rate over it. None without pipeline jobs.
    """
    ok = [r for r in records if r.path == "pipeline" and r.success]
    if not ok:
        return None
    by_node: dict[str, list[RequestRecord]] = {}
    for r in ok:
        by_node.setdefault(r.node or "?", []).append(r)
    nodes: dict[str, Any] = {}
    for name in sorted(set(by_node) | set(live_nodes or ())):
        rs = by_node.get(name, [])
        prompt = sum(r.prompt_tokens or 0 for r in rs)
        cached = sum(r.cached_tokens or 0 for r in rs)
        windows = [
            (r.node_start_s, r.node_end_s)
            for r in rs
            if r.node_start_s is not None and r.node_end_s is not None
        ]
        ttfts = [r.ttft_s for r in rs if r.ttft_s is not None]
        nodes[name] = {
            "jobs": len(rs),
            "share": len(rs) / len(ok),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else None,
            "in_flight_peak": _peak_overlap(windows),  # type: ignore[arg-type]
            "median_ttft_ms": float(np.median(ttfts)) * MS if ttfts else None,
        }
    prompt_total = sum(r.prompt_tokens or 0 for r in ok)
    cached_total = sum(r.cached_tokens or 0 for r in ok)
    # The workload's ceiling: each prefix group's first request in send order finds nothing cached.
    shared = sum(r.prefix_tokens or 0 for r in ok)
    first: dict[object, int] = {}
    for r in sorted(ok, key=lambda r: r.sent_s):
        first.setdefault(r.prefix_group, r.prefix_tokens or 0)
    allowed = (shared - sum(first.values())) / prompt_total if prompt_total else None
    hit_rate = cached_total / prompt_total if prompt_total else None
    policies: dict[str, int] = {}
    for r in ok:
        if r.policy:
            policies[r.policy] = policies.get(r.policy, 0) + 1
    counted = len(live_nodes) if live_nodes else len(by_node)
    return {
        "policy": max(policies, key=lambda p: policies[p]) if policies else policy,
        "policies": policies,
        "prefix_groups": prefix_groups,
        "nodes_live": len(live_nodes) if live_nodes is not None else None,
        "nodes_used": len(by_node),
        "hotspot": max(len(rs) for rs in by_node.values()) / len(ok) * max(counted, len(by_node)),
        "hit_rate": hit_rate,
        "cached_tokens": cached_total,
        "prompt_tokens": prompt_total,
        "hit_rate_allowed": allowed,
        "hit_rate_of_allowed": hit_rate / allowed if hit_rate is not None and allowed else None,
        "nodes": nodes,
    }


def prefix_cache_delta(before: list[Sample] | None, after: list[Sample] | None) -> dict[str, Any] | None:
    """Prefix cache queries, hits and hit rate between two ``/metrics`` scrapes (tokens)."""
    if before is None or after is None:
        return None

    def delta(name: str) -> float | None:
        a, b = metric_sum(before, name), metric_sum(after, name)
        return None if a is None or b is None else b - a

    q, h = delta(VllmMetric.PREFIX_QUERIES), delta(VllmMetric.PREFIX_HITS)
    return {
        "queries": q,
        "hits": h,
        "hit_rate": (h / q) if q and h is not None else None,
        "prompt_tokens": delta(VllmMetric.PROMPT_TOKENS),
        "generation_tokens": delta(VllmMetric.GENERATION_TOKENS),
        "preemptions": delta(VllmMetric.PREEMPTIONS),
    }


def find_knee(
    loads: Sequence[float],
    throughputs: Sequence[float],
    median_ttfts: Sequence[float],
    min_gain: float,
    latency_factor: float,
) -> dict[str, Any]:
    """Where a sweep saturates.

    Step ``i`` (``i ≥ 1``) is saturated when its marginal gain
    ``(T_i / T_{i-1} − 1) / (L_i / L_{i-1} − 1)`` is below ``min_gain`` or its
    median TTFT is above ``latency_factor`` × the first step's. The knee is the
    step before the first saturated one: the highest load still worth its cost.
    """
    gains: list[float | None] = [None]
    saturated: int | None = None
    reason = ""
    for i in range(1, len(loads)):
        t0, t1 = throughputs[i - 1], throughputs[i]
        load_gain = loads[i] / loads[i - 1] - 1
        gain = ((t1 / t0 - 1) / load_gain) if t0 > 0 and load_gain > 0 else None
        gains.append(gain)
        if saturated is not None:
            continue
        if gain is not None and gain < min_gain:
            saturated, reason = i, f"throughput gain {gain:.2f} < {min_gain:.2f} of the load increase"
        elif median_ttfts[0] > 0 and median_ttfts[i] > latency_factor * median_ttfts[0]:
            saturated = i
            reason = f"median TTFT {median_ttfts[i]:.1f} ms > {latency_factor:g}× the first step's"
    knee = (saturated - 1) if saturated is not None else (len(loads) - 1 if loads else None)
    return {
        "knee_index": knee,
        "knee_load": loads[knee] if knee is not None else None,
        "saturated_index": saturated,
        "saturated": saturated is not None,
        "reason": reason or "no step saturated: the knee is at or beyond the last step",
        "gains": gains,
    }
