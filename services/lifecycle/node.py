"""A node's own commands: wait until it serves, drain, leave (``python -m services.lifecycle.node``).

``install.sh --join`` runs ``wait`` after starting the node's engine and inference worker;
``install.sh --leave`` runs ``drain`` (no new jobs; waits until the node's jobs are done or the
timeout passed), stops the node's supervisord, then ``deregister``. The console drains a node
with :func:`services.routing.registry.set_draining`, the same flag.

Exit status: 0 = done, 1 = timed out or failed (with a sentence saying why), 2 = bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from services.contracts import Keys, NodeHeartbeat, NodeState
from services.queue import REDIS_DOWN, redis_client
from services.routing.capacity import Capacity
from services.routing.registry import deregister, set_draining
from services.settings import Settings, get_settings


async def read_beat(s: Settings, node: str) -> NodeHeartbeat | None:
    """The node's heartbeat, or None when it has none (not started, or lost)."""
    r = redis_client(s)
    try:
        h = await r.hgetall(Keys(s.redis_prefix).node(node))
        return NodeHeartbeat.from_redis(h) if h else None
    finally:
        await r.aclose()


async def wait_ready(s: Settings, node: str, within_s: float) -> str:
    """Wait until the node's heartbeat says ready; "" when it does, else why not."""
    deadline = time.monotonic() + within_s
    last = "no heartbeat yet (is the inference worker running? var/log/inference_worker.log)"
    while time.monotonic() < deadline:
        try:
            beat = await read_beat(s, node)
        except REDIS_DOWN as e:
            last = f"Redis at {s.redis_host}:{s.redis_port} does not answer ({e}); is its port open to this machine?"
            beat = None
        if beat is not None:
            if beat.ready:
                return ""
            last = f"the engine is not ready yet ({beat.engine_kind}; var/log/engine.log)"
        await asyncio.sleep(0.5)
    return f"node {node} not ready after {within_s:.0f} s: {last}"


async def drain(s: Settings, node: str, within_s: float) -> str:
    """Mark the node draining and wait until no job holds a slot on it; "" when empty."""
    keys = Keys(s.redis_prefix)
    r = redis_client(s)
    try:
        await set_draining(r, keys, node, True)
        cap = Capacity(r, keys)
        deadline = time.monotonic() + within_s
        n = -1
        while time.monotonic() < deadline:
            n = (await cap.in_flight([node]))[node]
            h = await r.hgetall(keys.node(node))
            beat = NodeHeartbeat.from_redis(h) if h else None
            if n == 0 and (beat is None or (beat.state == NodeState.DRAINING and beat.in_flight == 0)):
                return ""
            await asyncio.sleep(0.2)
        return f"node {node} still had {n} job(s) after {within_s:.0f} s: they are handed back when it stops"
    finally:
        await r.aclose()


async def _simple(s: Settings, node: str, what: str) -> None:
    keys = Keys(s.redis_prefix)
    r = redis_client(s)
    try:
        if what == "undrain":
            await set_draining(r, keys, node, False)
        elif what == "deregister":
            await deregister(r, keys, node)
    finally:
        await r.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: wait | drain | undrain | deregister | status."""
    p = argparse.ArgumentParser(prog="python -m services.lifecycle.node", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["wait", "drain", "undrain", "deregister", "status"])
    p.add_argument("--node", help="node id (default: this host's NODE_ID)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for wait and drain (default 300)")
    args = p.parse_args(argv)
    s = get_settings()
    node = args.node or s.effective_node_id
    try:
        if args.command == "wait":
            why = asyncio.run(wait_ready(s, node, args.timeout))
        elif args.command == "drain":
            why = asyncio.run(drain(s, node, args.timeout))
        elif args.command == "status":
            beat = asyncio.run(read_beat(s, node))
            print(f"{node}: lost (no heartbeat)" if beat is None else beat.model_dump_json(indent=2))
            why = ""
        else:
            asyncio.run(_simple(s, node, args.command))
            why = ""
    except REDIS_DOWN as e:
        why = f"Redis at {s.redis_host}:{s.redis_port} does not answer: {e}"
    if why:
        print(why, file=sys.stderr)
        return 1
    if args.command != "status":
        print(f"{node}: {args.command} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
