"""The live nodes as one proxy worker sees them: read from Redis every ``REGISTRY_REFRESH_S``.

A refresh is two pipelined round trips whatever the number of jobs: the registered node ids,
then every node's heartbeat, every node's in-flight count (expired slots dropped) and the
prefix-affinity memory. Between refreshes the proxy worker routes from this snapshot and adjusts
the in-flight counts by its own acquires and releases; the capacity itself is enforced in Redis
by :mod:`services.routing.capacity`, so a stale snapshot can only cost a retried choice, never an
overfilled node.

A node is routable while its heartbeat exists (TTL ``NODE_TTL_S``), says ``up`` and ``ready``,
and no connection to its worker failed in the last ``NODE_SUSPECT_S`` (a failure is forgotten at
once when the worker restarts: its heartbeat's ``started`` changes). With ``WORKER_URLS`` set,
the nodes are those URLs instead (no heartbeat needed), each with the configured capacity.

The prefix memory (prefix → the nodes that served it) is shared by all proxy workers through
Redis (:meth:`services.contracts.Keys.routing_prefixes`): each proxy writes what it decides, in
the same round trip as the slot it takes, and reads everyone's every ``PREFIX_READ_S``. Two
proxies can disagree on a brand-new prefix for that long at most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.contracts import JobSpec, Keys, NodeHeartbeat, NodeState, prefix_key
from services.routing.capacity import Capacity
from services.routing.policies import JobInfo, NodeView
from services.settings import Settings

log = logging.getLogger("llmconsole.routing")

#: Most prefix-memory entries read per time window at each read.
PREFIX_SAMPLE = 4096
#: How often a proxy worker reads the other proxies' prefix decisions (its own it knows at once).
PREFIX_READ_S = 2.0


#: Policies that route by the job's prompt prefix.
_PREFIX_POLICIES = ("prefix_affinity", "kv_events")


@dataclass(slots=True)
class LiveNode:
    """A node a proxy worker may route to."""

    node: str
    url: str
    capacity: int
    #: Start time of the node's inference worker (0 for static nodes).
    started: int = 0


def static_node_id(url: str) -> str:
    """Node id of a ``WORKER_URLS`` entry: its host and port."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'worker'}_{parts.port or 80}".replace(":", "_")


def encode_owners(owners: tuple[str, ...]) -> str:
    """Owners of a prefix as stored in the routing memory."""
    return ",".join(owners)


def decode_owners(text: str) -> tuple[str, ...]:
    """Inverse of :func:`encode_owners`."""
    return tuple(o for o in text.split(",") if o)


