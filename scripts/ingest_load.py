#!/usr/bin/env python3
"""Ingestion against a bare FastAPI app, side by side in one run: accepted jobs/s and the ratio.

    ./.venv/bin/python scripts/ingest_load.py                      # 3 rounds of 8 s, 32 connections
    ./.venv/bin/python scripts/ingest_load.py --appendfsync always # the strict durability setting
    ./.venv/bin/python scripts/ingest_load.py --duration 5 --connections 64 --rounds 2

It starts its own redis-server (AOF on, as production runs it) and the real ingestion service
(``python -m services.ingestion``, with its production server settings), and no proxy worker, so
only ingestion works. Beside it runs a bare FastAPI app on the same server settings (uvicorn,
httptools with the same header bound, no access log) whose handler validates a pydantic body and answers
202: the floor an HTTP service in Python can reach here. wrk (Debian's ``wrk`` package) drives
both with the same POST, alternating rounds so that noise from the shared machine falls on both.
The figure is a ratio measured side by side, never an absolute to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.asgi import BoundedHttpToolsProtocol  # noqa: E402
from services.contracts import JobRequest  # noqa: E402

BODY = {"input_tokens": 1000, "output_tokens": 100}


def bare_app():  # noqa: ANN201 - FastAPI is imported only in the serving process
    """A FastAPI app doing what any JSON API does per request: parse, validate, answer."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/jobs", status_code=202)
    async def submit(job: JobRequest) -> dict[str, str]:
        """Validate the job body and answer like ingestion, without storing anything."""
        return {"job_id": uuid.uuid4().hex, "state": "queued"}

    return app


def serve_bare(port: int) -> None:
    """Run the bare app with ingestion's own uvicorn settings."""
    serve_like_ingestion(bare_app(), port)


def serve_like_ingestion(app: Any, port: int) -> None:
    """Serve ``app`` on 127.0.0.1 with ingestion's uvicorn settings (httptools with the header
    bound, no access log), its startup heap frozen as the services freeze theirs."""
    import uvicorn

    from services import runtime

    runtime.freeze_startup_heap()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        limit_concurrency=4096,
        http=BoundedHttpToolsProtocol,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout:.0f} s")


def wrk(url: str, key: str, duration: float, connections: int, workdir: Path) -> tuple[float, int, int]:
    """(requests/s, requests, non-2xx responses) of one wrk run POSTing a job."""
    lua = workdir / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(bad.group(1)) if bad else 0


def main() -> int:
    """Run the comparison and print one line per round and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian's package)", file=sys.stderr)
        return 2
    redis_exe = shutil.which("redis-server") or "/usr/sbin/redis-server"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="llmc-load-") as tmp:
        work = Path(tmp)
        key = uuid.uuid4().hex
        rport, iport, bport = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "LLMC_ENV_FILE": str(work / "none.env"),
            "REDIS_PORT": str(rport),
            "INGESTION_PORT": str(iport),
            "API_KEY": key,
            "MAX_ACTIVE_JOBS": "100000000",
            "REDIS_PREFIX": "load:",
            "VAR_DIR": str(work),
        }
        try:
            procs.append(
                subprocess.Popen(
                    [
                        redis_exe,
                        "--port",
                        str(rport),
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        str(work),
                        "--save",
                        "",
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        args.appendfsync,
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            wait_port(rport)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.ingestion"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve-bare", str(bport)],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_port(iport)
            wait_port(bport)
            # warm both (imports, first-request paths, Redis script load)
            wrk(f"http://127.0.0.1:{iport}/v1/jobs", key, 1, args.connections, work)
            wrk(f"http://127.0.0.1:{bport}/v1/jobs", key, 1, args.connections, work)
            rows: list[dict[str, float]] = []
            for i in range(args.rounds):
                b = wrk(f"http://127.0.0.1:{bport}/v1/jobs", key, args.duration, args.connections, work)
                g = wrk(f"http://127.0.0.1:{iport}/v1/jobs", key, args.duration, args.connections, work)
                rows.append({"bare_rps": b[0], "ingestion_rps": g[0], "ingestion_non2xx": g[2]})
                if not args.json:
                    print(
                        f"round {i + 1}: bare FastAPI {b[0]:8.0f} req/s   ingestion {g[0]:8.0f} jobs/s"
                        f"   ratio {g[0] / b[0]:.2f}   (ingestion non-2xx: {g[2]})"
                    )
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    bare = sum(r["bare_rps"] for r in rows) / len(rows)
    ing = sum(r["ingestion_rps"] for r in rows) / len(rows)
    summary = {
        "appendfsync": args.appendfsync,
        "connections": args.connections,
        "duration_s": args.duration,
        "rounds": rows,
        "bare_rps_mean": round(bare, 1),
        "ingestion_rps_mean": round(ing, 1),
        "ratio": round(ing / bare, 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"mean: bare {bare:.0f} req/s, ingestion {ing:.0f} jobs/s, ratio {ing / bare:.2f} "
            f"(appendfsync {args.appendfsync}, {args.connections} connections, {args.duration:g} s rounds)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
