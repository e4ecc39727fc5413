"""The pipeline's Prometheus metrics: one module, imported by every service.

Names follow vLLM's own conventions so one Prometheus scrapes the engine and
the pipeline alike: a namespace prefix with a colon (``llmconsole:`` as vLLM's
``vllm:``), ``_total`` counters, ``_seconds`` histograms, and labels such as
``node`` and ``model_name``. Each figure is counted once, by the process where
it happens:

* ingestion: jobs accepted and refused; queue depth, running and active jobs
  (read from Redis when scraped, so they are exact at scrape time);
* proxy worker: jobs ending by state, retries and reclaims, per-stage latency
  histograms (``contracts.STAGES``, observed once per succeeded job at its
  fenced finish, where every timestamp is known), routing decisions per node
  and policy, jobs in flight;
* inference worker: requests by outcome, in flight, prompt and cached prompt
  tokens per node (their ratio is the node's prefix-cache hit rate).

Cost per job: a few counter increments and histogram observations (about a
microsecond each); nothing per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from services.contracts import STAGES, TIMESTAMPS

log = logging.getLogger("llmconsole.prom")

#: Prefix of every pipeline metric (vLLM's are ``vllm:``).
NAMESPACE = "llmconsole:"

#: Seconds; from sub-millisecond pipeline hops to long generations (vLLM's TTFT buckets, extended down).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)

# --- ingestion ------------------------------------------------------------------
JOBS = Counter(
    f"{NAMESPACE}jobs",
    "Jobs by the state they reached: submitted (ingestion), succeeded, failed or dead (proxy worker).",
    ["state"],
)
JOBS_REFUSED = Counter(
    f"{NAMESPACE}jobs_refused",
    "Submits refused by ingestion: busy (429, too many active jobs), redis_down (503) or redis_full "
    "(503, Redis at REDIS_MEMORY_REFUSE_PCT of its maxmemory).",
    ["reason"],
)
QUEUE_DEPTH = Gauge(f"{NAMESPACE}queue_depth", "Jobs in the stream not yet taken by any proxy worker.")
JOBS_RUNNING = Gauge(f"{NAMESPACE}jobs_running", "Jobs taken by a proxy worker and not yet finished.")
JOBS_ACTIVE = Gauge(f"{NAMESPACE}jobs_active", "Jobs not in a final state (queued + running).")

# --- proxy worker ---------------------------------------------------------------
STAGE_SECONDS = Histogram(
    f"{NAMESPACE}job_stage_seconds",
    "Per-stage duration of succeeded jobs (services.contracts.STAGES: adjacent job timestamps).",
    ["stage", "node"],
    buckets=LATENCY_BUCKETS,
)
E2E_SECONDS = Histogram(
    f"{NAMESPACE}job_e2e_seconds",
    "Server-side end-to-end time of succeeded jobs: received by ingestion to finished.",
    ["node"],
    buckets=LATENCY_BUCKETS,
)
ROUTING_DECISIONS = Counter(
    f"{NAMESPACE}routing_decisions",
    "Dispatches of a job to a node, by the node chosen and the routing policy that chose it.",
    ["node", "policy"],
)
JOB_RETRIES = Counter(f"{NAMESPACE}job_retries", "Failed tries that were retried (engine 5xx, timeouts).")
JOBS_RECLAIMED = Counter(f"{NAMESPACE}jobs_reclaimed", "Jobs taken over from a proxy worker that stopped.")
PROXY_IN_FLIGHT = Gauge(f"{NAMESPACE}proxy_jobs_in_flight", "Jobs this proxy worker is running now.")
PROXY_NODES = Gauge(
    f"{NAMESPACE}proxy_nodes_live",
    "Nodes this proxy worker saw up and ready at its last registry refresh (REGISTRY_REFRESH_S).",
)

# --- inference worker -----------------------------------------------------------
WORKER_REQUESTS = Counter(
    f"{NAMESPACE}worker_requests",
    "Inference requests by outcome: ok, overloaded (503), retryable (502) or refused (422).",
    ["node", "model_name", "outcome"],
)
WORKER_IN_FLIGHT = Gauge(
    f"{NAMESPACE}worker_requests_in_flight", "Requests this inference worker is serving now.", ["node"]
)
WORKER_PROMPT_TOKENS = Counter(
    f"{NAMESPACE}worker_prompt_tokens",
    "Prompt tokens served (engine usage), per node.",
    ["node", "model_name"],
)
WORKER_CACHED_TOKENS = Counter(
    f"{NAMESPACE}worker_prompt_tokens_cached",
    "Prompt tokens the engine served from its prefix cache (usage.prompt_tokens_details), per node.",
    ["node", "model_name"],
)


def render() -> tuple[bytes, str]:
    """The text exposition of every metric of this process, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def set_queue(waiting: int, running: int, active: int) -> None:
    """Set the queue gauges (ingestion, just before rendering a scrape)."""
    QUEUE_DEPTH.set(waiting)
    JOBS_RUNNING.set(running)
    JOBS_ACTIVE.set(active)


def track(gauge: Gauge, read: Callable[[], float], **labels: str) -> None:
    """Make ``gauge`` read its value from ``read()`` at every scrape (no per-job cost)."""
    (gauge.labels(**labels) if labels else gauge).set_function(read)


def observe_job(timestamps: Mapping[str, Any], node: str) -> None:
    """Observe the stage histograms and the end-to-end time of one succeeded job.

    ``timestamps`` maps ``t_*`` names to nanoseconds (ints or the strings of a
    Redis hash); a stage with a missing or backwards timestamp is skipped.
    """
    ts: dict[str, int] = {}
    for name in TIMESTAMPS:
        v = timestamps.get(name)
        if v is None or v == "":
            continue
        try:
            ts[name] = int(v)
        except (TypeError, ValueError):
            continue
    for st in STAGES:
        a, b = ts.get(st.start), ts.get(st.end)
        if a is not None and b is not None and b >= a:
            STAGE_SECONDS.labels(st.name, node).observe((b - a) / 1e9)
    a, b = ts.get("t_received"), ts.get("t_finished")
    if a is not None and b is not None and b >= a:
        E2E_SECONDS.labels(node).observe((b - a) / 1e9)


def serve(host: str, port: int) -> Any | None:
    """Serve ``/metrics`` on ``host:port`` from a background thread (the proxy worker's).

    Returns the server (``shutdown()`` stops it), or None when ``port`` is 0 or
    taken: metrics are never a reason for a worker not to run.
    """
    if port <= 0:
        return None
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as e:
        log.warning("metrics not served: cannot bind %s:%d (%s); set PROXY_METRICS_PORT", host, port, e)
        return None
    log.info("metrics at http://%s:%d/metrics", host, port)
    return server
