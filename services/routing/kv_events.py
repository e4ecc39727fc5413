"""vLLM's KV cache events: the wire format, a publisher (the simulator's) and the mirror that an
inference worker runs beside its engine.

vLLM publishes them with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": "tcp://127.0.0.1:PORT", "topic": "kv-events"}'``: a ZMQ PUB socket sends
multipart frames ``[topic, seq (8 bytes, big-endian), msgpack(EventBatch)]``. vLLM *binds* only a
wildcard endpoint (``tcp://*:PORT``) and *connects* to any other, so with a loopback address the
subscriber (the mirror) binds it and vLLM connects; the simulator's publisher does the same.

An EventBatch is ``[ts, [event, ...], data_parallel_rank]``. vLLM 0.32 encodes each event as a
map tagged by type (msgspec ``tag=True``, fields with default values omitted)::

    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | None,
     "token_ids": [...], "block_size": 128, "lora_id": None, "medium": "GPU", "lora_name": None,
     "extra_keys": [...], "group_idx": 5, "kv_cache_spec_kind": "full_attention", ...}
    {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU", "group_idx": 5}
    {"type": "AllBlocksCleared"}

Earlier vLLM versions sent the same fields as arrays (``["BlockStored", block_hashes, ...]``);
:func:`decode_batch` reads both and returns arrays in vLLM's field order. Block hashes are 64-bit
ints by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), else bytes.

A hybrid model has one KV cache group per attention kind (Gemma 3: five sliding-window groups
and one full-attention group, measured on vLLM 0.32's CPU build). Every group reports the same
block hashes, but a sliding-window group skips the blocks that fell out of its window, so its
``block_hashes`` do not line up with its ``token_ids``. Only full-attention groups (or events
without a kind) describe the whole prefix; the mirror follows those and ignores the others'
stored and removed blocks.

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


#: vLLM 0.32's event fields in order (msgspec array_like order of ``vllm.distributed.kv_events``).
FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
        "locality",
        "ownership",
        "session_id",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx", "locality", "ownership"),
    "AllBlocksCleared": (),
}
#: Fields vLLM always writes (no default); the others are left out when None.
_REQUIRED = {
    "BlockStored": 7,  # block_hashes .. lora_name
    "BlockRemoved": 2,  # block_hashes, medium
    "AllBlocksCleared": 0,
}


def to_wire(event: list[Any]) -> dict[str, Any]:
    """An event in array form as vLLM 0.32 sends it: a map tagged by ``type``."""
    kind = event[0]
    names = FIELDS.get(kind, ())
    out: dict[str, Any] = {"type": kind}
    for i, name in enumerate(names):
        value = event[i + 1] if i + 1 < len(event) else None
        if value is not None or i < _REQUIRED.get(kind, 0):
            out[name] = value
    return out


def from_wire(event: Any) -> list[Any] | None:
    """An event as received (vLLM 0.32's tagged map, or the array of earlier versions) in array
    form, fields in vLLM's order; None if it is neither."""
    if isinstance(event, list):
        return event or None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        kind = event["type"]
        names = FIELDS.get(kind, ())
        values = [event.get(name) for name in names]
        while values and values[-1] is None and len(values) > _REQUIRED.get(kind, 0):
            values.pop()
        return [kind, *values]
    return None


def encode_batch(events: list[list[Any]], ts: float | None = None, dp_rank: int = 0) -> bytes:
    """An EventBatch as vLLM 0.32 encodes it (events in array form in, tagged maps on the wire)."""
    batch = [time.time() if ts is None else ts, [to_wire(e) for e in events], dp_rank]
    return msgpack.packb(batch, use_bin_type=True)


def decode_batch(payload: bytes) -> list[list[Any]]:
    """The events of an EventBatch in array form (unknown event types are kept; the caller skips
    them)."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        return []
    return [e for e in map(from_wire, batch[1]) if e is not None]


class Publisher:
    """A ZMQ PUB socket sending event batches as vLLM does (the simulator's side): like vLLM with
    a loopback endpoint, it connects to the subscriber, which binds."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(endpoint(host, port))
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
        #: The engine's block size, learned from its first followed BlockStored event.
        self.block_size = 0
        #: KV cache group → followed (full attention, or no kind given) or not (sliding window…).
        self.groups: dict[int, bool] = {}
        #: Events skipped: another group's, or a block size other than the engine's.
        self.skipped = 0

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

    def _follows_stored(self, e: list[Any]) -> bool:
        """True if a BlockStored event is one the chains follow (and learn its group's kind)."""
        group = e[9] if len(e) > 9 else None
        kind = e[10] if len(e) > 10 else None
        follow = kind is None or kind == "full_attention"
        if isinstance(group, int):
            self.groups[group] = follow
        return follow

    def _follows_removed(self, e: list[Any]) -> bool:
        """True if a BlockRemoved event is of a followed group (or names none)."""
        group = e[3] if len(e) > 3 else None
        return group is None or self.groups.get(group) is True

    def apply(self, events: Iterable[list[Any]]) -> None:
        """Apply a batch of events (in array form, see :func:`decode_batch`)."""
        for e in events:
            kind = e[0]
            if kind == "BlockStored" and len(e) >= 5:
                hashes, parent, tokens, size = e[1], _key(e[2]), list(e[3] or ()), int(e[4] or 0)
                if not self._follows_stored(e) or size <= 0 or len(tokens) != len(hashes) * size:
                    self.skipped += 1
                    continue
                if not self.block_size:
                    self.block_size = size
                    self._blocks.clear()
                elif size != self.block_size:
                    # A partial-block entry (vLLM's hash_block_size < block_size): finer than the
                    # prefixes are matched at; it never completes one.
                    self.skipped += 1
                    continue
                for i, h in enumerate(hashes):
                    block = tuple(tokens[i * size : (i + 1) * size])
                    h = _key(h)
                    self.blocks[h] = (parent, block)
                    self.child[(parent, block)] = h
                    parent = h
            elif kind == "BlockRemoved" and len(e) >= 2:
                if not self._follows_removed(e):
                    self.skipped += 1
                    continue
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
        loop = asyncio.get_running_loop()
        next_publish = next_ttl = 0.0
        try:
            # vLLM connects to a non-wildcard endpoint: the subscriber binds it (loopback only).
            # A worker restarted at once may find its predecessor's socket still there: retry.
            while True:
                try:
                    sock.bind(endpoint("127.0.0.1", self.port))
                    break
                except zmq.ZMQError as e:
                    log.warning("KV events: cannot bind 127.0.0.1:%d (%s); retrying", self.port, e)
                    await asyncio.sleep(1.0)
            sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
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
