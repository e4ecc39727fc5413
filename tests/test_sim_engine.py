"""The simulator engine: timing model, prefix cache, tokenizer, and its vLLM-compatible API.

Unit tests drive the scheduler in simulated time (exact figures, no wall clock);
integration tests run the real app under uvicorn on a loopback port, and one
runs ``python -m services.sim_engine`` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.responses import StreamingResponse

from services.contracts import VllmMetric
from services.engine_client import histogram_quantile, metric_sum, parse_prometheus
from services.settings import REPO_ROOT, Settings
from services.sim_engine import (
    ABORTED_MESSAGE,
    BOS_ID,
    EOS_ID,
    FAIL_MARKER,
    NUM_WORDS,
    PROFILE_DIR,
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    BlockPool,
    ProfileError,
    Scheduler,
    Sequence,
    SimConfig,
    SimServer,
    SimTokenizer,
    StreamOptions,
    chunk_template,
    create_app,
    hash_blocks,
    list_profiles,
    load_profile,
    render_metrics,
    save_profile,
    token_chunk,
)

MODEL = "sim-test-model"

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def quiet(**kw: Any) -> SimConfig:
    """A config with no jitter and no random stops unless asked."""
    base: dict[str, Any] = {"itl_jitter_ms": 0.0, "eos_prob": 0.0}
    return SimConfig(**(base | kw))


def run_until_idle(sched: Scheduler, t: float = 0.0, max_steps: int = 100_000) -> float:
    """Drive the scheduler in simulated time until nothing waits or runs; return the end time."""
    for _ in range(max_steps):
        if not sched.has_work():
            return t
        plan = sched.schedule(t)
        assert not plan.empty
        t += plan.duration_s
        sched.complete(plan, t)
    raise AssertionError("scheduler did not drain")


def words(tok: SimTokenizer, n: int, offset: int = 0) -> str:
    """``n`` vocabulary words as text."""
    return " ".join(tok.words[(offset + i) % len(tok.words)] for i in range(n))


def metrics(base: str) -> dict[str, float]:
    """The simulator's /metrics, summed per sample name."""
    samples = parse_prometheus(httpx.get(f"{base}/metrics").text)
    out: dict[str, float] = {}
    for s in samples:
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """The simulator app under a real uvicorn, in a thread, on a loopback port."""

    def __init__(self, config: SimConfig, **kw: Any) -> None:
        kw.setdefault("model", MODEL)
        kw.setdefault("max_model_len", 2048)
        kw.setdefault("api_key", "")
        self.app = create_app(config, **kw)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        cfg = uvicorn.Config(self.app, log_level="warning", ws="none", lifespan="on", access_log=False)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn thread died"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Factory: start a simulator with a config, get its base URL (stopped at teardown)."""
    servers: list[ThreadServer] = []

    def _serve(config: SimConfig, **kw: Any) -> str:
        srv = ThreadServer(config, **kw).start()
        servers.append(srv)
        return srv.base

    yield _serve
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def fast_server() -> Iterator[str]:
    """One quick simulator shared by the read-only API tests."""
    srv = ThreadServer(quiet(ttft_base_ms=1, prefill_ms_per_token=0.001, itl_ms=1, block_size=4)).start()
    yield srv.base
    srv.stop()


# ---------------------------------------------------------------------------
# configuration and profiles
# ---------------------------------------------------------------------------


def test_from_settings_maps_sim_fields() -> None:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        sim_ttft_base_ms=7,
        sim_prefill_ms_per_token=0.5,
        sim_itl_ms=3,
        sim_itl_jitter_ms=0.25,
        sim_itl_batch_ms=0.125,
        sim_max_num_seqs=5,
        sim_block_size=32,
        sim_kv_blocks=99,
        sim_seed=42,
    )
    cfg = SimConfig.from_settings(s)
    assert (cfg.ttft_base_ms, cfg.prefill_ms_per_token, cfg.itl_ms) == (7, 0.5, 3)
    assert (cfg.itl_jitter_ms, cfg.itl_batch_ms, cfg.max_num_seqs) == (0.25, 0.125, 5)
    assert (cfg.block_size, cfg.kv_blocks, cfg.seed) == (32, 99, 42)


def test_profile_overrides_settings(tmp_path: Path) -> None:
    s = Settings(_env_file=None, var_dir=str(tmp_path), sim_itl_ms=3, sim_profile="cpu-gemma3-270m")  # type: ignore[call-arg]
    cfg = SimConfig.from_settings(s)
    assert cfg.block_size == 128 and cfg.itl_ms == load_profile("cpu-gemma3-270m")["itl_ms"] != 3
    # an explicit profile wins over Settings.sim_profile; "" means none
    assert SimConfig.from_settings(s, "gpu-h100-qwen32b").block_size == 16
    assert SimConfig.from_settings(s, "").itl_ms == 3


def test_shipped_profiles_are_complete_and_documented() -> None:
    names = list_profiles()
    assert {"cpu-gemma3-270m", "gpu-h100-qwen32b"} <= set(names)
    for name in ("cpu-gemma3-270m", "gpu-h100-qwen32b"):
        data = json.loads((PROFILE_DIR / f"{name}.json").read_text())
        assert set(data) == set(SimConfig.model_fields), name  # every key, nothing else
        assert data["description"] and data["source"]
    cpu = SimConfig.model_validate(load_profile("cpu-gemma3-270m"))
    # the notes' figures: TTFT ~1.1 s for 500 uncached tokens, ITL ~110-120 ms single stream
    assert 1000 <= cpu.prefill_ms(500) <= 1250
    assert 105 <= cpu.decode_ms(1) <= 125
    gpu = SimConfig.model_validate(load_profile("gpu-h100-qwen32b"))
    assert 22 <= 1000 / gpu.decode_ms(1) <= 25  # the seed README's ~22-25 tok/s


