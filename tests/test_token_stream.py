"""A job's token stream (services/token_stream.py) on a real Redis: batching, end, cancel marks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services import token_stream
from services.contracts import CHUNK_ERROR, CHUNK_FINISH, CHUNK_TEXTS, CHUNK_USAGE, Keys, new_id
from tests.stackutil import RedisServer


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port, password=redis_server.password, decode_responses=True)
    yield client
    await client.aclose()


def _keys() -> Keys:
    return Keys(f"t{new_id()[-10:]}:")


async def _entries(r: aioredis.Redis, key: str) -> list[dict[str, str]]:
    return [fields for _id, fields in await r.xrange(key)]


async def test_chunks_faster_than_a_write_share_writes(r: aioredis.Redis) -> None:
    keys = _keys()
    sink = token_stream.TokenSink(r, keys, "j1", ttl_s=60)
    for i in range(200):  # all at once: far faster than one write
        sink.push(f"t{i}", "length" if i == 199 else None)
    sink.end({"prompt_tokens": 3, "completion_tokens": 200, "total_tokens": 203})
    await sink.close()
    entries = await _entries(r, keys.token_stream("j1"))
    assert 1 <= len(entries) == sink.writes < 10
    texts = [t for e in entries for t in json.loads(e.get(CHUNK_TEXTS, "[]"))]
    assert texts == [f"t{i}" for i in range(200)]  # every chunk, in order
    assert entries[-1][CHUNK_FINISH] == "length"
    assert json.loads(entries[-1][CHUNK_USAGE])["completion_tokens"] == 200
    ttl = await r.ttl(keys.token_stream("j1"))
    assert 0 < ttl <= 60


async def test_chunks_slower_than_a_write_get_one_write_each(r: aioredis.Redis) -> None:
    keys = _keys()
    sink = token_stream.TokenSink(r, keys, "j2", ttl_s=60)
    for i in range(10):
        sink.push(f"t{i}")
        await asyncio.sleep(0.02)
    sink.fail("engine went away")
    await sink.close()
    entries = await _entries(r, keys.token_stream("j2"))
    assert len(entries) == 11 and sink.writes == 11  # at most one write per chunk (+ the end)
    assert [json.loads(e[CHUNK_TEXTS]) for e in entries[:10]] == [[f"t{i}"] for i in range(10)]
    assert entries[-1][CHUNK_ERROR] == "engine went away" and sink.started


async def test_prior_sees_cancel_marks_and_earlier_tokens(r: aioredis.Redis) -> None:
    keys = _keys()
    assert await token_stream.prior(r, keys, "j3") == (False, 0)
    await token_stream.cancel(r, keys, "j3", ttl_s=60)
    assert await token_stream.prior(r, keys, "j3") == (True, 0)
    sink = token_stream.TokenSink(r, keys, "j4", ttl_s=60)
    sink.push("a")
    await sink.close()
    assert await token_stream.prior(r, keys, "j4") == (False, 1)


async def test_a_token_stream_is_written_past_maxmemory(r: aioredis.Redis) -> None:
    # An accepted OpenAI-door job streams on when Redis is past its maxmemory (every step of an
    # accepted job may go past it; only new jobs are refused).
    keys = _keys()
    used = int((await r.info("memory"))["used_memory"])
    before = (await r.config_get("maxmemory"))["maxmemory"]
    await r.config_set("maxmemory", used // 2)
    try:
        with pytest.raises(aioredis.ResponseError, match=r"maxmemory"):
            await r.set(f"{keys.prefix}probe", "x")
        sink = token_stream.TokenSink(r, keys, "j9", ttl_s=60)
        sink.push("a")
        sink.push("b", "stop")
        sink.end({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        await sink.close()
    finally:
        await r.config_set("maxmemory", before)
    entries = await _entries(r, keys.token_stream("j9"))
    assert [t for e in entries for t in json.loads(e.get(CHUNK_TEXTS, "[]"))] == ["a", "b"]
    assert entries[-1][CHUNK_FINISH] == "stop" and CHUNK_USAGE in entries[-1]
    assert 0 < await r.ttl(keys.token_stream("j9")) <= 60
