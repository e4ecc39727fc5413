"""vLLM's KV cache events: the wire format, a publisher (the simulator's) and the mirror that an
inference worker runs beside its engine.

vLLM publishes them with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": "tcp://127.0.0.1:PORT", "topic": "kv-events"}'``: a ZMQ PUB socket sends
multipart frames ``[topic, seq (8 bytes, big-endian), msgpack(EventBatch)]``. An EventBatch is
``[ts, [event, ...], (data_parallel_rank)]``; each event an array whose first item is its type:
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, ...]``,
``["BlockRemoved", block_hashes, ...]``, ``["AllBlocksCleared"]``
(vllm/distributed/kv_events.py). The simulator sends the same.

The mirror (:class:`KvMirror`) follows the engine's stored blocks by their chain
``(parent hash, block tokens) → hash`` and tells which of the prefixes this worker built are
still whole in the engine's cache. It publishes their prefix keys as a Redis set per node
(:meth:`services.contracts.Keys.node_kv_prefixes`), which the ``kv_events`` routing policy reads:
precise, eviction-aware affinity, with no tokenizer on the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from services.contracts import Keys
from services.queue import REDIS_DOWN

log = logging.getLogger("llmconsole.kv_events")

TOPIC = "kv-events"


def endpoint(host: str, port: int) -> str:
    """The ZMQ endpoint of an engine's KV events (loopback: only its worker listens)."""
    return f"tcp://{host}:{port}"


def vllm_config(port: int) -> str:
    """vLLM's ``--kv-events-config`` value publishing on 127.0.0.1:``port``."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint("127.0.0.1", port),
            "topic": TOPIC,
        }
    )


def encode_batch(events: list[list[Any]], ts: float | None = None) -> bytes:
    """An EventBatch as vLLM encodes it (msgspec array_like structs, tagged by type)."""
    return msgpack.packb([time.time() if ts is None else ts, events], use_bin_type=True)


def decode_batch(payload: bytes) -> list[list[Any]]:
    """The events of an EventBatch (unknown event types are kept; the caller skips them)."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return [e for e in batch[1] if isinstance(e, list) and e] if isinstance(batch, list) else []


class Publisher:
    """A ZMQ PUB socket sending event batches as vLLM does (the simulator's side)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.bind(endpoint(host, port))
        self.seq = 0

    def send(self, events: list[list[Any]]) -> None:
        """Send one batch (dropped, as by vLLM, when no subscriber keeps up)."""
        if not events:
            return
        frames = [TOPIC.encode(), struct.pack(">q", self.seq), encode_batch(events)]
        self.seq += 1
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


def _key(h: Any) -> Any:
    """A block hash as a dict key (bytes or int as given; lists from some encoders → tuple)."""
    return tuple(h) if isinstance(h, list) else h


class BlockChains:
    """The engine's stored blocks by chain, and which registered prefixes are whole in them."""

    def __init__(self) -> None:
        #: hash → (parent hash, block tokens)
        self.blocks: dict[Any, tuple[Any, tuple[int, ...]]] = {}
        #: (parent hash, block tokens) → hash
        self.child: dict[tuple[Any, tuple[int, ...]], Any] = {}
        #: prefix key → its token ids (the prompt's first tokens, specials included)
        self.prefixes: dict[str, list[int]] = {}
        #: prefix key → its full blocks' tokens at ``block_size``
        self._blocks: dict[str, list[tuple[int, ...]]] = {}
        #: The engine's block size, learned from its first BlockStored event.
        self.block_size = 0

    def register_prefix(self, key: str, prefix_ids: list[int], limit: int = 10_000) -> None:
        """Remember a prefix this worker sent to the engine (its token ids)."""
        if key and key not in self.prefixes and len(self.prefixes) < limit:
            self.prefixes[key] = list(prefix_ids)

    def _prefix_blocks(self, key: str) -> list[tuple[int, ...]]:
        blocks = self._blocks.get(key)
        if blocks is None:
            ids, bs = self.prefixes.get(key, []), self.block_size
            blocks = [tuple(ids[i * bs : (i + 1) * bs]) for i in range(len(ids) // bs)] if bs else []
            if bs:
                self._blocks[key] = blocks
        return blocks

    def apply(self, events: Iterable[list[Any]]) -> None:
        """Apply a batch of events."""
        for e in events:
            kind = e[0]
            if kind == "BlockStored" and len(e) >= 5:
                hashes, parent, tokens, size = e[1], _key(e[2]), list(e[3]), int(e[4])
                if size != self.block_size:
                    self.block_size = size
                    self._blocks.clear()
                for i, h in enumerate(hashes):
                    block = tuple(tokens[i * size : (i + 1) * size])
                    h = _key(h)
                    self.blocks[h] = (parent, block)
                    self.child[(parent, block)] = h
                    parent = h
            elif kind == "BlockRemoved" and len(e) >= 2:
                for h in e[1]:
                    entry = self.blocks.pop(_key(h), None)
                    if entry is not None and self.child.get(entry) == _key(h):
                        del self.child[entry]
            elif kind == "AllBlocksCleared":
                self.blocks.clear()
                self.child.clear()

    def whole(self, key: str) -> bool:
        """True if every full block of the prefix is in the engine's cache now."""
        blocks = self._prefix_blocks(key)
        parent: Any = None
        for block in blocks:
            h = self.child.get((parent, block))
            if h is None:
                return False
            parent = h
        return bool(blocks)

    def cached_prefixes(self) -> set[str]:
        """The registered prefixes that are whole in the cache."""
        return {k for k in self.prefixes if self.whole(k)}


class KvMirror:
    """Subscribes to the engine's KV events and keeps ``Keys.node_kv_prefixes(node)`` up to date."""

    def __init__(self, redis: Any, keys: Keys, node: str, port: int, ttl_s: float) -> None:
        self.r = redis
        self.keys = keys
        self.node = node
        self.port = port
        self.ttl_s = ttl_s
        self.chains = BlockChains()
        self.published: set[str] = set()
        self.events = 0

    async def run(self, publish_every_s: float = 0.1) -> None:
        """Receive events and publish the cached prefixes (at most every ``publish_every_s``)."""
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint("127.0.0.1", self.port))
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        loop = asyncio.get_running_loop()
        next_publish = next_ttl = 0.0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    frames = await asyncio.wait_for(sock.recv_multipart(), publish_every_s)
                    if len(frames) >= 3:
                        try:
                            batch = decode_batch(frames[-1])
                        except (ValueError, msgpack.UnpackException) as e:
                            log.warning("unreadable KV event batch: %s", e)
                            batch = []
                        self.chains.apply(batch)
                        self.events += len(batch)
                if loop.time() >= next_publish:
                    next_publish = loop.time() + publish_every_s
                    refresh_ttl = loop.time() >= next_ttl
                    with contextlib.suppress(*REDIS_DOWN):
                        await self.publish(force_ttl=refresh_ttl)
                        if refresh_ttl:
                            next_ttl = loop.time() + self.ttl_s / 3
        finally:
            sock.close(0)

    async def publish(self, force_ttl: bool = False) -> None:
        """Write the change in cached prefixes to Redis (and refresh the set's TTL)."""
        now = self.chains.cached_prefixes()
        added, removed = now - self.published, self.published - now
        key = self.keys.node_kv_prefixes(self.node)
        if not (added or removed or force_ttl):
            return
        async with self.r.pipeline(transaction=True) as p:
            if added:
                p.sadd(key, *added)
            if removed:
                p.srem(key, *removed)
            p.expire(key, max(int(self.ttl_s), 1))
            await p.execute()
        self.published = now