def test_profile_errors_and_user_profiles(tmp_path: Path) -> None:
    s = Settings(_env_file=None, var_dir=str(tmp_path))  # type: ignore[call-arg]
    with pytest.raises(ProfileError, match="no simulator profile"):
        load_profile("does-not-exist", settings=s)
    with pytest.raises(ProfileError, match="bad profile name"):
        load_profile("../etc/passwd", settings=s)
    path = save_profile("calibrated", quiet(itl_ms=33, description="test"), tmp_path / "sim_profiles")
    assert "calibrated" in list_profiles(s)
    assert load_profile("calibrated", settings=s)["itl_ms"] == 33
    assert load_profile(str(path))["description"] == "test"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"itl_ms": 1, "typo_key": 2}))
    with pytest.raises(ProfileError, match="typo_key"):
        load_profile(str(bad))
    bad.write_text(json.dumps({"itl_ms": -1}))
    with pytest.raises(ProfileError, match="itl_ms"):
        load_profile(str(bad))


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_counts_and_round_trip() -> None:
    tok = SimTokenizer()
    text = words(tok, 300)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 300
    assert tok.decode(ids) == text
    assert tok.encode(text) == [BOS_ID, *ids]
    assert tok.encode(tok.decode(tok.encode(text))) == [BOS_ID, BOS_ID, *ids]  # like HF: "<bos>" is text too
    assert tok.encode("  spaced\n\tout   words ", add_special_tokens=False).__len__() == 3
    assert tok.encode("", add_special_tokens=True) == [BOS_ID]
    assert len(set(tok.words)) == len(tok.words) >= 4000


def test_tokenizer_unknown_words_are_one_token_each_and_mostly_distinct() -> None:
    tok = SimTokenizer()
    unknown = [f"zz{i}q" for i in range(1000)]
    ids = tok.encode(" ".join(unknown), add_special_tokens=False)
    assert len(ids) == 1000
    assert len(set(ids)) > 990  # hashed, so different prompts do not look cached
    assert all(0 <= t < tok.vocab_size for t in ids)
    assert tok.encode(" ".join(unknown), add_special_tokens=False) == ids  # deterministic
    assert tok.decode(ids[:2]) == "<unk> <unk>"


# ---------------------------------------------------------------------------
# prefix cache
# ---------------------------------------------------------------------------


