"""Two runs side by side: every comparable figure, its difference (B − A) and ratio (B / A)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.metrics import diff_ratio, pkey
from bench.report import load_run
from bench.runner import RunResult

Better = Literal["lower", "higher"] | None


@dataclass(frozen=True)
class CompareRow:
    """One figure of two runs."""

    section: str  # e.g. "pipeline" or "run"
    key: str
    label: str
    a: float | None
    b: float | None
    diff: float | None
    ratio: float | None
    better: Better

    @property
    def verdict(self) -> str:
        """'better', 'worse' or '' for B against A (5 % dead band)."""
        if self.ratio is None or self.better is None:
            return ""
        if max(abs(self.a or 0.0), abs(self.b or 0.0)) < 0.1:  # sub-0.1 figures (ms, counts): noise
            return ""
        if self.better == "lower":
            return "better" if self.ratio < 0.95 else "worse" if self.ratio > 1.05 else ""
        return "better" if self.ratio > 1.05 else "worse" if self.ratio < 0.95 else ""


@dataclass
class Comparison:
    """Two loaded runs and their rows."""

    a: RunResult
    b: RunResult
    rows: list[CompareRow]


_THROUGHPUT: list[tuple[str, str, Better]] = [
    ("completed", "Successful requests", None),
    ("failed", "Failed requests", "lower"),
    ("duration", "Benchmark duration (s)", None),
    ("request_throughput", "Request throughput (req/s)", "higher"),
    ("request_goodput", "Request goodput (req/s)", "higher"),
    ("output_throughput", "Output token throughput (tok/s)", "higher"),
    ("total_token_throughput", "Total token throughput (tok/s)", "higher"),
    ("max_output_tokens_per_s", "Peak output token throughput (tok/s)", "higher"),
]
_LATENCY = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")]
_EXTRA: list[tuple[str, str, Better]] = [
    ("mean_schedule_lag_ms", "Mean schedule lag (ms)", "lower"),
    ("max_schedule_lag_ms", "Max schedule lag (ms)", "lower"),
    ("token_mismatches", "Token count mismatches", "lower"),
    ("mean_engine_time_ms", "Mean engine time (ms)", "lower"),
    ("mean_efficiency", "Mean efficiency (engine / E2EL)", "higher"),
    ("mean_server_e2e_ms", "Mean server time (ms)", "lower"),
    ("median_server_overhead_ms", "Median server-side overhead (ms)", "lower"),
    ("p90_server_overhead_ms", "P90 server-side overhead (ms)", "lower"),
    ("p99_server_overhead_ms", "P99 server-side overhead (ms)", "lower"),
]

#: Per-node routing figures (``summary["routing"]``): two policies side by side.
_ROUTING: list[tuple[str, str, Better]] = [
    ("hit_rate", "Prefix cache hit rate (Σ cached / Σ prompt tokens)", "higher"),
    ("hit_rate_allowed", "Hit rate the workload allows", None),
    ("hit_rate_of_allowed", "Hit rate / allowed", "higher"),
    ("hotspot", "Hotspot (nodes × largest share; 1 = even)", "lower"),
    ("nodes_used", "Nodes that served jobs", None),
]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v  # ints stay ints (request counts print as counts)


def _stat_label(stat: str) -> str:
    """'Mean', 'Median', or a percentile key as 'P99'."""
    return stat.upper() if stat[0] == "p" else stat.capitalize()


def compare_summaries(a: dict[str, Any], b: dict[str, Any]) -> list[CompareRow]:
    """Rows for every path both runs measured, then run-wide figures."""
    pcts = [p for p in (a.get("percentiles") or []) if p in (b.get("percentiles") or [])]
    rows: list[CompareRow] = []

    def add(section: str, key: str, label: str, va: Any, vb: Any, better: Better) -> None:
        fa, fb = _num(va), _num(vb)
        if fa is None and fb is None:
            return
        d, r = diff_ratio(fb, fa)
        rows.append(CompareRow(section, key, label, fa, fb, d, r, better))

    pa, pb = a.get("paths") or {}, b.get("paths") or {}
    shared = [p for p in ("pipeline", "direct") if p in pa and p in pb]
    if not shared:  # different paths: compare each run's primary figures
        pa = {"primary": a}
        pb = {"primary": b}
        shared = ["primary"]
    for p in shared:
        ma, mb = pa[p], pb[p]
        for key, label, better in _THROUGHPUT:
            add(p, key, label, ma.get(key), mb.get(key), better)
        for m, name in _LATENCY:
            for stat in ("mean", "median", *(pkey(x) for x in pcts)):
                key = f"{stat}_{m}_ms"
                add(p, key, f"{_stat_label(stat)} {name} (ms)", ma.get(key), mb.get(key), "lower")
        for key, label, better in _EXTRA:
            add(p, key, label, ma.get(key), mb.get(key), better)
        sa, sb = ma.get("stages") or {}, mb.get("stages") or {}
        for stage in sa:
            if stage in sb:
                add(
                    p,
                    f"stage_{stage}",
                    f"Stage {stage} mean (ms)",
                    sa[stage].get("mean_ms"),
                    sb[stage].get("mean_ms"),
                    "lower",
                )
    ea, eb = a.get("paired_e2el") or {}, b.get("paired_e2el") or {}
    for stat in ("median", *(pkey(x) for x in pcts if x != 50.0)):
        add(
            "run",
            f"{stat}_e2el_diff_ms",
            f"{_stat_label(stat)} E2EL pipeline − direct, paired by request (ms)",
            ea.get(f"{stat}_e2el_diff_ms"),
            eb.get(f"{stat}_e2el_diff_ms"),
            "lower",
        )
    ra, rb = a.get("routing") or {}, b.get("routing") or {}
    for key, label, better in _ROUTING:
        add("routing", key, label, ra.get(key), rb.get(key), better)
    ca, cb = a.get("prefix_cache") or {}, b.get("prefix_cache") or {}
    add(
        "run",
        "prefix_cache_hit_rate",
        "Prefix cache hit rate",
        ca.get("hit_rate"),
        cb.get("hit_rate"),
        "higher",
    )
    pa_cpu, pb_cpu = a.get("pipeline_cpu") or {}, b.get("pipeline_cpu") or {}
    add("run", "pipeline_cpu_s", "Pipeline CPU (s)", pa_cpu.get("cpu_s"), pb_cpu.get("cpu_s"), "lower")
    add(
        "run",
        "pipeline_cpu_per_job_ms",
        "Pipeline CPU per job (ms)",
        pa_cpu.get("per_job_ms"),
        pb_cpu.get("per_job_ms"),
        "lower",
    )
    add(
        "run",
        "pipeline_cpu_per_1k_tokens_s",
        "Pipeline CPU per 1,000 streamed tokens (s)",
        pa_cpu.get("per_1k_tokens_s"),
        pb_cpu.get("per_1k_tokens_s"),
        "lower",
    )
    ga, gb = a.get("gpu") or {}, b.get("gpu") or {}
    add(
        "run",
        "energy_per_output_token_j",
        "Energy per output token (J)",
        ga.get("energy_per_output_token_j"),
        gb.get("energy_per_output_token_j"),
        "lower",
    )
    add(
        "run",
        "gpu_util_mean_pct",
        "GPU utilisation mean (%)",
        ga.get("util_mean_pct"),
        gb.get("util_mean_pct"),
        None,
    )
    return rows


def compare_runs(dir_a: str | Path, dir_b: str | Path) -> Comparison:
    """Load two run folders and compare them (ValueError if one is not a run)."""
    a, b = load_run(dir_a), load_run(dir_b)
    return Comparison(a, b, compare_summaries(a.summary, b.summary))
