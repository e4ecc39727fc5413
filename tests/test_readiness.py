"""install.sh's readiness wait: progress, and a failing engine explained instead of waited on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from services.lifecycle import readiness
from services.lifecycle.readiness import wait
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
    tmp_path: Path,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = _settings(tmp_path, redis_server)
    log = tmp_path / "log" / "engine.log"
    log.write_text("an old start that failed: CUDA out of memory\n")  # before the wait: ignored
    # The crash is written once the wait has checked the services once (it has taken the log's
    # offset before that): after the wait began, whatever the machine's speed.
    polled = threading.Event()

    def checks_once_seen(settings: Settings) -> dict[str, bool]:
        state = real_checks(settings)
        polled.set()
        return state

    real_checks = readiness.checks
    monkeypatch.setattr(readiness, "checks", checks_once_seen)

    def engine_crashes() -> None:
        assert polled.wait(30)
        with log.open("a") as f:
            f.write("Loading weights 40%\n")
            f.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")

    threading.Thread(target=engine_crashes).start()
    assert wait(s, timeout=60) is False
    out = capsys.readouterr().out
    assert "timed out" not in out  # it stopped on the explained failure, not at the timeout
    assert "the engine failed:" in out and "memory" in out.lower()
    assert "redis ok" in out and "engine .." in out


def test_timeout_when_nothing_answers(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    s = _settings(tmp_path, redis_server)
    assert wait(s, timeout=1.5) is False
    assert "timed out" in capsys.readouterr().out


def test_a_gpu_engines_model_download_shows_as_cache_growth(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A MODEL changed after install is downloaded by vLLM itself, with its progress bars off:
    # the growing hub cache is then the only sign of progress.
    s = _settings(tmp_path, redis_server).model_copy(
        update={"engine_kind": "gpu", "model": "org/big-model", "hf_home": str(tmp_path / "hf")}
    )
    blobs = tmp_path / "hf" / "hub" / "models--org--big-model" / "blobs"
    blobs.mkdir(parents=True)
    stop = threading.Event()

    def download() -> None:
        with (blobs / "f00d.1234abcd.incomplete").open("wb") as f:
            while not stop.is_set():
                f.write(b"\0" * 2_000_000)
                f.flush()
                time.sleep(0.1)

    t = threading.Thread(target=download)
    t.start()
    try:
        assert wait(s, timeout=3.5, every_s=1.0) is False
    finally:
        stop.set()
        t.join()
    out = capsys.readouterr().out
    assert "engine: model cache " in out and " GB (+" in out and " MB/s)" in out
