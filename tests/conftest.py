"""Shared fixtures: a real Redis, and the pipeline as real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stackutil import RedisServer, Stack

#: Fixtures that start real processes: a test using any of them is ``slow`` (not in the fast part).
PROCESS_FIXTURES = frozenset({"redis_server", "stack", "make_stack"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts processes through a shared fixture."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests isolate by key prefix)."""
    srv = RedisServer(tmp_path_factory.mktemp("redis"), password="test-redis-pw")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole pipeline on the simulator, shared by a test module."""
    st = Stack(redis_server, tmp_path_factory.mktemp("stack"))
    try:
        st.start()
    except Exception:
        st.stop()
        raise
    yield st
    st.stop()


@pytest.fixture
def make_stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Factory of stacks with custom settings (stopped at teardown)."""
    made: list[Stack] = []

    def _make(redis: RedisServer | None = None, start: bool = True, **overrides: Any) -> Stack:
        st = Stack(redis or redis_server, tmp_path / f"stack{len(made)}", **overrides)
        made.append(st)
        if start:
            st.start()
        return st

    yield _make
    for st in made:
        st.stop()
