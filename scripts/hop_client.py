#!/usr/bin/env python3
"""CPU per request of the proxy worker's hop to an inference worker: aiohttp against stream_http.

    ./.venv/bin/python scripts/hop_client.py                      # 3 rounds, waves of 32
    ./.venv/bin/python scripts/hop_client.py --rounds 5 --wave 8 --answer-bytes 10000

It starts a bare ASGI app (a process of its own, on the services' uvicorn settings through
``ingest_load.serve_like_ingestion``) that reads a request body and answers ``--answer-bytes``
bytes, the size of a worker's result. Then, on uvloop in this process, it sends the same POSTs in waves of ``--wave``
concurrent requests, alternating per round between an ``aiohttp.ClientSession`` (the proxy's
client before) and a :class:`services.stream_http.StreamPool` read whole with
:func:`services.stream_http.post_read` (the proxy's client now), and prints the CPU time of this
process per request (``time.process_time``: the client's own work, not the server's). A
benchmark, not a test: read the figures side by side, on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402
from ingest_load import free_port, serve_like_ingestion, wait_port  # noqa: E402

from services import stream_http  # noqa: E402


def answering(size: int) -> Any:
    """A bare ASGI app: reads the request body, answers ``size`` bytes."""
    out = b"x" * size
    headers = [(b"content-type", b"application/json"), (b"content-length", str(size).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


async def _measure(args: argparse.Namespace, url: str) -> None:
    body = b'{"spec": "' + b"a" * (args.body_bytes - 12) + b'"}'
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        headers={"Content-Type": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    pool = stream_http.StreamPool(url)

    async def via_aiohttp() -> int:
        async with session.post(f"{url}/v1/infer", data=body) as resp:
            return len(await resp.read())

    async def via_stream_http() -> int:
        _status, answer = await stream_http.post_read(pool, "/v1/infer", body)
        return len(answer)

    clients = (("aiohttp", via_aiohttp), ("stream_http", via_stream_http))
    try:
        for _name, send in clients:  # connections opened outside the measured part
            await asyncio.gather(*(send() for _ in range(args.wave)))
        print(f"CPU of this process per request, µs (waves of {args.wave}, {args.waves} waves a round)")
        for rnd in range(1, args.rounds + 1):
            figures = []
            for name, send in clients:
                c0 = time.process_time()
                for _ in range(args.waves):
                    sizes = await asyncio.gather(*(send() for _ in range(args.wave)))
                    assert all(n == args.answer_bytes for n in sizes)
                per = (time.process_time() - c0) / (args.waves * args.wave) * 1e6
                figures.append(f"{name} {per:6.1f}")
            print(f"round {rnd}: " + "   ".join(figures))
    finally:
        await session.close()
        await pool.aclose()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two clients")
    p.add_argument("--wave", type=int, default=32, help="concurrent requests a wave")
    p.add_argument("--waves", type=int, default=20, help="waves a client a round")
    p.add_argument("--body-bytes", type=int, default=600, help="request body (a job spec is about this)")
    p.add_argument("--answer-bytes", type=int, default=2500, help="answer (a 100-token result is about this)")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the app's own process
    args = p.parse_args(argv)
    if min(args.rounds, args.wave, args.waves) < 1 or args.body_bytes < 16 or args.answer_bytes < 1:
        p.error("--rounds, --wave and --waves must be at least 1, --body-bytes 16, --answer-bytes 1")
    if args.serve is not None:
        serve_like_ingestion(answering(args.answer_bytes), args.serve)
        return 0
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--answer-bytes", str(args.answer_bytes)]
    server = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_port(port)
        uvloop.run(_measure(args, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