def test_block_hashes_are_chained_and_full_blocks_only() -> None:
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial block [9] is not hashed
    b = hash_blocks([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same block content, different parent
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert hash_blocks([1, 2, 3], 4) == []


def test_block_pool_hits_and_lru_eviction() -> None:
    pool = BlockPool(4)
    h = [bytes([i]) * 16 for i in range(6)]
    first = pool.allocate(2)
    for b, hh in zip(first, h[:2], strict=True):
        pool.register(b, hh)
    assert pool.usage() == 0.5
    pool.release(first)
    assert pool.usage() == 0.0
    assert pool.match(h[:3]) == first  # freed blocks still hit
    assert pool.match([h[1]]) == [first[1]]  # (chaining is the hasher's job)
    # hold the hit, then fill the rest: the other free blocks go first
    pool.take(pool.match(h[:1]))
    assert pool.can_allocate([], 3) and not pool.can_allocate([], 4)
    rest = pool.allocate(2)
    assert first[0] not in rest and first[1] not in rest
    assert pool.match(h[:2]) == first  # nothing cached was evicted yet
    pool.allocate(1)  # the only free block left is first[1]: evicted
    assert pool.match(h[:2]) == [first[0]]
    assert pool.evictions == 1


# ---------------------------------------------------------------------------
# scheduler in simulated time
# ---------------------------------------------------------------------------


def test_single_request_timing_is_the_model() -> None:
    cfg = quiet(ttft_base_ms=100, prefill_ms_per_token=2, itl_ms=10, itl_batch_ms=5, block_size=16)
    sched = Scheduler(cfg)
    seq = sched.new_sequence(list(range(4, 54)), 5, min_tokens=5, ignore_eos=True)
    sched.add(seq)
    end = run_until_idle(sched)
    assert seq.first_token_at == pytest.approx(0.1 + 0.002 * 50)
    assert end == pytest.approx(0.2 + 4 * 0.015)
    assert len(seq.output) == 5 and seq.finish_reason == "length"
    st = sched.stats
    assert (st.ttft.count, st.itl.count, st.e2e.count, st.queue.count) == (1, 4, 1, 1)
    assert st.itl.total == pytest.approx(4 * 0.015)
    assert st.generation_tokens == 5 and st.prompt_tokens == 50 and st.success["length"] == 1
    assert sched.pool.usage() == 0.0 and not sched.running


def test_zero_latency_model() -> None:
    cfg = quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=0, itl_batch_ms=0)
    sched = Scheduler(cfg)
    seqs = [sched.new_sequence([1, 5, 6], 50, ignore_eos=True) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert run_until_idle(sched) == 0.0
    assert [len(s.output) for s in seqs] == [50, 50, 50]


def test_batch_limit_queues_fifo_and_slows_decode() -> None:
    cfg = quiet(ttft_base_ms=10, prefill_ms_per_token=0, itl_ms=10, itl_batch_ms=10, max_num_seqs=2)
    sched = Scheduler(cfg)
    seqs = [sched.new_sequence([1, 4 + i], 3, ignore_eos=True) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule(0.0)
    assert plan.prefill == seqs[:2] and len(sched.running) == 2 and list(sched.waiting) == seqs[2:]
    sched.complete(plan, plan.duration_s)
    plan = sched.schedule(plan.duration_s)
    assert plan.decode == seqs[:2] and not plan.prefill
    assert plan.duration_s == pytest.approx(0.010 + 0.010 * 2)  # ITL grows with the batch
    run_until_idle(sched, 0.01)
    assert all(len(s.output) == 3 for s in seqs)
    assert seqs[2].first_token_at is not None and seqs[1].first_token_at is not None
    assert seqs[2].first_token_at > seqs[1].last_token_at  # type: ignore[operator]
    assert sched.stats.queue.count == 4 and sched.stats.queue.total > 0


def test_token_budget_chunks_a_long_prefill_over_steps() -> None:
    cfg = quiet(ttft_base_ms=10, prefill_ms_per_token=1, itl_ms=5, itl_batch_ms=0, max_num_batched_tokens=100)
    sched = Scheduler(cfg)
    seq = sched.new_sequence(list(range(4, 4 + 250)), 3, ignore_eos=True)
    sched.add(seq)
    t, chunks = 0.0, []
    while seq.first_token_at is None:
        plan = sched.schedule(t)
        chunks.append(plan.chunks)
        assert plan.duration_s == pytest.approx((10 + plan.prefill_tokens) / 1000)
        t += plan.duration_s
        sched.complete(plan, t)
    # 250 prompt tokens at 100 a step; the first token only when the last chunk is computed
    assert chunks == [[100], [100], [50]]
    assert seq.first_token_at == pytest.approx(0.110 + 0.110 + 0.060)
    assert len(seq.output) == 1 and seq.prefill_left == 0


def test_token_budget_serves_decodes_first_then_admits_within_what_is_left() -> None:
    cfg = quiet(ttft_base_ms=0, prefill_ms_per_token=1, itl_ms=5, itl_batch_ms=0, max_num_batched_tokens=100)
    sched = Scheduler(cfg)
    a = sched.new_sequence(list(range(4, 54)), 10, ignore_eos=True)
    sched.add(a)
    plan = sched.schedule(0.0)
    sched.complete(plan, plan.duration_s)
    b = sched.new_sequence(list(range(100, 180)), 10, ignore_eos=True)
    c = sched.new_sequence(list(range(200, 280)), 10, ignore_eos=True)
    sched.add(b)
    sched.add(c)
    plan = sched.schedule(0.1)
    # a decodes (1 token), b takes its whole 80, c what is left (19); c's next chunk comes first next
    assert plan.decode == [a] and plan.prefill == [b, c] and plan.chunks == [80, 19]
    assert plan.duration_s == pytest.approx((99 + 5) / 1000)
    sched.complete(plan, 0.2)
    assert b.first_token_at == 0.2 and c.first_token_at is None and c.prefill_left == 61
    plan = sched.schedule(0.2)
    assert plan.prefill == [c] and plan.chunks == [61] and plan.decode == [a, b]
    sched.complete(plan, 0.3)
    assert c.first_token_at == 0.3 and len(a.output) == 3 and len(b.output) == 2


def test_no_token_budget_prefills_every_admitted_prompt_in_one_step() -> None:
    cfg = quiet(ttft_base_ms=0, prefill_ms_per_token=1, max_num_batched_tokens=0)
    sched = Scheduler(cfg)
    seqs = [
        sched.new_sequence(list(range(10 + 1000 * i, 10 + 1000 * i + 900)), 2, ignore_eos=True)
        for i in range(20)
    ]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule(0.0)
    assert plan.prefill == seqs and plan.prefill_tokens == 20 * 900
    sched.complete(plan, plan.duration_s)
    assert all(s.first_token_at == plan.duration_s for s in seqs)


def test_prefix_cache_hits_in_usage_and_stats() -> None:
    cfg = quiet(ttft_base_ms=10, prefill_ms_per_token=1, block_size=16)
    sched = Scheduler(cfg)
    prompt = list(range(4, 4 + 100))
    a = sched.new_sequence(prompt, 2, ignore_eos=True)
    sched.add(a)
    t = run_until_idle(sched)
    assert a.num_cached == 0
    b = sched.new_sequence(prompt[:90] + [7] * 10, 2, ignore_eos=True, arrival=t)
    sched.add(b)
    plan = sched.schedule(t)
    assert b.num_cached == 80  # 5 full shared blocks of 16
    assert plan.prefill_tokens == 20
    assert plan.duration_s == pytest.approx((10 + 20) / 1000)
    sched.complete(plan, t + plan.duration_s)
    run_until_idle(sched, t + plan.duration_s)
    st = sched.stats
    assert (st.prefix_queries, st.prefix_hits, st.prompt_tokens_cached) == (200, 80, 80)


def test_prefix_cache_never_covers_the_last_token() -> None:
    cfg = quiet(block_size=4)
    sched = Scheduler(cfg)
    prompt = list(range(4, 12))  # exactly two full blocks
    for _ in range(2):
        s = sched.new_sequence(prompt, 1, ignore_eos=True)
        sched.add(s)
        run_until_idle(sched)
    assert s.num_cached == 4  # like vLLM: at most prompt-1 tokens, in whole blocks


def test_lru_eviction_forgets_old_prefixes() -> None:
    cfg = quiet(block_size=4, kv_blocks=16)
    sched = Scheduler(cfg)
    old = list(range(4, 4 + 33))
    for prompt in (old, *[list(range(100 * i, 100 * i + 33)) for i in range(1, 5)]):
        sched.add(sched.new_sequence(prompt, 1, ignore_eos=True))
        run_until_idle(sched)
    again = sched.new_sequence(old, 1, ignore_eos=True)
    sched.add(again)
    run_until_idle(sched)
    assert again.num_cached == 0
    assert sched.pool.evictions > 0


def test_preemption_when_kv_runs_out() -> None:
    cfg = quiet(block_size=4, kv_blocks=16, max_num_seqs=8)
    sched = Scheduler(cfg)
    seqs = [sched.new_sequence(list(range(100 * i + 4, 100 * i + 20)), 24, ignore_eos=True) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_until_idle(sched)
    assert all(len(s.output) == 24 and s.finish_reason == "length" for s in seqs)
    assert sched.stats.preemptions > 0
    assert sched.pool.usage() == 0.0


@pytest.mark.parametrize("budget", [1, 7, 40])
def test_chunked_prefills_under_kv_pressure_still_finish_every_sequence(budget: int) -> None:
    # A small budget and a cache that forces preemption (but at a budget of 1, where one sequence
    # moves a step): sequences preempted are recomputed in chunks, and each ends with its tokens.
    cfg = quiet(block_size=4, kv_blocks=16, max_num_seqs=6, max_num_batched_tokens=budget)
    sched = Scheduler(cfg)
    rng = random.Random(budget)
    seqs = []
    for i in range(12):
        prompt = list(range(100 * i + 4, 100 * i + 4 + rng.randint(5, 24)))
        seqs.append(sched.new_sequence(prompt, rng.randint(10, 30), ignore_eos=True))
    for s in seqs:
        sched.add(s)
    run_until_idle(sched)
    assert all(len(s.output) == s.max_tokens and s.finish_reason == "length" for s in seqs)
    assert all(s.prefill_left == 0 for s in seqs)
    assert (sched.stats.preemptions > 0) == (budget > 1)
    assert sched.pool.usage() == 0.0


def test_a_prefill_preempted_midway_is_cached_only_as_far_as_it_was_computed() -> None:
    cfg = quiet(
        block_size=4, kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=8, ttft_base_ms=0, itl_ms=1
    )
    sched = Scheduler(cfg)
    d = sched.new_sequence(list(range(4, 19)), 8, ignore_eos=True)  # decodes, and grows into a's blocks
    a = sched.new_sequence(list(range(100, 144)), 2, ignore_eos=True)  # 44 tokens, 11 blocks, chunked
    sched.add(d)
    sched.add(a)
    t, a_chunks = 0.0, []
    while sched.has_work():
        plan = sched.schedule(t)
        a_chunks += [c for seq, c in zip(plan.prefill, plan.chunks, strict=True) if seq is a]
        t += plan.duration_s
        sched.complete(plan, t)
    # d's growth preempted a when 36 of its 44 prompt tokens (9 blocks) were computed, and
    # evicted its 11th block. Back, a hits those 9 blocks only, so 8 tokens are computed again.
    # Had every allocated block been cached at admission, the uncomputed 10th would hit too (4).
    assert sched.stats.preemptions == 1
    assert a_chunks == [1, 7, 7, 7, 7, 7, 8]
    assert len(a.output) == 2 and len(d.output) == 8


def test_abort_frees_slot_and_blocks() -> None:
    cfg = quiet(max_num_seqs=1, block_size=4)
    sched = Scheduler(cfg)
    a = sched.new_sequence(list(range(4, 40)), 100, ignore_eos=True)
    b = sched.new_sequence(list(range(50, 60)), 2, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule(0.0)
    sched.complete(plan, 0.1)
    assert sched.running == [a] and list(sched.waiting) == [b] and sched.pool.usage() > 0
    sched.abort(a)
    assert a.finish_reason == "abort" and not sched.running
    assert sched.stats.success["abort"] == 0  # client aborts are not successes
    run_until_idle(sched, 0.1)
    assert len(b.output) == 2 and sched.pool.usage() == 0.0


def test_eos_stops_after_min_tokens_only_without_ignore_eos() -> None:
    cfg = quiet(eos_prob=0.5)
    sched = Scheduler(cfg)
    free = [sched.new_sequence([1, 5], 200, min_tokens=3, seed=i) for i in range(20)]
    exact = sched.new_sequence([1, 5], 200, ignore_eos=True, seed=1)
    forced = sched.new_sequence([1, 5], 50, min_tokens=50, seed=2)
    for s in (*free, exact, forced):
        sched.add(s)
    run_until_idle(sched)
    assert all(s.finish_reason == "stop" and s.output[-1] == EOS_ID and len(s.output) >= 4 for s in free)
    assert any(len(s.output) < 200 for s in free)
    assert len(exact.output) == 200 and len(forced.output) == 50
    assert sched.stats.success["stop"] == 20


def test_render_metrics_is_valid_prometheus() -> None:
    sched = Scheduler(quiet(itl_ms=30))
    for i in range(3):
        sched.add(sched.new_sequence([1, 4 + i], 4, ignore_eos=True))
    run_until_idle(sched)
    assert 'model_name="a\\"b\\\\c\\n"' in render_metrics(sched, 'a"b\\c\n')  # escaped label value
    samples = parse_prometheus(render_metrics(sched, "m"))
    assert {s.labels.get("model_name") for s in samples} == {"m"}
    assert {s.labels.get("engine") for s in samples} == {"0"}
    for name in (VllmMetric.TTFT, VllmMetric.ITL, VllmMetric.E2E, VllmMetric.QUEUE_TIME):
        buckets = [s for s in samples if s.name == f"{name}_bucket"]
        assert buckets[-1].labels["le"] == "+Inf"
        assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
        assert buckets[-1].value == metric_sum(samples, f"{name}_count")
    assert metric_sum(samples, VllmMetric.GENERATION_TOKENS) == 12
    assert histogram_quantile(samples, VllmMetric.ITL, 0.5) == pytest.approx(0.03, abs=0.02)


# ---------------------------------------------------------------------------
# the HTTP API under uvicorn
# ---------------------------------------------------------------------------


def test_models_health_version_say_simulator(fast_server: str) -> None:
    assert httpx.get(f"{fast_server}/health").status_code == 200
    assert httpx.get(f"{fast_server}/version").json()["simulator"] is True
    body = httpx.get(f"{fast_server}/v1/models").json()
    card = body["data"][0]
    assert body["object"] == "list" and card["id"] == MODEL and card["object"] == "model"
    assert card["owned_by"] == "llmconsole-simulator" and card["simulator"] is True
    assert "simulator" in card["description"] and card["max_model_len"] == 2048


def test_tokenize_detokenize(fast_server: str) -> None:
    tok = SimTokenizer()
    text = words(tok, 40)
    r = httpx.post(f"{fast_server}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["count"] == 41 and r["tokens"][0] == BOS_ID and r["max_model_len"] == 2048
    r2 = httpx.post(f"{fast_server}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r2["count"] == 40 and r2["tokens"] == r["tokens"][1:]
    back = httpx.post(f"{fast_server}/detokenize", json={"model": MODEL, "tokens": r2["tokens"]}).json()
    assert back["prompt"] == text
    strs = httpx.post(f"{fast_server}/tokenize", json={"prompt": "bada x", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["<bos>", "bada", "<unk>"]


def _sse(lines: list[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_stream_gives_exactly_max_tokens_chunks_and_usage(fast_server: str) -> None:
    body = {
        "model": MODEL,
        "prompt": words(SimTokenizer(), 30),
        "max_tokens": 25,
        "min_tokens": 25,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "some_unknown_field": {"ignored": True},
    }
    with httpx.stream("POST", f"{fast_server}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) == 25
    assert all(c["object"] == "text_completion" and c["choices"][0]["text"].startswith(" ") for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 24 + ["length"]
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 31 and usage_chunk["usage"]["completion_tokens"] == 25
    assert usage_chunk["usage"]["total_tokens"] == 56
    # without include_usage: no usage chunk
    body.pop("stream_options")
    with httpx.stream("POST", f"{fast_server}/v1/completions", json=body) as r:
        events = _sse(list(r.iter_lines()))
    assert len(events) == 26 and all(e["usage"] is None for e in events[:-1])


def test_non_stream_completion_with_token_ids(fast_server: str) -> None:
    body = {"prompt": [BOS_ID, 10, 11, 12], "max_tokens": 7, "ignore_eos": True, "seed": 3}
    r = httpx.post(f"{fast_server}/v1/completions", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == MODEL
    assert out["choices"][0]["finish_reason"] == "length"
    assert len(out["choices"][0]["text"].split()) == 7
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 7
    assert "cached_tokens" in out["usage"]["prompt_tokens_details"]
    again = httpx.post(f"{fast_server}/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == out["choices"][0]["text"]  # same seed, same words


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "bada", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "bada", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "bada", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "bada", "max_tokens": 4000}, "maximum context length"),
        ({"prompt": [1] * 2047, "max_tokens": 2}, "maximum context length"),
        ({"prompt": "bada", "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
        ({"prompt": "bada", "min_tokens": -1}, "min_tokens"),
        ({"prompt": [1, 10_000_000]}, "out of vocabulary"),
        ({"prompt": []}, "empty"),
        ({"prompt": 5}, "prompt"),
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": "bada", "n": 2}, "n=1"),
        ({"prompt": "bada", "temperature": -1}, "temperature"),
        ({"prompt": "bada", "stream_options": {"include_usage": True}}, "stream"),
    ],
)
def test_bad_completion_requests_get_400(fast_server: str, body: dict[str, Any], fragment: str) -> None:
    r = httpx.post(f"{fast_server}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400
    assert err["object"] == "error" and fragment in err["error"]["message"]


def test_other_bad_requests(fast_server: str) -> None:
    r = httpx.post(
        f"{fast_server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{fast_server}/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(f"{fast_server}/tokenize", json={"tokens": [1]})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(f"{fast_server}/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400
    r = httpx.post(f"{fast_server}/detokenize", json={"tokens": ["a"]})
    assert r.status_code == 400


def test_repeated_prefix_hits_cache_and_metrics(serve: Callable[..., str]) -> None:
    base = serve(quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=0, block_size=16))
    tok = SimTokenizer()
    prefix = words(tok, 200)
    before = metrics(base)
    usages = []
    for i in range(2):
        body = {"prompt": f"{prefix} {words(tok, 50, 1000 + 100 * i)}", "max_tokens": 3, "ignore_eos": True}
        usages.append(httpx.post(f"{base}/v1/completions", json=body).json()["usage"])
    after = metrics(base)
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (201 // 16) * 16  # <bos> + 200 shared words, whole blocks
    assert after[VllmMetric.PREFIX_HITS] - before[VllmMetric.PREFIX_HITS] == cached
    assert after[VllmMetric.PROMPT_TOKENS_CACHED] - before[VllmMetric.PROMPT_TOKENS_CACHED] == cached
    assert after[VllmMetric.PREFIX_QUERIES] - before[VllmMetric.PREFIX_QUERIES] == 2 * 251
    assert after[VllmMetric.PROMPT_TOKENS] - before[VllmMetric.PROMPT_TOKENS] == 2 * 251
    assert after[VllmMetric.GENERATION_TOKENS] - before[VllmMetric.GENERATION_TOKENS] == 6
    assert after[VllmMetric.REQUEST_SUCCESS] - before[VllmMetric.REQUEST_SUCCESS] == 2
    assert after[f"{VllmMetric.TTFT}_count"] - before[f"{VllmMetric.TTFT}_count"] == 2


async def test_batch_limit_queues_and_disconnect_frees_slots(serve: Callable[..., str]) -> None:
    base = serve(quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=20, max_num_seqs=2))
    body = {"prompt": "bada kipo", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    seen: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=30) as client:

        async def stream_forever() -> None:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        tasks = [asyncio.create_task(stream_forever()) for _ in range(4)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = metrics_from(await client.get(f"{base}/metrics"))
            if m[VllmMetric.WAITING] == 2 and m[VllmMetric.RUNNING] == 2:  # all four in, two queued
                seen = m
                break
            await asyncio.sleep(0.02)
        assert seen, "never saw 2 running and 2 waiting"
        assert seen[VllmMetric.KV_CACHE_USAGE] > 0
        for t in tasks:  # the clients go away mid-stream
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while time.monotonic() < deadline:
            m = metrics_from(await client.get(f"{base}/metrics"))
            if m[VllmMetric.RUNNING] == 0 and m[VllmMetric.WAITING] == 0:
                break
            await asyncio.sleep(0.02)
        assert m[VllmMetric.RUNNING] == 0 and m[VllmMetric.WAITING] == 0, m
        assert m[VllmMetric.KV_CACHE_USAGE] == 0.0
        assert m[VllmMetric.REQUEST_SUCCESS] == 0


def metrics_from(resp: httpx.Response) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in parse_prometheus(resp.text):
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_non_stream_client_disconnect_aborts(serve: Callable[..., str]) -> None:
    base = serve(quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=20, max_num_seqs=4))
    body = {"prompt": "bada", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 10
    while metrics(base)[VllmMetric.RUNNING] and time.monotonic() < deadline:
        time.sleep(0.02)
    m = metrics(base)
    assert m[VllmMetric.RUNNING] == 0 and m[VllmMetric.KV_CACHE_USAGE] == 0.0


def test_zero_latency_streams_many_tokens(serve: Callable[..., str]) -> None:
    cfg = quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=0, itl_batch_ms=0)
    base = serve(cfg)
    body = {"prompt": "bada", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
        events = _sse(list(r.iter_lines()))
    assert len(events) == 1501 and events[-1] == "[DONE]"


def test_api_key_guards_v1_only(serve: Callable[..., str]) -> None:
    base = serve(quiet(itl_ms=0), api_key="s3cret")
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "bada", "max_tokens": 1})
    assert r.status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/metrics").status_code == 200
    assert httpx.post(f"{base}/tokenize", json={"prompt": "bada"}).status_code == 200


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LLMC_ENV_FILE"] = "/nonexistent/llmconsole.env"  # no installed env file leaks in
    return env


@pytest.mark.slow
def test_cli_serves_a_profile() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "services.sim_engine", "--port", str(port), "--profile", "cpu-gemma3-270m",
           "--api-key", "", "--model", "cli-model", "--itl-ms", "1", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "simulator did not start"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
        assert card["id"] == "cli-model" and card["profile"] == "cpu-gemma3-270m"
        assert "Gemma" in card["description"]
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown


@pytest.mark.slow
def test_cli_rejects_unknown_profile_and_lists_profiles() -> None:
    cmd = [sys.executable, "-m", "services.sim_engine", "--profile", "nope"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no simulator profile named 'nope'" in r.stdout + r.stderr
    cmd = [sys.executable, "-m", "services.sim_engine", "--list-profiles"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "cpu-gemma3-270m" in r.stdout and "gpu-h100-qwen32b" in r.stdout


# ---------------------------------------------------------------------------
# streamed completions: chunk templates and the pure-ASGI fast path
# ---------------------------------------------------------------------------


async def _reference_stream(
    srv: SimServer,
    seq: Sequence,
    event: asyncio.Event,
    head: dict[str, Any],
    opts: StreamOptions,
    chat: bool = False,
) -> AsyncIterator[str]:
    """``SimServer._stream`` as it was before chunk templates (a dict and json.dumps per chunk)."""
    sent = 0
    try:
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield f"data: {json.dumps({**head, 'choices': [role], 'usage': None})}\n\n"
        while True:
            await event.wait()
            event.clear()
            done = seq.finished
            out = seq.output
            while sent < len(out):
                last = done and sent == len(out) - 1
                piece = srv.tokenizer.piece(out[sent])
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": piece,
                    "logprobs": None,
                    "finish_reason": seq.finish_reason if last else None,
                    "stop_reason": None,
                }
                if chat:
                    del choice["text"]
                    choice["delta"] = {"content": piece}
                sent += 1
                chunk: dict[str, Any] = {**head, "choices": [choice], "usage": None}
                if opts.continuous_usage_stats:
                    chunk["usage"] = srv.usage(seq) | {"completion_tokens": sent}
                    chunk["usage"]["total_tokens"] = len(seq.prompt_ids) + sent
                yield f"data: {json.dumps(chunk)}\n\n"
            if done:
                break
        if seq.finish_reason == "abort":
            info = {"message": ABORTED_MESSAGE, "type": "ServiceUnavailableError", "param": None, "code": 503}
            yield f"data: {json.dumps({'error': info, 'object': 'error', **info})}\n\n"
        elif opts.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': srv.usage(seq)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        srv.engine.abort(seq)


def _head(chat: bool, model: str = MODEL) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{'0123456789abcdef' * 2}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1_780_000_000,
        "model": model,
    }


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("model", [MODEL, 'a "quoted" \\ model ü 漢字 😀', "\x00llmconsole-sim-text\x00"])
def test_chunk_template_renders_token_chunks_byte_for_byte(chat: bool, model: str) -> None:
    texts = [
        "",
        " bada",
        'say "hi"',
        "back\\slash \\n",
        "ü é 漢字 😀",
        "\ud800 lone",
        "\x00\x1f\t\n\r",
        "</script>",
    ]
    texts += ["\x00llmconsole-sim-text\x00", '"\x00llmconsole-sim-text\x00"']
    head = _head(chat, model)
    template = chunk_template(head, chat)
    if model.startswith("\x00"):  # the sentinel in the head: no template, every chunk rendered whole
        assert template is None
        return
    assert template is not None
    prefix, suffix = template
    for text in texts:
        # The pre-template rendering of a plain token chunk (no finish reason, no usage).
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": None,
            "stop_reason": None,
        }
        if chat:
            del choice["text"]
            choice["delta"] = {"content": text}
        old = f"data: {json.dumps({**head, 'choices': [choice], 'usage': None})}\n\n".encode()
        assert prefix + json.dumps(text).encode() + suffix == old, text
        assert f"data: {json.dumps(token_chunk(head, text, None, chat))}\n\n".encode() == old


def test_memoised_token_texts_are_json_dumps() -> None:
    srv = SimServer(quiet(), MODEL, 2048, "", "")
    for tid in [EOS_ID, *range(4, 4 + NUM_WORDS)]:
        assert srv._piece_json(tid) == json.dumps(srv.tokenizer.piece(tid)).encode()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(
    "opts",
    [
        StreamOptions(include_usage=False),
        StreamOptions(include_usage=True),
        StreamOptions(include_usage=True, continuous_usage_stats=True),
    ],
    ids=["plain", "usage", "continuous"],
)
@pytest.mark.parametrize("end", ["length", "stop", "abort"])
async def test_streams_are_byte_for_byte_the_pre_template_ones(
    chat: bool, opts: StreamOptions, end: str
) -> None:
    # Both renderings follow one sequence as the scheduler produces it, step by step (some
    # steps give a stream two tokens at once), to its end: its length, an EOS, or an abort.
    srv = SimServer(quiet(eos_prob=1.0 if end == "stop" else 0.0), MODEL, 2048, "", "")
    sched = srv.engine.sched
    seq = sched.new_sequence([BOS_ID, 10, 11, 12, 13], 9, min_tokens=6, seed=5)
    events = (asyncio.Event(), asyncio.Event())

    def wake_both() -> None:
        for e in events:
            e.set()

    seq.on_update = wake_both
    sched.add(seq)
    head = _head(chat)
    new: list[bytes] = []
    old: list[bytes] = []

    async def drain(gen: AsyncIterator[Any], into: list[bytes]) -> None:
        async for item in gen:
            into.append(item if isinstance(item, bytes) else item.encode())

    tasks = [
        asyncio.create_task(drain(srv._stream(seq, events[0], head, opts, chat), new)),
        asyncio.create_task(drain(_reference_stream(srv, seq, events[1], head, opts, chat), old)),
    ]
    t, step = 0.0, 0
    while not seq.finished:
        if end == "abort" and step == 4:
            sched.abort(seq)
            break
        plan = sched.schedule(t)
        t += plan.duration_s
        sched.complete(plan, t)
        step += 1
        if step % 2:  # the streams catch up after odd steps only
            for _ in range(3):
                await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert seq.finish_reason == end
    assert len(new) > 4 and new == old
    assert new[-1] == b"data: [DONE]\n\n"


def _counting_routes(app: Any) -> list[str]:
    """Count the requests that reach the FastAPI routes of the two completion endpoints."""
    reached: list[str] = []
    for route in app.router.routes:
        if getattr(route, "path", "") in ("/v1/completions", "/v1/chat/completions"):
            route_app = route.app

            async def counting(scope: Any, receive: Any, send: Any, route_app: Any = route_app) -> None:
                reached.append(scope["path"])
                await route_app(scope, receive, send)

            route.app = counting
    return reached


def _raw_post(base: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 POST over a plain socket: the response's bytes exactly as sent."""
    host, port = base.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{head}"
        "Connection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = []
        while chunk := s.recv(65536):
            out.append(chunk)
    return b"".join(out)


def _normalised(raw: bytes) -> bytes:
    """A response with its date, ids and creation times blanked (all of fixed width)."""
    raw = re.sub(rb"\r\ndate: [^\r]*\r\n", b"\r\ndate: -\r\n", raw)
    raw = re.sub(rb"(chatcmpl|cmpl)-[0-9a-f]{32}", rb"\1-" + b"x" * 32, raw)
    return re.sub(rb'"created": \d{10}', b'"created": 0000000000', raw)


def test_streamed_completions_take_the_fast_path_with_the_routes_exact_bytes() -> None:
    # application/json is served by the fast path; the same request as another JSON media type
    # (which FastAPI parses alike) goes to the route's StreamingResponse. The bytes on the wire
    # (status line, headers, chunk framing, events) are the same.
    server = ThreadServer(quiet(ttft_base_ms=1, prefill_ms_per_token=0, itl_ms=1, block_size=4)).start()
    try:
        reached = _counting_routes(server.app)
        for path, body in [
            ("/v1/completions", {"prompt": "bada", "max_tokens": 12, "seed": 7}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 7}),
        ]:  # fmt: skip
            for opts in [None, {"include_usage": True}, {"continuous_usage_stats": True}]:
                data = json.dumps(
                    {**body, "stream": True, "ignore_eos": True, "stream_options": opts}
                ).encode()
                fast = _raw_post(server.base, path, data, {"Content-Type": "application/json"})
                assert reached == [], "a well-formed streamed request reached the route"
                route = _raw_post(server.base, path, data, {"Content-Type": "application/x-sim+json"})
                assert reached == [path]
                reached.clear()
                assert fast.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: [DONE]" in fast
                assert b"\r\ncontent-type: text/event-stream; charset=utf-8\r\n" in fast
                assert b"\r\ntransfer-encoding: chunked\r\n" in fast
                assert _normalised(fast) == _normalised(route)
    finally:
        server.stop()
    assert SSE_HEADERS == StreamingResponse(iter(()), media_type=SSE_MEDIA_TYPE).raw_headers


_STREAMED_REFUSALS = [
    ({"prompt": "bada", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "bada", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "bada", "max_tokens": 4000}, 400, "maximum context length"),
    ({"prompt": [1] * 2047, "max_tokens": 2}, 400, "maximum context length"),
    ({"prompt": "bada", "max_tokens": 5, "min_tokens": 6}, 400, "min_tokens"),
    ({"prompt": [1, 10_000_000]}, 400, "out of vocabulary"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": "bada", "n": 2}, 400, "n=1"),
    ({"prompt": "bada", "temperature": -1}, 400, "temperature"),
    ({"model": "other", "prompt": "bada"}, 404, "does not exist"),
    ({"prompt": f"bada {FAIL_MARKER}"}, 500, "fault-injection"),
]


def test_streamed_refusals_and_other_requests_stay_the_routes() -> None:
    server = ThreadServer(quiet(ttft_base_ms=1, prefill_ms_per_token=0, itl_ms=1, block_size=4)).start()
    url = f"{server.base}/v1/completions"
    try:
        reached = _counting_routes(server.app)
        for body, status, fragment in _STREAMED_REFUSALS:
            streamed = httpx.post(url, json={**body, "stream": True})
            plain = httpx.post(url, json=body)
            assert streamed.status_code == status, (body, streamed.text)
            assert fragment in streamed.json()["error"]["message"]
            assert streamed.content == plain.content  # the route's answer, word for word
        assert len(reached) == 2 * len(_STREAMED_REFUSALS)
        reached.clear()
        chat = {"messages": [{"role": "user", "content": FAIL_MARKER}], "stream": True}
        r = httpx.post(f"{server.base}/v1/chat/completions", json=chat)
        assert r.status_code == 500 and reached == ["/v1/chat/completions"]
        bad = httpx.post(
            url, content=b'{"prompt": "bada", "stream": tru', headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]["message"]
        no_type = httpx.post(url, content=b'{"prompt": "bada", "stream": true}')
        assert no_type.status_code == 400
        # Bodies pydantic's JSON parser refuses but the route's json.loads takes (a UTF-8 BOM, a
        # lone surrogate) are served by the route, as before.
        for data in [b'\xef\xbb\xbf{"prompt": "bada", "stream": true, "max_tokens": 2}',
                     b'{"prompt": "bada \\ud800", "stream": true, "max_tokens": 2}']:  # fmt: skip
            r = httpx.post(url, content=data, headers={"content-type": "application/json"})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        # The app sets no body bound, and neither does the fast path: a 3 MB body is read
        # whole and replayed whole to the route (which refuses its length, not its JSON).
        big = {"prompt": "bada " * 600_000, "max_tokens": 1, "stream": True}
        r = httpx.post(url, json=big, timeout=60)
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"], r.text
        assert len(reached) == 6  # every one of them answered by the route
    finally:
        server.stop()


def test_api_key_is_checked_before_the_fast_path() -> None:
    server = ThreadServer(quiet(ttft_base_ms=1, prefill_ms_per_token=0, itl_ms=1), api_key="s3cret").start()
    url = f"{server.base}/v1/completions"
    body = {"prompt": "bada", "max_tokens": 3, "stream": True}
    try:
        reached = _counting_routes(server.app)
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "bearer s3cret"}]:
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        ok = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
        assert reached == []
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_client_leaving_a_quiet_stream_frees_its_slot(path: str) -> None:
    # The first token comes at once, the next after a minute: a client that leaves in between
    # (no token is being sent) frees its slot and its KV blocks at once, not at its next token.
    server = ThreadServer(
        quiet(ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=60_000, max_num_seqs=2)
    ).start()
    if path.endswith("chat/completions"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "bada"}]}
    else:
        body = {"prompt": "bada kipo"}
    body |= {"max_tokens": 50, "ignore_eos": True, "stream": True}
    try:
        reached = _counting_routes(server.app)
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("POST", f"{server.base}{path}", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if (
                        line.startswith("data: ")
                        and '"finish_reason": null' in line
                        and 'content": ""' not in line
                    ):
                        break  # the first token
            m = metrics_from(await client.get(f"{server.base}/metrics"))
            deadline = time.monotonic() + 3
            while m[VllmMetric.RUNNING] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                m = metrics_from(await client.get(f"{server.base}/metrics"))
        assert m[VllmMetric.RUNNING] == 0 and m[VllmMetric.WAITING] == 0, m
        assert m[VllmMetric.KV_CACHE_USAGE] == 0.0
        assert reached == []
    finally:
        server.stop()
