"""Process start-up shared by the services (services/runtime.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_freezing_the_startup_heap_leaves_a_full_collection_little_to_walk() -> None:
    # In a fresh interpreter (the test process's own heap stays as it is): a service's imports
    # are tens of thousands of tracked objects that every full collection walks until frozen.
    code = textwrap.dedent(
        """
        import gc, services.ingestion, services.inference_worker
        from services.runtime import freeze_startup_heap
        before = len(gc.get_objects(2)) + len(gc.get_objects(1)) + len(gc.get_objects(0))
        freeze_startup_heap()
        after = len(gc.get_objects(2)) + len(gc.get_objects(1)) + len(gc.get_objects(0))
        print(before, gc.get_freeze_count(), after)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, frozen, after = map(int, out.stdout.split())
    assert before > 50_000 and frozen > 50_000, (before, frozen)
    assert after < 1_000, after  # what the next full collection walks


def test_run_returns_what_main_returned_on_uvloop() -> None:
    import asyncio

    from services.runtime import run

    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop")


async def test_cancel_and_wait_gives_up_on_a_task_that_swallows_its_cancel() -> None:
    import asyncio

    from services.runtime import cancel_and_wait

    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # as a library that swallows the cancel

    async def failing() -> None:
        raise RuntimeError("boom")

    t = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)  # inside its loop (a task cancelled before its first step just ends)
    assert await cancel_and_wait(t, within_s=0.2) is False and not t.done()
    stop.set()
    await t
    plain = asyncio.create_task(asyncio.sleep(10))
    assert await cancel_and_wait(plain) is True and plain.cancelled()
    bad = asyncio.create_task(failing())
    await asyncio.sleep(0)
    assert await cancel_and_wait(bad) is True  # its error is logged, not raised


async def test_the_progress_mirror_stops_when_its_store_swallows_the_cancel() -> None:
    # redis-py can finish a command whose task was cancelled and swallow the cancel
    # (redis/redis-py#2028): the run's teardown cancels the mirror and waits for it.
    import asyncio
    from typing import Any

    from bench.runner import _Progress
    from services.runtime import cancel_and_wait

    called = asyncio.Event()

    class SwallowingStore:
        async def progress(self, run_id: str, fields: dict[str, Any]) -> None:
            called.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return

    store = SwallowingStore()
    prog = _Progress("r1", None, store, 1)  # type: ignore[arg-type]
    task = asyncio.create_task(prog.mirror())
    await called.wait()
    assert await cancel_and_wait(task, within_s=2.0) is True
    assert task.cancelled()
