"""The stack's lifecycle: launching Redis and the engine, fetching and preparing models, waiting
until the stack serves, a node's own join/drain/leave commands, and supervisord control.

The runtime services (ingestion, proxy worker, inference worker) live one level up; routing
(policies, shared capacity, the node registry, KV-event mirroring) in :mod:`services.routing`.
"""
