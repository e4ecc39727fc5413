"""What both of ingestion's doors (the job API and the OpenAI one) check and do to admit a job.

* :func:`key_ok` — the API key, from ``Authorization: Bearer`` or ``X-API-Key``, in constant time.
* :func:`live_nodes` — the models the live nodes serve and their smallest context length, read
  from the node heartbeats at most every couple of seconds.
* :func:`enqueue` — queue a job spec, or raise :class:`Refusal` (Redis full or down: 503; too
  many active jobs: 429), counting refusals and submits for Prometheus.

Each door formats a refusal its own way (``{"detail"}`` or OpenAI's error object); the checks,
the sentences and the counters live here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass, field

from fastapi import FastAPI
from redis.exceptions import OutOfMemoryError

from services import prom
from services.contracts import JobSpec, Keys, NodeHeartbeat
from services.queue import REDIS_DOWN, SubmitOutcome
from services.settings import Settings

#: How long the live nodes' models and context length are reused before Redis is read again.
LIVE_NODES_TTL_S = 2.0
#: The sentence a submit gets while Redis is unreachable.
#: Said when the submit's Redis call failed. Not "not accepted": a call cut by a Redis crash may
#: have run (Redis writes its AOF before it replies), and that job then runs.
REDIS_DOWN_DETAIL = (
    "Redis is unavailable; the job was probably not accepted (if Redis failed during the write, "
    "it was). Retry shortly; a retry with the same Idempotency-Key never creates the job twice."
)


def key_ok(settings: Settings, authorization: str | None, x_api_key: str | None) -> bool:
    """True when no key is configured, or the request carries it (Bearer first, as OpenAI
    clients send it; else ``X-API-Key``). Compared in constant time."""
    key = settings.api_key.get_secret_value()
    if not key:
        return True
    scheme, _, cred = (authorization or "").partition(" ")
    given = cred.strip() if scheme.lower() == "bearer" and cred.strip() else (x_api_key or "")
    return hmac.compare_digest(given.encode(), key.encode())


async def live_nodes(app: FastAPI) -> tuple[list[str], int]:
    """The models the live nodes serve (the configured ``MODEL`` before any node is heard) and the
    smallest context length among them (else ``MAX_MODEL_LEN``).

    Read from the node heartbeats at most every :data:`LIVE_NODES_TTL_S`, not per request: they
    change only when an engine restarts with other settings.
    """
    now = asyncio.get_running_loop().time()
    cached: tuple[float, list[str], int] | None = getattr(app.state, "live_nodes", None)
    if cached is not None and now < cached[0]:
        return cached[1], cached[2]
    s: Settings = app.state.settings
    keys: Keys = app.state.keys
    r = app.state.redis
    ids = sorted(await r.smembers(keys.nodes))
    async with r.pipeline(transaction=False) as p:
        for n in ids:
            p.hgetall(keys.node(n))
        hashes = await p.execute()
    models: list[str] = []
    limits: list[int] = []
    for h in hashes:
        if not h:
            continue
        with contextlib.suppress(ValueError):
            hb = NodeHeartbeat.from_redis(h)
            if hb.model and hb.model not in models:
                models.append(hb.model)
            if hb.max_model_len:
                limits.append(hb.max_model_len)
    if not models and s.model:
        models = [s.model]
    limit = min(limits) if limits else s.max_model_len
    app.state.live_nodes = (now + LIVE_NODES_TTL_S, models, limit)
    return models, limit


@dataclass
class Refusal(Exception):
    """A job not accepted for a reason of the pipeline's, not of the request's."""

    status: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


async def enqueue(
    app: FastAPI,
    spec: JobSpec,
    t_received: int,
    *,
    idempotency_key: str | None = None,
    fingerprint: str = "",
) -> SubmitOutcome:
    """Queue ``spec`` (``ok``, or ``dup``/``conflict`` for an ``Idempotency-Key``), or raise
    :class:`Refusal`. Nothing is written when it refuses."""
    s: Settings = app.state.settings
    full = app.state.memory.refusal()
    if full is not None:
        # Redis near its maxmemory: refuse before it would refuse the results of accepted jobs.
        prom.JOBS_REFUSED.labels("redis_full").inc()
        raise Refusal(503, full, {"Retry-After": "2"})
    try:
        out: SubmitOutcome = await app.state.queue.submit(
            spec,
            t_received,
            max_active=s.max_active_jobs,
            idempotency_key=idempotency_key,
            idempotency_ttl_s=s.idempotency_ttl_s,
            fingerprint=fingerprint,
        )
    except REDIS_DOWN:
        prom.JOBS_REFUSED.labels("redis_down").inc()
        raise Refusal(503, REDIS_DOWN_DETAIL, {"Retry-After": "1"}) from None
    except OutOfMemoryError:
        # Redis reached maxmemory before the 200 ms gauge saw it: the script wrote nothing.
        prom.JOBS_REFUSED.labels("redis_full").inc()
        raise Refusal(503, app.state.memory.refusal(redis_refused=True), {"Retry-After": "2"}) from None
    if out.status == "busy":
        prom.JOBS_REFUSED.labels("busy").inc()
        raise Refusal(
            429,
            f"too many active jobs ({out.active} ≥ {s.max_active_jobs}); retry later",
            {"Retry-After": "1"},
        )
    if out.status == "ok":
        prom.JOBS.labels("submitted").inc()
    return out
