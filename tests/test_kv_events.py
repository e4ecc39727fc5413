"""vLLM's KV cache events: wire format, the block-chain mirror, the kv_events policy, and the
simulator → inference worker → Redis path with real processes."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import msgpack
import pytest
import redis
import zmq

from services.contracts import JobSpec, Keys, prefix_key
from services.routing import kv_events
from services.routing.kv_events import BlockChains, decode_batch, encode_batch
from services.routing.policies import JobInfo, NodeView, choose
from services.routing.policies import kv_events as kv_policy
from tests.stackutil import RedisServer, Stack, free_port, wait_until

BS = 4


def stored(hashes: list[bytes], parent: bytes | None, tokens: list[int]) -> list[object]:
    """A BlockStored event in array form (block_hashes .. lora_name, vLLM's required fields)."""
    return ["BlockStored", hashes, parent, tokens, BS, None, None, None]


def test_event_batches_round_trip_in_vllms_layout() -> None:
    events = [stored([b"a"], None, [1, 2, 3, 4]), ["BlockRemoved", [b"a"], None], ["AllBlocksCleared"]]
    payload = encode_batch(events, ts=1.5)
    assert decode_batch(payload) == events
    # On the wire as vLLM 0.32 sends it: tagged maps, fields with defaults left out.
    ts, wire, rank = msgpack.unpackb(payload, raw=False)
    assert (ts, rank) == (1.5, 0)
    assert wire[0] == {
        "type": "BlockStored",
        "block_hashes": [b"a"],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": BS,
        "lora_id": None,
        "medium": None,
        "lora_name": None,
    }
    assert wire[1:] == [
        {"type": "BlockRemoved", "block_hashes": [b"a"], "medium": None},
        {"type": "AllBlocksCleared"},
    ]
    # Earlier vLLM versions sent arrays: read as well.
    assert decode_batch(msgpack.packb([1.5, events])) == events


def _vllm032(kind: str, group: int, **fields: object) -> dict[str, object]:
    """An event as vLLM 0.32's CPU build sent it for Gemma 3 (measured: five sliding-window
    groups and one full-attention group, int hashes)."""
    spec = {"kv_cache_spec_kind": kind} if kind else {}
    window = {"kv_cache_spec_sliding_window": 512} if kind == "sliding_window" else {}
    return {"medium": "GPU", "group_idx": group, **spec, **window, **fields}


def test_the_mirror_follows_vllm_032s_hybrid_groups() -> None:
    """Sliding-window groups skip the blocks out of their window (hashes no longer line up with
    the tokens) and evict on their own: only the full-attention group tells what is held."""
    chains = BlockChains()
    prefix = list(range(100, 120))  # five blocks of 4
    chains.register_prefix("p", prefix)
    hashes = [11, 12, 13, 14, 15]
    common = {"type": "BlockStored", "parent_block_hash": None, "token_ids": prefix, "block_size": BS}
    common |= {"lora_id": None, "lora_name": None}
    batch = [
        _vllm032("sliding_window", g, **common, block_hashes=hashes[1:], extra_keys=[None] * 4)
        for g in range(5)
    ]
    batch.append(_vllm032("full_attention", 5, **common, block_hashes=hashes, extra_keys=[None] * 5))
    chains.apply(decode_batch(msgpack.packb([1.0, batch, 0])))
    assert chains.block_size == BS and chains.cached_prefixes() == {"p"}
    assert chains.groups == {0: False, 1: False, 2: False, 3: False, 4: False, 5: True}
    assert chains.skipped == 5
    # A sliding-window group evicting a block (same hash) leaves the full-attention one held.
    removed = {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU", "group_idx": 0}
    chains.apply(decode_batch(msgpack.packb([2.0, [removed], 0])))
    assert chains.whole("p")
    chains.apply(decode_batch(msgpack.packb([3.0, [removed | {"group_idx": 5}], 0])))
    assert not chains.whole("p")


def test_a_prefix_is_whole_while_all_its_blocks_are_stored() -> None:
    chains = BlockChains()
    prefix = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # two full blocks of 4 (the last 2 tokens never count)
    chains.register_prefix("p", prefix)
    assert not chains.whole("p")
    chains.apply([stored([b"h1", b"h2"], None, prefix[:8])])
    assert chains.block_size == BS and chains.whole("p")
    assert chains.cached_prefixes() == {"p"}
    chains.apply([["BlockRemoved", [b"h2"], None]])
    assert not chains.whole("p")
    chains.apply([stored([b"h2"], b"h1", prefix[4:8])])
    assert chains.whole("p")
    chains.apply([["AllBlocksCleared"]])
    assert chains.cached_prefixes() == set()
    # The same tokens under another parent are another block.
    chains.apply([stored([b"x1"], b"other", prefix[:4]), stored([b"x2"], b"x1", prefix[4:8])])
    assert not chains.whole("p")


def test_kv_events_policy_prefers_the_least_loaded_node_holding_the_prefix() -> None:
    nodes = [NodeView("a", 5, 64), NodeView("b", 3, 64), NodeView("c", 0, 64)]
    d = kv_policy(JobInfo("p", owners=("a",), holders=("a", "b")), nodes)
    assert d is not None and (d.node, d.reason) == ("b", "kv_hit")
    # Nobody holds it (evicted everywhere): the routing memory decides, as prefix_affinity.
    d = choose("kv_events", JobInfo("p", owners=("a",)), nodes)
    assert d is not None and (d.node, d.reason) == ("a", "prefix_hit")


def test_the_publisher_sends_vllms_frames() -> None:
    port = free_port()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 200)
    # As with vLLM on a loopback endpoint: the subscriber binds, the publisher connects.
    sub.bind(kv_events.endpoint("127.0.0.1", port))
    pub = kv_events.Publisher(port)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    got: list[list[bytes]] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set() and not got:
            try:
                got.append(sub.recv_multipart())
            except zmq.Again:
                continue

    t = threading.Thread(target=receive)
    t.start()
    try:
        # PUB drops what it sends before the subscription arrives: send until one is received.
        wait_until(lambda: pub.send([["AllBlocksCleared"]]) is None and bool(got), 10, "a frame", 0.05)
    finally:
        stop.set()
        t.join()
        sub.close(0)
        pub.close()
    topic, seq, payload = got[0]
    assert topic == b"kv-events" and len(seq) == 8
    assert decode_batch(payload) == [["AllBlocksCleared"]]


@pytest.mark.slow
def test_the_worker_mirrors_which_prefixes_the_simulator_holds(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A small KV cache (64 blocks of 16 tokens): a few 8-block prefixes fit; later groups evict
    # the first one, and the worker's set in Redis follows.
    st = Stack(redis_server, tmp_path, kv_events_port=free_port(), sim_kv_blocks=64, sim_block_size=16)
    r = redis.Redis(port=redis_server.port, password=redis_server.password, decode_responses=True)
    keys = Keys(st.values["redis_prefix"])
    held = keys.node_kv_prefixes(st.values["node_id"])

    def key_of(group: int) -> str:
        spec = JobSpec(
            job_id="x",
            input_tokens=256,
            output_tokens=4,
            prefix_share=0.5,
            run_id="kv",
            seed=0,
            prefix_group=group,
        )
        return prefix_key(spec)

    try:
        st.start()
        with httpx.Client(timeout=30) as c:
            job = {"input_tokens": 256, "output_tokens": 4, "prefix_share": 0.5, "run_id": "kv"}
            assert st.wait_job(c, st.submit(c, prefix_group=0, seed=1, **job))["state"] == "succeeded"
            wait_until(lambda: key_of(0) in r.smembers(held), 20, "group 0 held")
            for group in range(1, 12):
                assert st.wait_job(c, st.submit(c, prefix_group=group, seed=1, **job))["state"] == "succeeded"

            def evicted_and_latest_held() -> bool:
                now = r.smembers(held)
                return key_of(0) not in now and key_of(11) in now

            wait_until(evicted_and_latest_held, 20, "group 0 evicted, group 11 held")
            assert 0 < r.ttl(held) <= int(st.settings.node_ttl_s)
    finally:
        st.stop()
        r.close()
