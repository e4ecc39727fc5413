"""Routing policies: pure functions from a job and the live nodes to a node.

No Redis, no clock, no randomness: everything a policy looks at is passed in, so the policies
are tested as plain functions. The proxy worker feeds them from :mod:`services.routing.registry`.

* ``round_robin`` — the next node in turn that has room.
* ``least_loaded`` — the node with the lowest in-flight / capacity.
* ``prefix_affinity`` — jobs sharing a prompt prefix go to the node that served it recently
  (its engine holds the prefix in its KV cache), with two guards:

  - the imbalance guard of the vLLM router and SGLang gateway: when
    ``(max - min) > balance_abs`` and ``max > balance_rel × min`` over the nodes' in-flight
    counts, the job goes to the least loaded node whatever its prefix;
  - a fair-share guard against hot prefixes: a prefix's node is passed over when taking the job
    would put it above ``fair_share ×`` its capacity-weighted share of all jobs in flight
    (``+ fair_share_abs``) and above ``spill_load ×`` its capacity (where its engine starts
    queueing); the job then goes to the least loaded node, which becomes one more owner of the
    prefix, so one hot prefix spreads over as many nodes as its load needs while cold prefixes
    stay on one.

  A prefix seen for the first time goes to the node that owns the fewest prefixes (then the
  least loaded), which spreads prefix groups evenly over the nodes.

* ``kv_events`` — ``prefix_affinity`` where the nodes whose engine still holds the whole prefix
  (their KV cache events, mirrored into Redis by each inference worker) come first: an evicted
  prefix no longer attracts its jobs, and a prefix cached on several nodes goes to the least
  loaded of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Most nodes remembered per prefix.
MAX_OWNERS = 8


@dataclass(frozen=True, slots=True)
class NodeView:
    """What a policy knows of one live node."""

    node: str
    #: Jobs in flight on the node (all proxy workers together).
    in_flight: int
    #: Jobs the node may have in flight at once.
    capacity: int
    #: Prefixes this node is the first owner of in the routing memory.
    prefixes: int = 0

    @property
    def room(self) -> bool:
        """True if the node can take one more job."""
        return self.in_flight < self.capacity

    @property
    def load(self) -> float:
        """In flight relative to capacity."""
        return self.in_flight / self.capacity if self.capacity > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What a policy knows of the job."""

    #: :func:`services.contracts.prefix_key` of the job ("" = shares no prefix).
    prefix: str = ""
    #: Nodes that served this prefix recently, first owner first.
    owners: tuple[str, ...] = ()
    #: Nodes whose engine holds the whole prefix in its KV cache now (from KV events).
    holders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Guards:
    """Thresholds of ``prefix_affinity`` (see the module docstring)."""

    balance_abs: int = 32
    balance_rel: float = 1.5
    fair_share: float = 1.25
    fair_share_abs: int = 4
    #: The fair-share guard acts only on a node above this share of its capacity: below it the
    #: engine runs the job at once (capacity = max_num_seqs × factor, so 1 / factor is where the
    #: engine starts queueing), and moving the job would only cost its prefix-cache hit.
    spill_load: float = 0.5


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice."""

    node: str
    #: Why: round_robin, least_loaded, prefix_hit, prefix_new, imbalance, fair_share.
    reason: str
    #: The prefix's owners after this job (to remember); () when the job has no prefix.
    owners: tuple[str, ...] = ()


def round_robin(nodes: Sequence[NodeView], turn: int) -> Decision | None:
    """The ``turn``-th node (by id, cyclically) that has room; None if none has."""
    ordered = sorted(nodes, key=lambda n: n.node)
    count = len(ordered)
    for i in range(count):
        n = ordered[(turn + i) % count]
        if n.room:
            return Decision(n.node, "round_robin")
    return None


def _least_loaded(nodes: Sequence[NodeView], turn: int) -> NodeView | None:
    """Lowest load among nodes with room; ties go round in ``turn`` order."""
    ordered = sorted(nodes, key=lambda n: n.node)
    count = len(ordered)
    best: tuple[float, int, int] | None = None
    choice: NodeView | None = None
    for i, n in enumerate(ordered):
        if not n.room:
            continue
        key = (n.load, n.in_flight, (i - turn) % count)
        if best is None or key < best:
            best, choice = key, n
    return choice


def least_loaded(nodes: Sequence[NodeView], turn: int = 0) -> Decision | None:
    """The node with the lowest in-flight / capacity that has room; None if none has."""
    n = _least_loaded(nodes, turn)
    return Decision(n.node, "least_loaded") if n else None


def imbalanced(nodes: Sequence[NodeView], guards: Guards) -> bool:
    """The vLLM router's test: ``(max - min) > abs`` and ``max > rel × min`` (in flight)."""
    if len(nodes) < 2:
        return False
    loads = [n.in_flight for n in nodes]
    hi, lo = max(loads), min(loads)
    return hi - lo > guards.balance_abs and hi > guards.balance_rel * lo


