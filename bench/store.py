"""Benchmark runs in Redis, for the console (key names from :class:`services.contracts.Keys`).

Layout (all under the stack's key prefix):

``Keys.runs`` (sorted set)
    run id → start time in seconds since the epoch (float).
``Keys.run(run_id)`` (hash)
    ``run_id``, ``state`` (:class:`~services.contracts.RunState`), ``label``,
    ``path``, ``t_start`` and ``t_end`` (wall clock ns), ``params`` (the
    resolved :class:`~bench.config.BenchConfig` as JSON), ``out_dir``,
    live progress ``done`` / ``failed`` / ``total`` / ``phase`` / ``step`` /
    ``steps`` / ``load`` (updated about twice a second while running),
    ``summary`` (the summary JSON, when finished), ``error`` (when failed),
    ``engine``, ``model``, ``records`` (how many per-request records the run's
    folder holds).

Redis keeps only that: the per-request records (ITLs and all) live in the run's
folder (``out_dir``: ``requests.jsonl``), read from there by
:func:`load_stored_run`. The hash expires after ``RUN_RETENTION_S``, and the
proxy worker's retention (``services.retention``) prunes the oldest runs beyond
``RUN_RETENTION_MAX``. ``Keys.run_jobs`` lists of older versions are deleted
with their run.

Storing is best effort: a benchmark of the direct path needs no Redis, so
when Redis cannot be reached the run goes on and only the folder is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from bench.records import RequestRecord
from services.contracts import Keys, RunState, now_ns
from services.queue import REDIS_DOWN, redis_client
from services.settings import Settings

log = logging.getLogger("llmconsole.bench.store")

#: The file of a run folder that holds its per-request records (as ``bench.report`` writes it).
RECORDS_FILE = "requests.jsonl"


class RunStore:
    """Writes one run's hash, progress, records and summary; silent no-op when Redis is down."""

    def __init__(self, settings: Settings, enabled: bool = True) -> None:
        self.keys = Keys(settings.redis_prefix)
        self.ttl_s = settings.run_retention_s
        self.r = redis_client(settings) if enabled else None
        self.ok = enabled
        self.warning: str | None = None

    async def aclose(self) -> None:
        """Close the Redis connection."""
        if self.r is not None:
            await self.r.aclose()

    async def _do(self, what: str, coro: Any) -> bool:
        if not self.ok:
            coro.close()
            return False
        try:
            await coro
            return True
        except (*REDIS_DOWN, RedisError) as e:
            self.ok = False
            self.warning = f"run not stored in Redis ({what}: {e.__class__.__name__}: {e})"
            log.warning(self.warning)
            return False

    async def start(self, run_id: str, params: dict[str, Any], out_dir: str, total: int) -> bool:
        """Register a running run (hash + sorted set entry)."""
        if self.r is None:
            return False
        t = now_ns()
        fields = {
            "run_id": run_id,
            "state": RunState.RUNNING.value,
            "label": params.get("label") or "",
            "path": params.get("path") or "",
            "t_start": str(t),
            "params": json.dumps(params),
            "out_dir": out_dir,
            "done": "0",
            "failed": "0",
            "total": str(total),
            "phase": "prepare",
        }

        async def go() -> None:
            assert self.r is not None
            async with self.r.pipeline(transaction=True) as p:
                p.hset(self.keys.run(run_id), mapping=fields)
                p.expire(self.keys.run(run_id), self.ttl_s)
                p.delete(self.keys.run_jobs(run_id))
                p.zadd(self.keys.runs, {run_id: t / 1e9})
                await p.execute()

        return await self._do("start", go())

    async def progress(self, run_id: str, fields: dict[str, Any]) -> None:
        """Update live progress fields of the run hash."""
        if self.r is None:
            return
        await self._do(
            "progress", self.r.hset(self.keys.run(run_id), mapping={k: str(v) for k, v in fields.items()})
        )

    async def add_records(self, run_id: str, records: list[RequestRecord]) -> None:
        """Note how many per-request records the run has; they stay in its folder, not in Redis."""
        if self.r is None or not records:
            return
        await self._do("records", self.r.hset(self.keys.run(run_id), "records", str(len(records))))

    async def finish(self, run_id: str, summary: dict[str, Any]) -> None:
        """Mark the run finished with its summary."""
        if self.r is None:
            return
        fields = {
            "state": RunState.FINISHED.value,
            "t_end": str(now_ns()),
            "summary": json.dumps(summary),
            "phase": "done",
            "engine": summary.get("engine") or "",
            "model": summary.get("model_id") or "",
        }
        await self._do("finish", self._final(run_id, fields))

    async def _final(self, run_id: str, fields: dict[str, str]) -> None:
        assert self.r is not None
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.keys.run(run_id), mapping=fields)
            p.expire(self.keys.run(run_id), self.ttl_s)
            await p.execute()

    async def fail(self, run_id: str, error: str) -> None:
        """Mark the run failed (or cancelled) with a reason."""
        if self.r is None:
            return
        fields = {
            "state": RunState.FAILED.value,
            "t_end": str(now_ns()),
            "error": error[:2000],
            "phase": "done",
        }
        await self._do("fail", self._final(run_id, fields))


