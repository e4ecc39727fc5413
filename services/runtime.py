"""Process start-up shared by the services: logging and the event loop.

Kept apart so every service starts the same way, and so the per-request cost
of a chatty library logger cannot creep back into one of them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
#: Libraries that log every request at INFO: a formatted line per HTTP call is per-job CPU
#: (a few percent of the inference worker's, measured with py-spy) and fills the logs.
_QUIET = ("httpx", "httpcore", "aiohttp.access")


def setup_logging() -> None:
    """INFO logging for llmconsole's own loggers; per-request library chatter at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def freeze_startup_heap() -> None:
    """Collect once, then hide every object alive now from the cyclic collector (``gc.freeze``).

    A process's startup heap (modules, FastAPI, pydantic schemas, numpy) is most of what a full
    (generation 2) collection walks, and it never becomes garbage. Walking it stopped the
    event loop mid-run: 65 and 122 ms in the inference worker, 66 and 75 ms in the bench, in two
    concurrency-32 runs on a 2-core machine (``gc.callbacks`` timing). vLLM
    freezes its own startup heap for the same reason. Frozen objects are still freed by
    reference counting; only a cycle among them would stay, and startup objects live for the
    whole process anyway. Call it once, after imports and set-up, before serving.
    """
    gc.collect()
    gc.freeze()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where installed (uvicorn's own choice), else asyncio's loop.

    The bench runs on it too: its loop stamps when each answer arrived, and a slower loop
    would put its own delay into the figures it reports.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard] on Linux
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def cancel_and_wait(task: asyncio.Task[Any], within_s: float = 5.0) -> bool:
    """Cancel ``task`` and wait for it to end, at most ``within_s``; False if it did not.

    A teardown must not hang on a background loop: a library can swallow a cancel (redis-py can
    finish a command whose task was cancelled, redis/redis-py#2028), and the loop then runs on.
    Such a task is left behind with a warning. An error the task ended with is logged, not raised.
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        logging.getLogger("llmconsole.runtime").warning(
            "%s did not stop within %.0f s of its cancel; left behind", task.get_name(), within_s
        )
        return False
    if not task.cancelled() and (e := task.exception()) is not None:
        logging.getLogger("llmconsole.runtime").warning("%s ended with %r", task.get_name(), e)
    return True