def over_fair_share(node: NodeView, nodes: Sequence[NodeView], guards: Guards) -> bool:
    """True if one more job would put ``node`` above its allowed share of all jobs in flight
    (and above ``spill_load`` of its own capacity)."""
    total_cap = sum(max(n.capacity, 0) for n in nodes)
    if total_cap <= 0:
        return True
    if node.in_flight + 1 <= guards.spill_load * node.capacity:
        return False
    total = sum(n.in_flight for n in nodes) + 1
    fair = total * node.capacity / total_cap
    return node.in_flight + 1 > guards.fair_share * fair + guards.fair_share_abs


def _with_owner(owners: tuple[str, ...], node: str) -> tuple[str, ...]:
    if node in owners:
        return owners
    return (*owners, node)[-MAX_OWNERS:] if len(owners) >= MAX_OWNERS else (*owners, node)


def prefix_affinity(
    job: JobInfo, nodes: Sequence[NodeView], turn: int = 0, guards: Guards | None = None
) -> Decision | None:
    """Prefix-cache-aware choice with the imbalance and fair-share guards; None if all are full."""
    g = guards or Guards()
    if not job.prefix:
        return least_loaded(nodes, turn)
    roomy = [n for n in nodes if n.room]
    if not roomy:
        return None
    live = {n.node for n in nodes}
    owners = tuple(o for o in job.owners if o in live)
    if imbalanced(nodes, g):
        n = _least_loaded(roomy, turn)
        assert n is not None
        return Decision(n.node, "imbalance", _with_owner(owners, n.node))
    by_id = {n.node: n for n in roomy}
    for o in owners:  # first owner first: a prefix stays where it started while that node keeps up
        n = by_id.get(o)
        if n is not None and not over_fair_share(n, nodes, g):
            return Decision(n.node, "prefix_hit", owners)
    fair = [n for n in roomy if not over_fair_share(n, nodes, g)] or roomy
    if owners:
        # Every owner is full or above its fair share: the prefix spreads to one more node.
        others = [n for n in fair if n.node not in owners] or fair
        n = _least_loaded(others, turn)
        assert n is not None
        return Decision(n.node, "fair_share", _with_owner(owners, n.node))
    fewest = min(n.prefixes for n in fair)
    n = _least_loaded([n for n in fair if n.prefixes == fewest], turn)
    assert n is not None
    return Decision(n.node, "prefix_new", (n.node,))


def kv_events(
    job: JobInfo, nodes: Sequence[NodeView], turn: int = 0, guards: Guards | None = None
) -> Decision | None:
    """``prefix_affinity`` whose owners are first the nodes that hold the prefix now (least loaded
    first, as their KV cache events say), then the nodes the routing memory remembers."""
    if not job.holders:
        return prefix_affinity(job, nodes, turn, guards)
    load = {n.node: (n.load, n.in_flight) for n in nodes}
    holders = sorted((h for h in job.holders if h in load), key=lambda h: load[h])
    owners = (*holders, *(o for o in job.owners if o not in holders))
    d = prefix_affinity(JobInfo(job.prefix, owners), nodes, turn, guards)
    if d is not None and d.reason == "prefix_hit" and d.node in holders:
        return Decision(d.node, "kv_hit", d.owners)
    return d


def choose(
    policy: str, job: JobInfo, nodes: Sequence[NodeView], turn: int = 0, guards: Guards | None = None
) -> Decision | None:
    """Apply ``policy`` (round_robin, least_loaded, prefix_affinity, kv_events); None if no node has
    room."""
    if not nodes:
        return None
    if policy == "round_robin":
        return round_robin(nodes, turn)
    if policy == "least_loaded":
        return least_loaded(nodes, turn)
    if policy == "prefix_affinity":
        return prefix_affinity(job, nodes, turn, guards)
    if policy == "kv_events":
        return kv_events(job, nodes, turn, guards)
    raise ValueError(
        f"unknown routing policy {policy!r}: use round_robin, least_loaded, prefix_affinity or kv_events"
    )
