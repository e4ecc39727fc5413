"""Prometheus /metrics of ingestion, proxy worker and inference worker, scraped from real processes."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services import prom
from services.contracts import STAGE_NAMES
from tests.stackutil import Stack, wait_until

pytestmark = pytest.mark.slow


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels); the parser validates the format."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoints(make_stack: Callable[..., Stack]) -> None:
    st = make_stack()
    s = st.settings
    n = 5
    node = st.values["node_id"]
    proxy_url = f"http://127.0.0.1:{st.values['proxy_metrics_port']}/metrics"
    worker_url = f"http://127.0.0.1:{s.worker_port}/metrics"
    with httpx.Client(timeout=30) as c:
        # Both HTTP services want the API key for /metrics, like for their job endpoints.
        assert c.get(f"{s.ingestion_url}/metrics").status_code == 401
        assert c.get(worker_url).status_code == 401
        ids = [st.submit(c, input_tokens=64, output_tokens=4, run_id="promrun") for _ in range(n)]
        for j in ids:
            assert st.wait_job(c, j)["state"] == "succeeded"

        r = c.get(f"{s.ingestion_url}/metrics", headers=st.headers)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        ing = _samples(r.text)
        assert _value(ing, "llmconsole:jobs_total", state="submitted") == n
        assert ("llmconsole:queue_depth", ()) in ing
        assert _value(ing, "llmconsole:jobs_active") == 0

        r = c.get(worker_url, headers=st.headers)
        assert r.status_code == 200
        wk = _samples(r.text)
        model = next(dict(k[1])["model_name"] for k in wk if k[0] == "llmconsole:worker_requests_total")
        assert _value(wk, "llmconsole:worker_requests_total", node=node, model_name=model, outcome="ok") == n
        assert _value(wk, "llmconsole:worker_prompt_tokens_total", node=node, model_name=model) == 64 * n
        assert _value(wk, "llmconsole:worker_requests_in_flight", node=node) == 0

        # The proxy's counters are written right after each job's finish: wait for the last one.
        def proxy_counted() -> bool:
            try:
                px = _samples(c.get(proxy_url).text)
            except httpx.HTTPError:
                return False
            return _value(px, "llmconsole:jobs_total", state="succeeded") == n

        wait_until(proxy_counted, 15, "the proxy worker's /metrics to count every job")
        px = _samples(c.get(proxy_url).text)
    for stage in STAGE_NAMES:
        assert _value(px, "llmconsole:job_stage_seconds_count", stage=stage, node=node) == n, stage
    assert _value(px, "llmconsole:job_e2e_seconds_count", node=node) == n
    assert _value(px, "llmconsole:job_e2e_seconds_bucket", node=node, le="+Inf") == n
    assert _value(px, "llmconsole:proxy_jobs_in_flight") == 0
    assert _value(px, "llmconsole:proxy_nodes_live") == 1
    # Every dispatch is a routing decision, counted per node and policy (the default ROUTING here).
    decisions = {
        labels: v for (name, labels), v in px.items() if name == "llmconsole:routing_decisions_total"
    }
    assert decisions == {(("node", node), ("policy", st.settings.routing)): n}


def test_observe_job_skips_missing_and_backwards_stamps() -> None:
    before = prom.STAGE_SECONDS.labels("ingest", "unit-node")._sum.get()
    count = prom.E2E_SECONDS.labels("unit-node")._sum.get()
    prom.observe_job(
        {
            "t_received": "1000000000",
            "t_enqueued": "1500000000",
            "t_dequeued": "1400000000",
            "t_finished": "",
        },
        "unit-node",
    )
    assert prom.STAGE_SECONDS.labels("ingest", "unit-node")._sum.get() == pytest.approx(before + 0.5)
    # queue_wait is backwards (dequeued before enqueued) and e2e has no t_finished: neither is observed.
    assert prom.STAGE_SECONDS.labels("queue_wait", "unit-node")._sum.get() == 0
    assert prom.E2E_SECONDS.labels("unit-node")._sum.get() == count