async def list_stored_runs(settings: Settings, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` runs in Redis: their hashes without ``summary`` and ``params`` blobs, newest first."""
    keys = Keys(settings.redis_prefix)
    r = redis_client(settings)
    try:
        ids = await r.zrevrange(keys.runs, 0, max(limit - 1, 0))
        out: list[dict[str, Any]] = []
        for run_id in ids:
            h = await r.hgetall(keys.run(run_id))
            if h:
                out.append({k: v for k, v in h.items() if k not in ("summary", "params")})
        return out
    finally:
        await r.aclose()


def records_note(run_id: str, out_dir: str | None) -> str:
    """The sentence shown when a run's per-request records are not at hand."""
    where = f"its folder {out_dir}" if out_dir else "its results folder"
    return (
        f"run {run_id}: per-request records are not kept in Redis (only the summary, for "
        f"RUN_RETENTION_S); they live in {where}, which is not readable here"
    )


def read_folder_records(out_dir: str | Path | None) -> list[RequestRecord] | None:
    """The records in a run folder's ``requests.jsonl``, or None when the file is not there."""
    if not out_dir:
        return None
    path = Path(out_dir) / RECORDS_FILE
    try:
        with path.open(encoding="utf-8") as fh:
            return [RequestRecord.from_dict(json.loads(line)) for line in fh if line.strip()]
    except (OSError, ValueError):
        return None


async def load_stored_run(
    settings: Settings, run_id: str
) -> tuple[dict[str, Any], list[RequestRecord]] | None:
    """A run's hash (``summary`` and ``params`` decoded) and its records, or None if unknown.

    The records come from the run's folder (``out_dir``); when it cannot be read they are empty
    and ``records_missing`` in the hash says why (:func:`records_note`).
    """
    keys = Keys(settings.redis_prefix)
    r = redis_client(settings)
    try:
        h: dict[str, Any] = await r.hgetall(keys.run(run_id))
        if not h:
            return None
        for k in ("summary", "params"):
            if h.get(k):
                h[k] = json.loads(h[k])
        raw = await r.lrange(keys.run_jobs(run_id), 0, -1)  # a run stored by an older version
    finally:
        await r.aclose()
    if raw:
        return h, [RequestRecord.from_dict(json.loads(x)) for x in raw]
    records = read_folder_records(h.get("out_dir"))
    if records is None:
        h["records_missing"] = records_note(run_id, h.get("out_dir"))
        records = []
    return h, records


def find_run(arg: str, settings: Settings) -> Any:
    """A run named on the command line: a folder, a run id under ``RESULTS_DIR``, or a run id
    Redis still holds (its summary; records from its folder when readable).

    Returns a :class:`bench.runner.RunResult` whose ``warnings`` say what is missing (records
    pruned from Redis, folder gone). Raises ValueError with a sentence when the run is nowhere.
    """
    import asyncio

    from bench.config import BenchConfig
    from bench.report import SUMMARY_FILE, load_run
    from bench.runner import RunResult
    from services.contracts import valid_id

    results_dir = Path(settings.results_dir)
    for cand in (Path(arg), results_dir / arg):
        if (cand / SUMMARY_FILE).is_file() or (cand.name == SUMMARY_FILE and cand.is_file()):
            return load_run(cand)
    nowhere = f"{arg}: not a run folder (no {SUMMARY_FILE}), and no run of that id under {results_dir}"
    if not valid_id(arg):
        raise ValueError(nowhere)
    try:
        stored = asyncio.run(load_stored_run(settings, arg))
    except (*REDIS_DOWN, RedisError) as e:
        raise ValueError(f"{nowhere}, and Redis could not be asked ({e.__class__.__name__})") from None
    if stored is None:
        raise ValueError(
            f"{nowhere}, and Redis no longer holds it (it keeps the newest {settings.run_retention_max} "
            f"runs for {settings.run_retention_s} s: RUN_RETENTION_MAX, RUN_RETENTION_S)"
        )
    h, records = stored
    out_dir = h.get("out_dir") or ""
    if out_dir and (Path(out_dir) / SUMMARY_FILE).is_file():
        return load_run(out_dir)
    summary = h.get("summary")
    if not isinstance(summary, dict):
        raise ValueError(f"run {arg} is {h.get('state') or 'unknown'} in Redis, with no summary yet")
    try:
        config = BenchConfig.model_validate(h.get("params") or {})
    except ValueError:
        config = BenchConfig()
    notes = [
        h.get("records_missing") or f"run {arg}: summary read from Redis; its folder {out_dir} is missing"
    ]
    return RunResult(arg, config, summary, records, None, RunState(h.get("state") or "finished"), notes)
