"""Wait, with visible progress, until every service of the stack is ready.

``python -m services.readiness --timeout 600`` checks Redis (PING), the engine
(``/health``), the inference worker and ingestion (``/readyz``) and prints one
status line a second. If supervisord reports a program as FATAL (it gave up
restarting it), it stops waiting and says why, with the engine log explained.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import redis

from services.settings import Settings, get_settings
from services.supervisor_client import supervisor_proxy


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
        "inference_worker": _check_http(f"http://{s.worker_host}:{s.worker_port}/readyz"),
        "ingestion": _check_http(f"{s.ingestion_url}/readyz"),
    }


def _fatal_programs(s: Settings) -> list[str]:
    try:
        infos = supervisor_proxy(s.supervisor_socket, timeout=2).supervisor.getAllProcessInfo()
    except Exception:
        return []
    return [i["name"] for i in infos if i.get("statename") in ("FATAL",)]


def _explain(s: Settings, program: str) -> str:
    log = Path(s.var_dir) / "log" / f"{program}.log"
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")[-20000:]
    try:
        from services.engine_launch import explain_engine_failure

        why = explain_engine_failure(text)
    except ImportError:
        why = None
    tail = "\n".join("      " + line for line in text.splitlines()[-15:])
    return (f"    why: {why}\n" if why else "") + f"    last lines of {log}:\n{tail}"


def wait(s: Settings, timeout: float) -> bool:
    """Block until all checks pass (True) or the timeout / a FATAL program (False)."""
    start = time.monotonic()
    last = ""
    while True:
        state = checks(s)
        elapsed = time.monotonic() - start
        line = "  ".join(f"{k} {'ok' if v else '..'}" for k, v in state.items())
        if line != last or int(elapsed) % 15 == 0:
            print(f"    [{elapsed:5.0f}s] {line}", flush=True)
            last = line
        if all(state.values()):
            print(f"    all services ready after {elapsed:.0f}s", flush=True)
            return True
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
