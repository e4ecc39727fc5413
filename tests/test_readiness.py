"""install.sh's readiness wait: progress, and a failing engine explained instead of waited on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from services.readiness import wait
from services.settings import Settings
from tests.stackutil import RedisServer, free_port


def _settings(tmp_path: Path, redis: RedisServer) -> Settings:
    (tmp_path / "log").mkdir()
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=str(tmp_path),
        redis_port=redis.port,
        redis_password=redis.password,
        engine_port=free_port(),
        worker_port=free_port(),
        ingestion_port=free_port(),
    )


def test_engine_failure_in_log_ends_the_wait(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    s = _settings(tmp_path, redis_server)
    log = tmp_path / "log" / "engine.log"
    log.write_text("an old start that failed: CUDA out of memory\n")  # before the wait: ignored

    def engine_crashes() -> None:
        time.sleep(1.5)
        with log.open("a") as f:
            f.write("Loading weights 40%\n")
            f.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")

    threading.Thread(target=engine_crashes).start()
    t0 = time.monotonic()
    assert wait(s, timeout=60) is False
    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    assert "the engine failed:" in out and "memory" in out.lower()
    assert "redis ok" in out and "engine .." in out


def test_timeout_when_nothing_answers(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    s = _settings(tmp_path, redis_server)
    assert wait(s, timeout=1.5) is False
    assert "timed out" in capsys.readouterr().out
