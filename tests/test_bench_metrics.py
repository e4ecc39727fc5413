"""Metric arithmetic on hand-made timings: vLLM's definitions, edge cases, the pipeline's extras."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.gpu import parse_entry, run_window, summarize_samples
from bench.metrics import (
    find_knee,
    overhead,
    paired_e2el,
    path_metrics,
    pipeline_metrics,
    pkey,
    prefix_cache_delta,
    stats_ms,
    vllm_metrics,
)
from bench.records import BREAKDOWN_NAMES, RequestRecord
from services.contracts import STAGE_NAMES, GpuSample, Keys, VllmMetric, new_id, now_ns
from services.engine_client import parse_prometheus
from services.queue import redis_client
from services.settings import Settings
from services.telemetry import SAMPLES_FIELD, FakeGpuBackend, encode_samples, publish_samples
from tests.stackutil import RedisServer


def rec(
    ttft: float,
    itl: list[float],
    *,
    out: int | None = None,
    inp: int = 100,
    success: bool = True,
    sent: float = 0.0,
    latency: float | None = None,
    path: str = "direct",
    index: int = 0,
) -> RequestRecord:
    r = RequestRecord(index=index, path=path, success=success, sent_s=sent)
    r.requested_input_tokens = inp
    if success:
        r.ttft_s = ttft
        r.itl_s = list(itl)
        r.prompt_tokens = inp
        r.completion_tokens = out if out is not None else len(itl) + 1
        r.latency_s = latency if latency is not None else ttft + sum(itl)
    else:
        r.error = "boom"
        r.latency_s = latency if latency is not None else 5.0
    return r


PCTS = [50.0, 90.0, 99.0]


def test_vllm_definitions_on_hand_made_timings() -> None:
    recs = [
        rec(0.1, [0.02, 0.03, 0.05]),  # 4 tokens, latency 0.2, TPOT 0.1/3
        rec(0.2, [0.04], sent=0.5),  # 2 tokens, latency 0.24, TPOT 0.04
        rec(0, [], success=False, latency=9.0),  # failed: excluded everywhere
    ]
    m = vllm_metrics(recs, 2.0, PCTS)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 200
    assert m["total_output_tokens"] == 6
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(103.0)
    assert m["request_goodput"] is None  # no SLOs given, as vLLM
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["std_ttft_ms"] == pytest.approx(50.0)  # population std, as numpy's default
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 40) / 2)
    # ITL: every gap of every request, pooled: [20, 30, 50, 40] ms
    assert m["mean_itl_ms"] == pytest.approx(35.0)
    assert m["median_itl_ms"] == pytest.approx(35.0)
    assert m["p99_itl_ms"] == pytest.approx(40 + 0.97 * 10)
    assert m["mean_e2el_ms"] == pytest.approx(220.0)
    assert m["duration"] == 2.0


def test_one_output_token_has_no_tpot_but_counts_as_zero_for_goodput() -> None:
    one = rec(0.1, [], out=1)
    three = rec(0.1, [0.1, 0.1], out=3)  # TPOT 100 ms
    m = vllm_metrics([one, three], 1.0, PCTS, {"tpot": 50})
    assert one.tpot_s is None
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # only the 3-token request has a TPOT
    assert m["request_goodput"] == pytest.approx(1.0)  # the 1-token one meets the TPOT SLO
    m2 = vllm_metrics([one, three], 1.0, PCTS, {"tpot": 150})
    assert m2["request_goodput"] == pytest.approx(2.0)


def test_goodput_needs_every_slo() -> None:
    recs = [
        rec(0.05, [0.01] * 9),  # ttft 50, tpot 10, e2el 140
        rec(0.30, [0.01] * 9),  # ttft 300: misses ttft
        rec(0.05, [0.05] * 9),  # tpot 50: misses tpot
        rec(0.05, [0.01] * 9, success=False),
    ]
    m = vllm_metrics(recs, 1.0, PCTS, {"ttft": 100, "tpot": 20, "e2el": 1000})
    assert m["request_goodput"] == pytest.approx(1.0)
    m = vllm_metrics(recs, 2.0, PCTS, {"ttft": 1000})
    assert m["request_goodput"] == pytest.approx(1.5)
    m = vllm_metrics(recs, 1.0, PCTS, {"e2el": 400})  # e2els 140, 390, 500
    assert m["request_goodput"] == pytest.approx(2.0)


def test_percentiles_are_numpy_linear_and_named_like_vllm() -> None:
    recs = [rec(t, [0.001]) for t in (0.01, 0.02, 0.03, 0.04)]
    m = vllm_metrics(recs, 1.0, [50, 90, 99, 99.9])
    assert m["p50_ttft_ms"] == pytest.approx(25.0)
    assert m["p90_ttft_ms"] == pytest.approx(37.0)
    assert m["p99_ttft_ms"] == pytest.approx(39.7)
    assert m["p99.9_ttft_ms"] == pytest.approx(39.97)
    assert pkey(99.0) == "p99" and pkey(99.9) == "p99.9" and pkey(50) == "p50"
    s = stats_ms([1.0, 2.0, 3.0], [25], "x")
    assert s == {
        "mean_x_ms": 2000.0,
        "median_x_ms": 2000.0,
        "std_x_ms": pytest.approx(816.4965809),
        "p25_x_ms": 1500.0,
    }


def test_all_failed_gives_zeros_like_vllm() -> None:
    recs = [rec(0, [], success=False), rec(0, [], success=False)]
    m = vllm_metrics(recs, 1.0, PCTS, {"ttft": 10})
    assert m["completed"] == 0 and m["failed"] == 2
    assert m["total_output_tokens"] == 0
    assert m["mean_ttft_ms"] == 0.0 and m["p99_e2el_ms"] == 0.0
    assert m["request_goodput"] == 0.0
    assert m["max_concurrent_requests"] == 0


def test_peak_concurrency_and_peak_output_tokens_per_second() -> None:
    a = rec(0.1, [0.2, 0.3], sent=0.0, latency=1.0)  # tokens at 0.1, 0.3, 0.6
    b = rec(0.1, [0.5], sent=0.5, latency=1.0)  # tokens at 0.6, 1.1
    c = rec(0.2, [], sent=1.0, latency=0.5)  # token at 1.2; starts when a ends
    m = vllm_metrics([a, b, c], 2.0, PCTS)
    assert m["max_concurrent_requests"] == 2  # half-open intervals: a ends as c starts
    assert m["max_output_tokens_per_s"] == 4.0  # bucket [0, 1) holds 4 tokens


def test_client_queue_keys_follow_vllm() -> None:
    r = rec(0.1, [0.1])
    r.client_queue_s = 0.5
    m = vllm_metrics([r], 1.0, PCTS, max_concurrency=4)
    assert m["mean_client_queue_time_ms"] == pytest.approx(500)
    assert "mean_e2el_including_client_queue_ms" not in m  # vLLM: only with a finite rate
    m = vllm_metrics([r], 1.0, PCTS, max_concurrency=4, rate=2.0)
    assert m["mean_e2el_including_client_queue_ms"] == pytest.approx(700)
    assert "mean_client_queue_time_ms" not in vllm_metrics([r], 1.0, PCTS)


def test_schedule_lag_mismatches_and_errors() -> None:
    a = rec(0.1, [0.1])
    a.schedule_lag_s = 0.002
    b = rec(0.1, [0.1], out=3)
    b.token_mismatch = ["completion_tokens 3 != requested 2"]
    b.schedule_lag_s = 0.010
    c = rec(0, [], success=False)
    m = path_metrics([a, b, c], 1.0, PCTS, None, max_concurrency=None, rate=None)
    assert m["mean_schedule_lag_ms"] == pytest.approx(4.0)
    assert m["max_schedule_lag_ms"] == pytest.approx(10.0)
    assert m["token_mismatches"] == 1
    assert "completion_tokens 3" in m["token_mismatch_examples"][0]
    assert m["errors"] == {"boom": 1}
    assert m["num_requests"] == 3
    assert "stages" not in m  # direct records: no pipeline figures


def _pipe(latency: float, stages: dict[str, float], engine: float, attempt: int = 1) -> RequestRecord:
    r = rec(stages["engine_ttft"], [stages["decode"]], latency=latency, path="pipeline")
    r.stages_s = dict(stages)
    r.server_e2e_s = sum(stages.values())
    r.client_s = latency - r.server_e2e_s
    r.engine_time_s = engine
    r.attempt = attempt
    r.job_id = "j1"
    return r


def test_pipeline_stage_breakdown_efficiency_and_redeliveries() -> None:
    st1 = dict.fromkeys(STAGE_NAMES, 0.01)
    st2 = dict.fromkeys(STAGE_NAMES, 0.03)
    r1 = _pipe(0.10, st1, engine=0.02)  # client = 0.10 - 0.08 = 0.02
    r2 = _pipe(0.30, st2, engine=0.06, attempt=2)  # client = 0.30 - 0.24 = 0.06
    m = pipeline_metrics([r1, r2], PCTS)
    assert set(m["stages"]) == set(BREAKDOWN_NAMES)
    assert m["stages"]["queue_wait"]["mean_ms"] == pytest.approx(20.0)
    assert m["stages"]["queue_wait"]["p50_ms"] == pytest.approx(20.0)
    assert m["stages"]["client"]["mean_ms"] == pytest.approx(40.0)
    assert m["stages"]["client"]["share"] == pytest.approx(40 / 200)
    shares = sum(m["stages"][n]["share"] for n in BREAKDOWN_NAMES)
    assert shares == pytest.approx(1.0)  # stages + client add up to the client's E2EL
    assert m["mean_engine_time_ms"] == pytest.approx(40.0)
    assert m["mean_efficiency"] == pytest.approx(0.2)
    assert m["engine_time_share"] == pytest.approx(0.08 / 0.40)
    assert m["redelivered_jobs"] == 1


def test_pipeline_tpot_uses_the_engine_stream_not_the_client_latency() -> None:
    r = rec(0.1, [0.01, 0.01, 0.01], latency=2.0, path="pipeline")  # 2 s of queueing in the latency
    assert r.tpot_s == pytest.approx(0.01)
    m = vllm_metrics([r], 1.0, PCTS)
    assert m["mean_e2el_ms"] == pytest.approx(2000.0)
    assert m["mean_tpot_ms"] == pytest.approx(10.0)


def test_overhead_is_difference_and_ratio() -> None:
    p = {"mean_e2el_ms": 150.0, "request_throughput": 9.0, "p99_ttft_ms": None}
    d = {"mean_e2el_ms": 100.0, "request_throughput": 10.0, "p99_ttft_ms": 5.0}
    o = overhead(p, d, [99])
    assert o["mean_e2el_ms"] == {"pipeline": 150.0, "direct": 100.0, "diff": 50.0, "ratio": 1.5}
    assert o["request_throughput"]["ratio"] == pytest.approx(0.9)
    assert o["p99_ttft_ms"]["diff"] is None


def test_paired_e2el_takes_the_difference_per_request_not_between_medians() -> None:
    # Lengths vary by request: the direct path's median request is not the pipeline's, so the
    # medians differ by 400 ms, while every request took exactly 5 ms longer through the pipeline.
    base = [1.0, 2.0, 3.0, 4.0]
    recs = [rec(0.1, [], latency=b + 0.005, path="pipeline", index=i) for i, b in enumerate(base)]
    recs += [rec(0.1, [], latency=b, path="direct", index=i) for i, b in enumerate(base)]
    recs.append(rec(0.1, [], latency=0.5, path="direct", index=9))  # no pipeline twin: not a pair
    recs.append(rec(0.1, [], success=False, path="pipeline", index=9))
    recs.append(rec(0.1, [], latency=4.0, path="pipeline", index=3))  # same index, another step
    recs[-1].step = 1
    p = paired_e2el(recs, PCTS)
    assert p is not None and p["pairs"] == 4
    for key in ("mean_e2el_diff_ms", "median_e2el_diff_ms", "p90_e2el_diff_ms", "p99_e2el_diff_ms"):
        assert p[key] == pytest.approx(5.0), key
    med = vllm_metrics([r for r in recs if r.path == "pipeline" and r.step == 0], 10.0, PCTS)
    assert med["median_e2el_ms"] - vllm_metrics(recs[4:9], 10.0, PCTS)["median_e2el_ms"] > 400
    assert paired_e2el([r for r in recs if r.path == "direct"], PCTS) is None


def test_prefix_cache_delta_from_metrics_text() -> None:
    def text(q: float, h: float) -> str:
        return (
            f'# TYPE x counter\n{VllmMetric.PREFIX_QUERIES}{{engine="0",model_name="m"}} {q}\n'
            f'{VllmMetric.PREFIX_HITS}{{engine="0",model_name="m"}} {h}\n'
        )

    d = prefix_cache_delta(parse_prometheus(text(100, 10)), parse_prometheus(text(1100, 410)))
    assert d is not None
    assert d["queries"] == 1000 and d["hits"] == 400 and d["hit_rate"] == pytest.approx(0.4)
    assert prefix_cache_delta(None, []) is None
    empty = prefix_cache_delta([], [])
    assert empty is not None and empty["hit_rate"] is None


def test_knee_by_throughput_gain_and_by_latency() -> None:
    k = find_knee([1, 2, 4, 8, 16], [10, 19, 36, 40, 41], [10, 10, 11, 12, 14], 0.25, 10)
    assert k["saturated_index"] == 3 and k["knee_index"] == 2 and k["knee_load"] == 4
    assert k["gains"][1] == pytest.approx(0.9)
    assert "throughput gain" in k["reason"]
    k = find_knee([1, 2, 4], [10, 20, 40], [10, 50, 150], 0.25, 10)
    assert k["saturated_index"] == 2 and k["knee_index"] == 1 and "TTFT" in k["reason"]
    k = find_knee([1, 2, 4], [10, 20, 40], [10, 10, 10], 0.25, 10)
    assert not k["saturated"] and k["knee_index"] == 2
    k = find_knee([2, 3], [10, 11], [1, 1], 0.25, 10)  # +50 % load, +10 % throughput: gain 0.2
    assert k["saturated_index"] == 1 and k["gains"][1] == pytest.approx(0.2)


def test_gpu_window_energy_from_counters_and_window() -> None:
    t0 = 1_000_000_000_000
    s = [
        GpuSample(index=0, name="H200", t=t0 - 5_000_000_000, energy_mj=0, util_pct=0),  # before the window
        GpuSample(index=0, name="H200", t=t0, energy_mj=1000, util_pct=50, power_w=100, vram_used_bytes=5),
        GpuSample(
            index=0,
            name="H200",
            t=t0 + 1_000_000_000,
            energy_mj=6000,
            util_pct=100,
            power_w=300,
            vram_used_bytes=7,
        ),
    ]
    out = summarize_samples(
        [("n", x) for x in s], output_tokens=10, t_start_ns=t0, t_end_ns=t0 + 1_000_000_000
    )
    assert out is not None
    assert out["energy_j"] == pytest.approx(5.0)
    assert out["energy_per_output_token_j"] == pytest.approx(0.5)
    assert out["util_mean_pct"] == pytest.approx(75.0)
    assert out["vram_peak_bytes"] == 7
    assert out["gpus"][0]["samples"] == 2
    # without an energy counter: power integrated over time (trapezoid: 200 W × 1 s)
    no_ctr = [x.model_copy(update={"energy_mj": None}) for x in s[1:]]
    out = summarize_samples([("n", x) for x in no_ctr], 0, t0, t0 + 1_000_000_000)
    assert out is not None and out["energy_j"] == pytest.approx(200.0)
    assert out["energy_per_output_token_j"] is None
    assert summarize_samples([], 1, 0, 1) is None


def test_gpu_stream_entries_as_the_worker_publishes_them() -> None:
    smps = [GpuSample(index=i, name="H200", t=5, util_pct=10.0 * i, processes={7: 100}) for i in range(2)]
    assert parse_entry({SAMPLES_FIELD: encode_samples(smps)}) == smps
    assert parse_entry({SAMPLES_FIELD: "not json"}) == []
    assert parse_entry({"other": "x"}) == []


def test_no_nan_from_a_zero_duration() -> None:
    m = vllm_metrics([rec(0.1, [0.1])], 0.0, PCTS)
    assert math.isnan(m["request_throughput"])  # written as null in summary.json
    assert np.isfinite(m["mean_ttft_ms"])


async def test_gpu_run_window_reads_the_nodes_samples_from_redis(redis_server: RedisServer) -> None:
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_port=redis_server.port,
        redis_password=redis_server.password,
        redis_prefix=f"tb{new_id()[-8:]}:",
    )
    keys = Keys(s.redis_prefix)
    t0 = now_ns()
    frames = [
        [
            GpuSample(
                index=0,
                name="H200",
                t=t0 + k * 100_000_000,
                energy_mj=1000 * k,
                util_pct=50.0,
                vram_used_bytes=k,
            )
        ]
        for k in range(5)
    ]
    r = redis_client(s)
    try:
        await r.sadd(keys.nodes, "n1")
        await publish_samples(r, keys, "n1", FakeGpuBackend(frames=frames), 0.0, count=5)
    finally:
        await r.aclose()
    out = await run_window(s, t0, t0 + 300_000_000, output_tokens=6)  # the last sample is past the window
    assert out is not None
    assert out["gpus"][0]["node"] == "n1" and out["gpus"][0]["samples"] == 4
    assert out["energy_j"] == pytest.approx(3.0)
    assert out["energy_per_output_token_j"] == pytest.approx(0.5)
    assert out["vram_peak_bytes"] == 3
    nothing = s.model_copy(update={"redis_prefix": "tbnone:"})
    assert await run_window(nothing, t0, t0 + 1, 1) is None
