"""Prometheus parsing used for vLLM's /metrics."""

from __future__ import annotations

import pytest

from services.engine_client import histogram_quantile, metric_sum, parse_prometheus

TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:prefix_cache_hits_total{engine="0",model_name="a \\"quoted\\", name"} 10.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 8.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 8.0
process_start_time_seconds 1.7e9
"""


def test_parse_and_sum() -> None:
    samples = parse_prometheus(TEXT)
    assert metric_sum(samples, "vllm:num_requests_running") == 3.0
    assert metric_sum(samples, "vllm:prefix_cache_hits_total") == 15.0
    assert metric_sum(samples, "missing") is None
    quoted = next(
        s for s in samples if s.name == "vllm:prefix_cache_hits_total" and s.labels["engine"] == "0"
    )
    assert quoted.labels["model_name"].replace("\\", "") == 'a "quoted", name'
    assert quoted.labels["engine"] == "0"


def test_histogram_quantile() -> None:
    samples = parse_prometheus(TEXT)
    # Median: rank 4 of 8 falls in (0.1, 1.0], 2 of 4 observations into it → 0.1 + 0.9 * 0.5.
    assert histogram_quantile(samples, "vllm:time_to_first_token_seconds", 0.5) == pytest.approx(0.55)
    assert histogram_quantile(samples, "vllm:time_to_first_token_seconds", 0.2) == pytest.approx(0.08)
    assert histogram_quantile(samples, "nothing", 0.5) is None
