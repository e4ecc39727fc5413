"""The bench's stall notice: said after a silence with requests in flight, and only then."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from bench.config import ProgressEvent
from bench.records import RequestRecord
from bench.runner import _Progress, watch_stalls


async def test_stall_watch_speaks_only_while_requests_wait_in_silence() -> None:
    # A notice after a silence of stall_s with requests in flight, with the diagnosis; none while
    # requests keep finishing, none with nothing in flight.
    events: list[ProgressEvent] = []
    prog = _Progress("run-x", events.append, None, 1)  # type: ignore[arg-type]  # no mirror here
    prog.begin("run", 4, 0, "concurrency 2")
    prog.sent_one()
    prog.sent_one()
    notes: list[str] = []

    async def diagnose() -> str:
        return "2 job(s) wait in the queue"

    task = asyncio.create_task(watch_stalls(prog, diagnose, notes, stall_s=1.0))
    try:
        await _until(lambda: any(e.warning for e in events), 10)
        warning = next(e.warning for e in events if e.warning)
        assert warning.startswith("no request has finished in the last ")
        assert warning.endswith("s (2 in flight); 2 job(s) wait in the queue")
        assert len(notes) == 1 and notes[0].endswith(warning)
        # One finished just now: no notice within the next stall_s (watched for under a third of
        # it, so that a loaded machine's slow wake-ups cannot make a notice due meanwhile).
        prog.record(RequestRecord(index=0, path="pipeline", success=True))
        said = sum(1 for e in events if e.warning)
        await asyncio.sleep(0.3)
        assert sum(1 for e in events if e.warning) == said
        # Nothing in flight: silence longer than stall_s is no stall.
        prog.record(RequestRecord(index=1, path="pipeline", success=True))
        await asyncio.sleep(1.6)
        assert sum(1 for e in events if e.warning) == said
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
