"""Routing jobs to nodes: pure policies, shared capacity in Redis, the node registry.

* :mod:`services.routing.policies` — (job, node views) → node; pure, no I/O.
* :mod:`services.routing.capacity` — atomic per-node slots in Redis (Lua), healing by lease.
* :mod:`services.routing.registry` — live nodes, in-flight counts and prefix memory, cached.
"""