class Registry:
    """Cached view of the live nodes, their in-flight counts and the prefix memory."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        settings: Settings,
        capacity: Capacity | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r = redis
        self.keys = keys
        self.s = settings
        self.cap = capacity or Capacity(redis, keys)
        self.clock = clock
        self.nodes: dict[str, LiveNode] = {}
        self.in_flight: dict[str, int] = {}
        #: prefix → owners; and the generation each entry was last written to Redis in.
        self.prefixes: dict[str, tuple[str, ...]] = {}
        self._written: dict[str, int] = {}
        #: node → prefixes it is the first owner of.
        self._firsts: dict[str, int] = {}
        self._next_prefix_read = 0.0
        #: prefix → nodes whose engine holds it whole (read only while kv_events is in use).
        self.kv_holders: dict[str, tuple[str, ...]] = {}
        self.want_kv = settings.routing == "kv_events"
        self._suspects: dict[str, tuple[float, int]] = {}
        self.refreshed = 0.0
        self.static = bool(settings.worker_urls)
        self._static_nodes = {
            static_node_id(u): LiveNode(
                static_node_id(u), u, max(1, int(settings.max_num_seqs * settings.node_capacity_factor))
            )
            for u in settings.worker_url_list
        }

    # --- prefix memory ----------------------------------------------------------
    def generation(self) -> int:
        """The current time window of the prefix memory."""
        return int(time.time()) // self.s.routing_prefix_ttl_s

    def job_info(self, spec: JobSpec, policy: str) -> JobInfo:
        """What a policy needs to know of a job: its prefix key, that prefix's owners and (for
        ``kv_events``) the nodes whose engine holds it now."""
        return self.prefix_info(prefix_key(spec) if policy in _PREFIX_POLICIES else "", policy)

    def prefix_info(self, prefix: str, policy: str) -> JobInfo:
        """:meth:`job_info` from the job's prefix key (a stream entry's hint)."""
        if policy == "prefix_affinity":
            return JobInfo(prefix, self.owners(prefix))
        if policy == "kv_events":
            self.want_kv = True
            return JobInfo(prefix, self.owners(prefix), self.kv_holders.get(prefix, ()))
        return JobInfo()

    def owners(self, prefix: str) -> tuple[str, ...]:
        """Nodes that served ``prefix`` recently (first owner first)."""
        return self.prefixes.get(prefix, ()) if prefix else ()

    def remember(self, prefix: str, owners: tuple[str, ...]) -> str:
        """Note a routing decision; return the memory key to write it to ("" = nothing to write).

        An entry is written when its owners change or once per time window (to stay remembered).
        """
        if not prefix:
            return ""
        gen = self.generation()
        if self.prefixes.get(prefix) == owners and self._written.get(prefix) == gen:
            return ""
        self._count_first(self.prefixes.get(prefix), -1)
        self._count_first(owners, +1)
        self.prefixes[prefix] = owners
        self._written[prefix] = gen
        return self.keys.routing_prefixes(gen)

    def _count_first(self, owners: tuple[str, ...] | None, delta: int) -> None:
        """Keep the per-node count of prefixes a node is the first owner of (for new prefixes)."""
        if owners:
            self._firsts[owners[0]] = self._firsts.get(owners[0], 0) + delta

    @property
    def prefix_ttl_s(self) -> int:
        """TTL of a memory window's key: two windows."""
        return 2 * self.s.routing_prefix_ttl_s

    # --- health ----------------------------------------------------------------
    def suspect(self, node: str) -> None:
        """A connection to ``node``'s worker failed: no new jobs for ``NODE_SUSPECT_S``."""
        live = self.nodes.get(node)
        self._suspects[node] = (self.clock() + self.s.node_suspect_s, live.started if live else 0)

    def _suspected(self, n: LiveNode, now: float) -> bool:
        entry = self._suspects.get(n.node)
        if entry is None:
            return False
        until, started = entry
        if now >= until or n.started != started:
            del self._suspects[n.node]
            return False
        return True

    # --- views -----------------------------------------------------------------
    def routable(self) -> list[LiveNode]:
        """Live nodes that take jobs now (not suspected)."""
        now = self.clock()
        return [n for n in self.nodes.values() if not self._suspected(n, now)]

    def views(self) -> list[NodeView]:
        """Policy inputs for the routable nodes."""
        firsts = self._firsts
        return [
            NodeView(n.node, self.in_flight.get(n.node, 0), n.capacity, firsts.get(n.node, 0))
            for n in self.routable()
        ]

    def total_capacity(self) -> int:
        """Sum of the live nodes' capacity (suspected ones included: they come back)."""
        return sum(n.capacity for n in self.nodes.values())

    def adjust(self, node: str, delta: int) -> None:
        """Count this proxy's own acquire (+1) or release (-1) until the next refresh."""
        self.in_flight[node] = max(self.in_flight.get(node, 0) + delta, 0)

    # --- refresh ---------------------------------------------------------------
    def stale(self) -> bool:
        """True when the snapshot is older than ``REGISTRY_REFRESH_S``."""
        return self.clock() - self.refreshed >= self.s.registry_refresh_s

    async def refresh(self) -> None:
        """Read nodes, in-flight counts and (every ``PREFIX_READ_S``) the prefix memory from Redis
        (two round trips)."""
        gen = self.generation()
        read_prefixes = self.clock() >= self._next_prefix_read
        if self.static:
            ids = list(self._static_nodes)
        else:
            ids = sorted(await self.r.smembers(self.keys.nodes))
        async with self.r.pipeline(transaction=False) as p:
            if not self.static:
                for node in ids:
                    p.hgetall(self.keys.node(node))
            if ids:
                await self.cap.queue_count(p, ids)
            want_kv = self.want_kv and bool(ids)
            if want_kv:
                for node in ids:
                    p.smembers(self.keys.node_kv_prefixes(node))
            if read_prefixes:
                p.hrandfield(self.keys.routing_prefixes(gen - 1), PREFIX_SAMPLE, withvalues=True)
                p.hrandfield(self.keys.routing_prefixes(gen), PREFIX_SAMPLE, withvalues=True)
            res = await p.execute()
        beats = res[: len(ids)] if not self.static else []
        counts = res[len(beats)] if ids else []
        if self.static:
            nodes = dict(self._static_nodes)
        else:
            nodes = {}
            for node, h in zip(ids, beats, strict=True):
                if not h:
                    continue  # heartbeat expired: lost
                try:
                    hb = NodeHeartbeat.from_redis(h)
                except ValueError as e:
                    log.warning("node %s: unreadable heartbeat (%s)", node, e)
                    continue
                if hb.state != NodeState.UP or not hb.ready or hb.capacity < 1 or not hb.url:
                    continue
                nodes[node] = LiveNode(node, hb.url, hb.capacity, hb.started)
        self.nodes = nodes
        self.in_flight = {n: int(c) for n, c in zip(ids, counts, strict=False) if n in nodes}
        if want_kv:
            at = len(beats) + 1
            holders: dict[str, list[str]] = {}
            for node, members in zip(ids, res[at : at + len(ids)], strict=True):
                if node in nodes:
                    for prefix in members or ():
                        holders.setdefault(prefix, []).append(node)
            self.kv_holders = {p: tuple(n) for p, n in holders.items()}
        self.refreshed = self.clock()
        if not read_prefixes:
            return
        self._next_prefix_read = self.refreshed + PREFIX_READ_S
        prev, cur = res[-2], res[-1]
        prefixes: dict[str, tuple[str, ...]] = {}
        written: dict[str, int] = {}
        for window, flat in ((gen - 1, prev), (gen, cur)):
            for i in range(0, len(flat or []) - 1, 2):
                prefixes[flat[i]] = decode_owners(flat[i + 1])
                written[flat[i]] = window
        self.prefixes = prefixes
        self._firsts = {}
        for owners in prefixes.values():
            self._count_first(owners, +1)
        self._written = written


async def set_draining(redis: Any, keys: Keys, node: str, draining: bool = True) -> None:
    """Ask ``node`` to drain (or to take jobs again); its worker reports it at its next beat."""
    if draining:
        await redis.set(keys.node_drain(node), "1")
    else:
        await redis.delete(keys.node_drain(node))


async def deregister(redis: Any, keys: Keys, node: str) -> None:
    """Forget a node that left: heartbeat, registration, drain flag."""
    async with redis.pipeline(transaction=True) as p:
        p.delete(keys.node(node), keys.node_drain(node))
        p.srem(keys.nodes, node)
        await p.execute()
