"""Wait, with visible progress, until every service of the stack is ready.

``python -m services.lifecycle.readiness --timeout 600`` checks Redis (PING), the engine
(``/health``), the inference worker and ingestion (``/readyz``) and prints one
status line a second. If supervisord reports a program as FATAL (it gave up
restarting it), it stops waiting and says why, with the engine log explained.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from services.lifecycle.engine_launch import explain_engine_failure, hub_cache_dir, hub_model
from services.lifecycle.model_fetch import blob_bytes, repo_cache_dir
from services.lifecycle.supervisor_client import supervisor_proxy
from services.settings import Settings, get_settings


def _check_redis(s: Settings) -> bool:
    r = redis.Redis(
        host=s.redis_host,
        port=s.redis_port,
        password=s.redis_password.get_secret_value() or None,
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False
    finally:
        r.close()


def _check_http(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def checks(s: Settings) -> dict[str, bool]:
    """Readiness of each service right now."""
    return {
        "redis": _check_redis(s),
        "engine": _check_http(f"{s.engine_url}/health"),
        "inference_worker": _check_http(f"{s.worker_url}/readyz"),
        "ingestion": _check_http(f"{s.ingestion_url}/readyz"),
    }


def _fatal_programs(s: Settings) -> list[str]:
    try:
        infos = supervisor_proxy(s.supervisor_socket, timeout=2).supervisor.getAllProcessInfo()
    except Exception:
        return []
    return [i["name"] for i in infos if i.get("statename") in ("FATAL",)]


def _explain_text(text: str) -> str | None:
    return explain_engine_failure(text) if text else None


def _explain(s: Settings, program: str, why_known: bool = False) -> str:
    log = Path(s.var_dir) / "log" / f"{program}.log"
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")[-20000:]
    why = _explain_text(text) if program == "engine" and not why_known else None
    tail = "\n".join("      " + line for line in text.splitlines()[-15:])
    return (f"    why: {why}\n" if why else "") + f"    last lines of {log}:\n{tail}"


class LogWatch:
    """Reads what a log file gained since this watch began (a crash-looping engine's reasons)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.text = ""

    def poll(self) -> str:
        """Append the new part of the file to :attr:`text` (last 1 MB kept) and return it all."""
        try:
            with self.path.open("rb") as f:
                if self.path.stat().st_size < self.offset:  # rotated
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read(4_194_304)
                self.offset += len(chunk)
        except OSError:
            return self.text
        self.text = (self.text + chunk.decode("utf-8", errors="replace"))[-1_048_576:]
        return self.text

    def last_line(self) -> str:
        """The newest non-empty line (progress of a model download or load), shortened."""
        for line in reversed(self.text.replace("\r", "\n").splitlines()):
            if line.strip():
                return line.strip()[-110:]
        return ""


class CacheWatch:
    """How much of the GPU engine's hub model is in the cache, and how fast it grows.

    vLLM downloads a hub model with its progress bars switched off; install.sh downloads it first
    (``engine_launch --fetch``), but a MODEL changed later is downloaded by the engine itself, and
    this is the only sign of progress then.
    """

    def __init__(self, blobs_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.blobs_dir = blobs_dir
        self.clock = clock
        self._last: tuple[float, int] = (clock(), blob_bytes(blobs_dir))

    def line(self) -> str:
        """``model cache 12.3 GB (+210 MB/s)``; the rate since the previous call, when it grew."""
        now, size = self.clock(), blob_bytes(self.blobs_dir)
        t0, size0 = self._last
        self._last = (now, size)
        text = f"model cache {size / 1e9:.1f} GB"
        if size > size0 and now > t0:
            text += f" (+{(size - size0) / (now - t0) / 1e6:.0f} MB/s)"
        return text


def wait(s: Settings, timeout: float, every_s: float = 15.0) -> bool:
    """Block until all checks pass (True) or the timeout / a failing program (False).

    While the engine loads (many minutes for a large model) the newest line of its log is
    shown; a failure the engine log explains (out of memory, no driver, port taken) ends the
    wait at once with that reason, even while supervisord keeps restarting the engine.
    """
    start = time.monotonic()
    last, last_printed = "", -every_s
    engine_log = LogWatch(Path(s.var_dir) / "log" / "engine.log")
    repo = hub_model(s)
    cache = CacheWatch(repo_cache_dir(hub_cache_dir(s), repo) / "blobs") if repo else None
    while True:
        state = checks(s)
        elapsed = time.monotonic() - start
        line = "  ".join(f"{k} {'ok' if v else '..'}" for k, v in state.items())
        text = engine_log.poll()
        if line != last or elapsed - last_printed >= every_s:
            tail = "" if state["engine"] else engine_log.last_line()
            if cache is not None and not state["engine"]:
                tail = f"{cache.line()} · {tail}" if tail else cache.line()
            print(
                f"    [{elapsed:5.0f}s] {line}" + (f"\n             engine: {tail}" if tail else ""),
                flush=True,
            )
            last, last_printed = line, elapsed
        if all(state.values()):
            print(f"    all services ready after {elapsed:.0f}s", flush=True)
            return True
        why = _explain_text(text) if not state["engine"] else None
        if why:
            print(f"    the engine failed: {why}", flush=True)
            print(_explain(s, "engine", why_known=True), flush=True)
            return False
        fatal = _fatal_programs(s)
        if fatal:
            for prog in fatal:
                print(f"    {prog} failed to start (supervisord gave up).", flush=True)
                print(_explain(s, prog), flush=True)
            return False
        if elapsed > timeout:
            print(f"    timed out after {timeout:.0f}s", flush=True)
            for k, v in state.items():
                if not v:
                    print(_explain(s, k), flush=True)
            return False
        time.sleep(1.0)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    sys.exit(0 if wait(get_settings(), args.timeout) else 1)


if __name__ == "__main__":
    main()
