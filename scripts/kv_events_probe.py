"""Does the installed vLLM publish KV cache events? Start it, listen, send two prompts, print them.

Starts the engine of ``ENGINE_KIND`` (``cpu`` by default: vLLM's CPU build and the model
``./install.sh --engine cpu`` prepared) with ``--kv-events-config`` on free loopback ports, as
:mod:`services.lifecycle.engine_launch` builds it. It binds a ZMQ SUB socket where vLLM's PUB
socket connects, sends two completions that share a long prefix, and prints every event batch
as received (maps in vLLM 0.32) and as the worker's mirror reads it. The engine's process group
is stopped at the end. vLLM's CPU build takes one to three minutes to start on 2 cores.

    ./.venv/bin/python scripts/kv_events_probe.py [--prefix-words 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.lifecycle.engine_launch import build_engine_command
from services.routing.kv_events import TOPIC, BlockChains, decode_batch, endpoint
from services.settings import load_settings
from tests.stackutil import free_port


def _short(value: Any) -> Any:
    """A field of an event, shortened for printing."""
    if isinstance(value, bytes):
        return value.hex()[:16]
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items: {', '.join(map(str, value[:4]))}, ...]"
    return value


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Seconds until the engine answers /health (SystemExit if it dies or takes too long)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the engine exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("the engine did not become healthy")


def main() -> int:
    """Run the probe; 0 if at least one event batch came."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix-words", type=int, default=200, help="words of the shared prefix")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the engine")
    ns = ap.parse_args()
    base_settings = load_settings()
    kind = base_settings.engine_kind if base_settings.engine_kind != "sim" else "cpu"
    eport, kport = free_port(), free_port()
    s = load_settings(engine_kind=kind, engine_port=eport, kv_events_port=kport, engine_api_key="")
    argv, env = build_engine_command(s)
    print("engine:", " ".join(argv), flush=True)

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind(endpoint("127.0.0.1", kport))  # vLLM connects to a non-wildcard endpoint
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    frames: list[list[bytes]] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            if sub.poll(200):
                frames.append(sub.recv_multipart())

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    log = tempfile.NamedTemporaryFile("w", prefix="kv-probe-engine-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print("engine log:", log.name, flush=True)
    try:
        base = f"http://127.0.0.1:{eport}"
        print(f"healthy after {_wait_healthy(base, proc, ns.timeout):.0f} s", flush=True)
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        prefix = " ".join(f"word{i}" for i in range(ns.prefix_words))
        for tail in ("alpha beta", "gamma delta"):
            body = {"model": model, "prompt": f"{prefix} {tail}", "max_tokens": 4, "ignore_eos": True}
            usage = httpx.post(f"{base}/v1/completions", json=body, timeout=300).json()["usage"]
            details = usage.get("prompt_tokens_details") or {}
            print(
                f"completion: prompt_tokens {usage['prompt_tokens']}, cached {details.get('cached_tokens')}"
            )
        time.sleep(2)
    finally:
        stop.set()
        rx.join()
        sub.close(0)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{len(frames)} event batch(es)")
    chains = BlockChains()
    for fr in frames:
        topic, seq, payload = fr[0], int.from_bytes(fr[1], "big"), fr[-1]
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        print(f"batch topic={topic!r} seq={seq} ts={batch[0]:.3f} rest={batch[2:]}")
        for e in batch[1]:
            shown = {k: _short(v) for k, v in e.items()} if isinstance(e, dict) else _short(e)
            print("  wire:", shown)
        chains.apply(decode_batch(payload))
    print(
        f"mirror: block size {chains.block_size}, groups followed {chains.groups}, "
        f"blocks {len(chains.blocks)}, events skipped {chains.skipped}"
    )
    return 0 if frames else 1


if __name__ == "__main__":
    raise SystemExit(main())
