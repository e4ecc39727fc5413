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
