"""The pipeline as real processes on the simulator: ingestion → Redis → proxy → inference worker → engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.records import RequestRecord
from services.contracts import MAX_BODY_BYTES, MAX_HEADER_BYTES, TIMESTAMPS, Keys
from services.settings import REPO_ROOT
from tests.stackutil import RedisServer, Stack, load_script, wait_until

pytestmark = pytest.mark.slow  # a four-process stack on the simulator


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def test_jobs_flow_through_every_stage(stack: Stack, client: httpx.Client) -> None:
    ids = [
        stack.submit(client, input_tokens=300, output_tokens=20, prefix_share=0.5, run_id="flow1", seed=i)
        for i in range(10)
    ]
    jobs = [stack.wait_job(client, j) for j in ids]
    for job in jobs:
        assert job["state"] == "succeeded", job
        ts = job["timestamps"]
        assert all(ts[k] is not None for k in TIMESTAMPS), ts
        values = [ts[k] for k in TIMESTAMPS]
        assert values == sorted(values), "timestamps out of order"
        res = job["result"]
        assert res["prompt_tokens"] == 300 and res["completion_tokens"] == 20
        assert res["token_mismatch"] == []
        assert "sim" in res["engine"]
        assert res["engine_time_s"] > 0 and len(res["itl_s"]) == 19
        assert all(v is not None and v >= 0 for v in job["stages_s"].values())
    # The run's shared prefix (150 tokens) really hits the engine's prefix cache.
    assert max(j["result"]["cached_tokens"] or 0 for j in jobs[1:]) >= 128


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "prefix_share"),
    [(1, 1, 0.5), (2, 1, 0.0), (2, 3, 1.0), (3, 2, 0.5), (333, 5, 0.333)],
)
def test_exact_counts_at_the_edges(
    stack: Stack, client: httpx.Client, input_tokens: int, output_tokens: int, prefix_share: float
) -> None:
    # One input token is the tokenizer's <bos> alone; the counts stay exact all the way down.
    job = stack.wait_job(
        client,
        stack.submit(
            client, input_tokens=input_tokens, output_tokens=output_tokens, prefix_share=prefix_share
        ),
    )
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert (res["prompt_tokens"], res["completion_tokens"]) == (input_tokens, output_tokens)
    assert res["token_mismatch"] == [] and len(res["itl_s"]) == output_tokens - 1


def test_defaults_are_the_seed_shape(stack: Stack, client: httpx.Client) -> None:
    job = stack.wait_job(client, stack.submit(client))
    assert job["state"] == "succeeded"
    assert job["spec"]["input_tokens"] == 1000 and job["spec"]["output_tokens"] == 500
    assert job["spec"]["prefix_share"] == 0.5
    assert job["result"]["prompt_tokens"] == 1000 and job["result"]["completion_tokens"] == 500


def test_literal_prompt(stack: Stack, client: httpx.Client) -> None:
    job = stack.wait_job(client, stack.submit(client, prompt="tell me about the sea", output_tokens=7))
    assert job["state"] == "succeeded"
    assert job["result"]["completion_tokens"] == 7 and job["result"]["requested_input_tokens"] is None


def test_wait_returns_when_final(stack: Stack, client: httpx.Client) -> None:
    jid = stack.submit(client, input_tokens=50, output_tokens=5)
    r = client.get(
        f"{stack.settings.ingestion_url}/v1/jobs/{jid}", params={"wait": 20}, headers=stack.headers
    )
    assert r.status_code == 200 and r.json()["state"] == "succeeded"


def test_ingestion_reads_job_events_only_while_someone_long_polls(make_stack: Callable[..., Stack]) -> None:
    # Every job publishes each change of state; ingestion subscribes to them for its long polls
    # alone, and only while one waits (and EVENT_LINGER_S after).
    import threading

    stk = make_stack(event_linger_s=0.5)
    channel = Keys(stk.values["redis_prefix"]).events
    rc = stk.redis.client()

    def subscribers() -> int:
        return int(rc.pubsub_numsub(channel)[0][1])

    try:
        with httpx.Client(timeout=30) as c:
            url = f"{stk.settings.ingestion_url}/v1/jobs"
            jid = stk.submit(c, input_tokens=50, output_tokens=5)
            # Followed without waiting (reads, as a client on the results stream does): no subscription.
            wait_until(
                lambda: c.get(f"{url}/{jid}", headers=stk.headers).json()["state"] == "succeeded", 30, "job 1"
            )
            assert subscribers() == 0
            stk.procs["proxy_worker"].stop()
            jid = stk.submit(c, input_tokens=50, output_tokens=5)
            got: list[dict[str, Any]] = []
            poll = threading.Thread(
                target=lambda: got.append(
                    c.get(f"{url}/{jid}", params={"wait": 25}, headers=stk.headers).json()
                )
            )
            poll.start()
            wait_until(lambda: subscribers() == 1, 10, "ingestion's subscription for the long poll")
            stk.procs["proxy_worker"].start()
            poll.join(30)
            assert got and got[0]["state"] == "succeeded", got
            wait_until(lambda: subscribers() == 0, 10, "the subscription dropped after the linger")
    finally:
        rc.close()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"input_tokens": 0}, "input_tokens"),
        ({"output_tokens": 10**12}, "output_tokens"),
        ({"input_tokens": "many"}, "input_tokens"),
        ({"prefix_share": 2}, "prefix_share"),
        ({"colour": "red"}, "colour"),
        ({"run_id": "no spaces allowed"}, "run_id"),
        ({"prompt": "x", "input_tokens": 5}, "not both"),
        ({"input_tokens": 2000, "output_tokens": 1000}, "context length"),
        ({"prompt": "hi there", "output_tokens": 2048}, "leaves no room for the prompt"),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_input_gets_clear_4xx(stack: Stack, client: httpx.Client, body: object, needle: str) -> None:
    r = client.post(f"{stack.settings.ingestion_url}/v1/jobs", json=body, headers=stack.headers)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_malformed_json_is_422(stack: Stack, client: httpx.Client) -> None:
    r = client.post(
        f"{stack.settings.ingestion_url}/v1/jobs",
        content=b"{not json",
        headers={**stack.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422


def test_body_too_large_is_413(stack: Stack, client: httpx.Client) -> None:
    r = client.post(
        f"{stack.settings.ingestion_url}/v1/jobs",
        json={"prompt": "x" * (MAX_BODY_BYTES + 10)},
        headers=stack.headers,
    )
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_oversized_headers_are_refused_before_any_handler(stack: Stack, client: httpx.Client) -> None:
    url = f"{stack.settings.ingestion_url}/v1/jobs"
    try:
        r = client.post(url, json={}, headers={**stack.headers, "X-Padding": "x" * (4 * MAX_HEADER_BYTES)})
        refused = r.status_code == 431 and str(MAX_HEADER_BYTES) in r.text
    except httpx.TransportError:
        refused = True  # answered 431 and closed while the client was still sending its headers
    assert refused
    # The server is unharmed, and ordinary headers still pass.
    assert (
        client.post(url, json={"input_tokens": 8, "output_tokens": 1}, headers=stack.headers).status_code
        == 202
    )


def _raw_exchange(port: int, parts: list[bytes], pause_s: float = 0.0) -> bytes:
    """Send ``parts`` on one connection (``pause_s`` apart) and read until the server closes or
    falls silent; a send cut short by the server's close is not an error here."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            for p in parts:
                s.sendall(p)
                time.sleep(pause_s)
        except OSError:
            pass  # refused and closed mid-send: its answer is still in the socket
        s.settimeout(1.5)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass  # keep-alive: the server waits for more
    return out


_LINE = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("parts", "pause_s", "status"),
    [
        pytest.param([_LINE + b"X-A: b\r\n" * 10_000 + b"\r\n"], 0.0, b"431", id="many-headers-one-read"),
        pytest.param(
            [_LINE + b"X-P: " + b"a" * 20_000] + [b"a" * 20_000] * 5, 0.05, b"431", id="one-header-never-ends"
        ),
        pytest.param(
            [b"GET /healthz?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"], 0.0, b"431", id="long-url"
        ),
        pytest.param(
            [_LINE + b"X-P: " + b"a" * (MAX_HEADER_BYTES - 2_000) + b"\r\n\r\n"],
            0.0,
            b"200",
            id="under-bound",
        ),
        pytest.param([_LINE + b"X-A: b\r\n" * 2_000 + b"\r\n"], 0.0, b"200", id="many-small-headers"),
        pytest.param([b"GARBAGE\r\n\r\n"], 0.0, b"400", id="malformed"),
    ],
)
def test_the_header_bound_on_the_wire(
    stack: Stack, parts: list[bytes], pause_s: float, status: bytes
) -> None:
    # Ingestion runs httptools (a C parser that bounds nothing itself) with a bound of its own:
    # whether the header section comes in one read or trickles in, past MAX_HEADER_BYTES it is a
    # 431 that says what to fix, and the connection closes.
    port = int(stack.settings.ingestion_url.rsplit(":", 1)[1])
    log = stack.procs["ingestion"]
    invalid, refused = "Invalid HTTP request received.", f"exceed {MAX_HEADER_BYTES} bytes (431)"
    before = log.log_text()
    answer = _raw_exchange(port, parts, pause_s)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    if status == b"431":
        assert f"exceed {MAX_HEADER_BYTES} bytes".encode() in answer
        # Logged as what it is, a 431, not as uvicorn's warning about a malformed request.
        wait_until(lambda: log.log_text().count(refused) > before.count(refused), 5, "the 431 logged")
        assert log.log_text().count(invalid) == before.count(invalid)
    elif status == b"400":
        wait_until(lambda: log.log_text().count(invalid) > before.count(invalid), 5, "uvicorn's warning")


def test_keep_alive_and_pipelined_requests_pass_the_bound(stack: Stack) -> None:
    # Each request on a connection is counted on its own: three pipelined requests of 40 KiB of
    # headers each (120 KiB on the connection, in one read) are all answered.
    port = int(stack.settings.ingestion_url.rsplit(":", 1)[1])
    one = _LINE + b"X-P: " + b"a" * 40_000 + b"\r\n\r\n"
    assert _raw_exchange(port, [one * 3]).count(b"HTTP/1.1 200 OK") == 3


def test_api_key_required(stack: Stack, client: httpx.Client) -> None:
    url = f"{stack.settings.ingestion_url}/v1/jobs"
    assert client.post(url, json={}).status_code == 401
    r = client.post(url, json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert (
        client.post(
            url, json={"output_tokens": 3}, headers={"X-API-Key": stack.values["api_key"]}
        ).status_code
        == 202
    )


def test_job_ids_validated(stack: Stack, client: httpx.Client) -> None:
    base = f"{stack.settings.ingestion_url}/v1/jobs"
    assert client.get(f"{base}/bad..id", headers=stack.headers).status_code == 422
    r = client.get(f"{base}/jdoesnotexist", headers=stack.headers)
    assert r.status_code == 404 and "no job" in r.json()["detail"]
    assert client.get(f"{base}/jx", params={"wait": 1000}, headers=stack.headers).status_code == 422


def test_idempotency_key_header(stack: Stack, client: httpx.Client) -> None:
    url = f"{stack.settings.ingestion_url}/v1/jobs"
    h = {**stack.headers, "Idempotency-Key": "same-request-1"}
    a = client.post(url, json={"input_tokens": 20, "output_tokens": 2}, headers=h).json()
    b = client.post(url, json={"input_tokens": 20, "output_tokens": 2}, headers=h).json()
    assert a["job_id"] == b["job_id"] and b["duplicate"] is True
    other = client.post(url, json={"input_tokens": 21, "output_tokens": 2}, headers=h)
    assert other.status_code == 422 and a["job_id"] in other.json()["detail"]
    assert "different request" in other.json()["detail"]
    bad = client.post(url, json={}, headers={**stack.headers, "Idempotency-Key": "x" * 200})
    assert bad.status_code == 422


def test_health_and_docs(stack: Stack, client: httpx.Client) -> None:
    base = stack.settings.ingestion_url
    assert client.get(f"{base}/healthz").json() == {"status": "ok"}
    assert client.get(f"{base}/readyz").status_code == 200
    spec = client.get(f"{base}/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert client.get(f"{base}/docs").status_code == 200


def test_queue_counts_each_submitted_job(stack: Stack, client: httpx.Client) -> None:
    # Alone or after the module's other tests: the counter moves by exactly one per accepted job.
    url = f"{stack.settings.ingestion_url}/v1/queue"
    before = client.get(url, headers=stack.headers).json()["counters"].get("submitted", 0)
    stack.wait_job(client, stack.submit(client, input_tokens=8, output_tokens=1))
    r = stack.redis.client()
    r.config_set("maxmemory", str(512 << 20))  # this test Redis runs without one
    try:
        body = client.get(url, headers=stack.headers).json()
    finally:
        r.config_set("maxmemory", "0")
        r.close()
    assert body["counters"]["submitted"] == before + 1
    # Storage against its bound: Redis memory, its limit, and the finished jobs retained.
    mem = body["memory"]
    assert mem["redis_maxmemory_bytes"] == 512 << 20
    assert 0 < mem["redis_used_bytes"] < mem["redis_maxmemory_bytes"]
    assert 0 < mem["used_fraction"] < 1 and mem["refuse_at_pct"] > 0
    assert mem["retained_jobs"] >= 1 and mem["oldest_finished"] is not None


def test_submit_fast_path_and_route_answer_alike(stack: Stack, client: httpx.Client) -> None:
    """Well-formed submits take ingestion's fast path; everything else reaches the FastAPI route.
    Both give the documented answers: a chunked body, a charset, X-API-Key and a wrong content
    type included."""
    url = f"{stack.settings.ingestion_url}/v1/jobs"
    ok = client.post(url, json={"input_tokens": 8, "output_tokens": 1}, headers=stack.headers)
    assert ok.status_code == 202 and ok.headers["content-type"] == "application/json"
    assert set(ok.json()) == {"job_id", "state", "run_id", "duplicate"} and ok.json()["state"] == "queued"

    def chunks() -> Iterator[bytes]:
        yield b'{"input_tokens": 8, '
        yield b'"output_tokens": 1}'

    chunked = client.post(
        url, content=chunks(), headers={**stack.headers, "Content-Type": "application/json; charset=utf-8"}
    )
    assert chunked.status_code == 202, chunked.text
    wrong_type = client.post(
        url, content=b'{"output_tokens": 1}', headers={**stack.headers, "Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 422
    bad_field = client.post(url, json={"output_tokens": 0}, headers=stack.headers)
    assert bad_field.status_code == 422 and "output_tokens" in bad_field.json()["detail"]
    too_long = client.post(url, json={"input_tokens": 10**6, "output_tokens": 1}, headers=stack.headers)
    assert too_long.status_code == 422 and "input_tokens" in too_long.json()["detail"]
    lower_scheme = client.post(
        url,
        json={"output_tokens": 1},
        headers={"Authorization": "bearer " + stack.values["api_key"]},
    )
    assert lower_scheme.status_code == 202
    for job in (ok.json(), chunked.json(), lower_scheme.json()):
        final = client.get(f"{url}/{job['job_id']}", params={"wait": 20}, headers=stack.headers).json()
        assert final["state"] == "succeeded" and final["timestamps"]["t_received"] is not None


def test_hops_slowest_keeps_the_overheads_tail_and_counts_the_opening_burst() -> None:
    # Overhead is the job's own hops (the client's two sides left out); of the slowest, those
    # submitted within 100 ms of the run's first submit are the opening burst.
    mod = load_script("hops")
    ms = 1_000_000

    def row(start_ms: int, hop_us: float, client_us: float) -> tuple[RequestRecord, dict[str, float]]:
        rec = RequestRecord(index=0, path="pipeline", start_ns=start_ms * ms)
        return rec, {"submit (x)": client_us, "a → b": hop_us, "b → c": hop_us, "notify (x)": client_us}

    rows = [row(0, 900, 0), row(50, 800, 0), row(2000, 700, 0), row(3000, 10, 10_000)]
    kept, opening = mod.slowest(rows, 50)
    assert [r[0].start_ns // ms for r in kept] == [50, 0] and opening == 2  # the client's 10 ms not counted
    kept, opening = mod.slowest(rows, 75)
    assert [r[0].start_ns // ms for r in kept] == [2000, 50, 0] and opening == 2
    assert mod.slowest(rows, 1)[0] == [rows[0]]  # at least one
    assert mod.slowest([], 5) == ([], 0)


def test_hops_script_splits_a_runs_time_by_hop(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    # scripts/hops.py on a record written as the bench writes it: one row per hop, each positive,
    # and with one request the rows plus the engine's own time add up to its latency.
    start_ns = time.time_ns()
    job_id = stack.submit(client, input_tokens=64, output_tokens=4)
    job = stack.wait_job(client, job_id)
    assert job["state"] == "succeeded"
    latency_s = (time.time_ns() - start_ns) / 1e9
    rows = [
        {
            "index": 0,
            "path": "pipeline",
            "success": True,
            "job_id": job_id,
            "start_ns": start_ns,
            "latency_s": latency_s,
        },
        {
            "index": 1,
            "path": "direct",
            "success": True,
            "job_id": None,
            "start_ns": 0,
            "latency_s": 1.0,
        },  # not a job
    ]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run_hops(*extra: str) -> str:
        script = str(REPO_ROOT / "scripts" / "hops.py")
        done = subprocess.run(
            [sys.executable, script, str(tmp_path), *extra],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run_hops()
    lines = out.splitlines()
    hops = {line[:40].strip(): float(line[40:].split()[0]) for line in lines[1:-2]}
    names = list(hops)
    assert names[0].startswith("submit") and names[-1].startswith("notify"), out
    # Every adjacent gap but the engine's two, and both client sides.
    assert len(hops) == len(TIMESTAMPS) - 1 - 2 + 2, out
    assert all(v > 0 for v in hops.values()), out
    ts = job["timestamps"]
    engine_us = (ts["t_engine_end"] - ts["t_engine_start"]) / 1e3
    assert abs(sum(hops.values()) + engine_us - latency_s * 1e6) < len(hops), out  # printed to the µs
    assert lines[-1] == "1 request", out
    tail = run_hops("--slowest", "5")
    assert (
        tail.splitlines()[-1] == "1 request; the slowest 5 %, 1 of them submitted in the run's first 100 ms"
    )


def test_wave_cpu_splits_cpu_into_bursts_and_the_rest() -> None:
    # The arithmetic on known samples: one process at half a core for a second, three jobs ending
    # in two waves (100 and 110 ms, then 500 ms); bursts of 20 ms after each wave's first end.
    mod = load_script("wave_cpu")
    sampler = mod.Sampler({"a": 1})
    ms = 1_000_000
    sampler.t = [k * ms for k in range(1001)]
    sampler.cpu["a"] = [k * ms // 2 for k in range(1001)]
    sampler.wait["a"] = [k * ms // 4 for k in range(1001)]  # and a quarter of the time it waited
    out = mod.report(sampler, [110 * ms, 100 * ms, 500 * ms], (0, 1000 * ms), gap_ms=50, window_ms=20)
    assert (out["jobs"], out["waves"], out["wave_size_max"]) == (3, 2, 2)
    lead = mod.LEAD_NS / ms
    burst = 2 * (20 + lead) / 2  # two windows, half a core
    row = out["processes"]["a"]
    assert row["burst_ms_per_job"] == pytest.approx(burst / 3)
    assert row["rest_ms_per_job"] == pytest.approx((500 - burst) / 3)
    assert row["burst_wait_ms_per_job"] == pytest.approx(burst / 2 / 3)
    assert out["burst_cores_busy"] == pytest.approx(0.5)
    assert out["cores_busy_by_10ms"] == pytest.approx([0.5, 0.5])
    # Waves closer than the window: their bursts merge, and no nanosecond counts twice.
    out = mod.report(sampler, [100 * ms, 200 * ms], (0, 1000 * ms), gap_ms=50, window_ms=150)
    assert out["waves"] == 2
    assert out["processes"]["a"]["burst_ms_per_job"] == pytest.approx((250 + lead) / 2 / 2)


def test_wave_cpu_script_on_a_run(stack: Stack, redis_server: RedisServer, tmp_path: Path) -> None:
    # A real bench run sampled as it goes, pinned to one CPU: every process followed has a row,
    # the bench did work, and every process's own CPU mask is back afterwards.
    pids = {name: proc.pid for name, proc in stack.procs.items()}
    assert redis_server.proc is not None
    pids["redis"] = redis_server.proc.pid
    masks = {pid: os.sched_getaffinity(pid) for pid in pids.values()}
    cpu = min(os.sched_getaffinity(0))
    out_dir = tmp_path / "wave"
    args = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "wave_cpu.py"),
        "--out",
        str(out_dir),
        "--cpus",
        str(cpu),
    ]
    args += [f"--pid={name}={pid}" for name, pid in pids.items()]
    args += ["--", "--concurrency", "4", "--input-tokens", "64", "--output-tokens", "8", "--requests", "12"]
    args += ["--warmup", "0", "--quiet"]
    done = subprocess.run(args, env=stack.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {pid: os.sched_getaffinity(pid) for pid in pids.values()} == masks
    out = json.loads((out_dir / "wave_cpu.json").read_text())
    assert out["jobs"] == 12 and out["cpus"] == [cpu]
    assert set(out["processes"]) == {*pids, "bench"}
    rows = out["processes"].values()
    assert all(r["burst_ms_per_job"] >= 0 and r["rest_ms_per_job"] >= 0 for r in rows)
    assert all(r["burst_wait_ms_per_job"] >= 0 for r in rows)
    bench = out["processes"]["bench"]
    assert bench["burst_ms_per_job"] + bench["rest_ms_per_job"] > 0
    assert out["overhead_ms"]["50"] > 0
    assert "server-side overhead p50" in done.stdout


def test_skeleton_summarises_stamps_as_the_bench_does() -> None:
    # Two jobs with known stamps (ms): overhead is (finished − received) − (engine_end −
    # engine_start), the engine's two gaps are left out of the hops, and the pipeline's CPU per
    # job leaves Redis out, as the bench counts it.
    mod = load_script("skeleton")
    ms = 1_000_000
    offsets = [0, 1, 2, 3, 4, 5, 6, 105, 107, 108]  # one per TIMESTAMPS entry: 100 ms "engine"
    hashes = [
        {name: str((k * 1000 + o) * ms) for name, o in zip(TIMESTAMPS, offsets, strict=True)} for k in (1, 2)
    ]
    hashes[1]["t_finished"] = str((2000 + 110) * ms)  # the second job's last hop takes 3 ms
    out = mod.summarise(hashes, {"redis": 0.004, "worker": 0.002, "ingestion": 0.002, "proxy": 0.004})
    assert out["jobs"] == 2
    assert out["overhead_ms"]["p50"] == pytest.approx(9.0)  # 8 and 10 ms, numpy's linear percentile
    assert out["overhead_ms"]["p99"] == pytest.approx(9.98)
    hops = out["hops_us_p50"]
    assert len(hops) == len(TIMESTAMPS) - 1 - 2
    assert "engine_start → first_token" not in hops and "first_token → engine_end" not in hops
    assert hops["received → enqueued"] == pytest.approx(1000.0)
    assert hops["result_received → finished"] == pytest.approx((1000 + 3000) / 2)
    assert out["cpu_ms_per_job"]["redis"] == pytest.approx(2.0)
    assert out["cpu_ms_per_job_pipeline"] == pytest.approx(4.0)


def _skeleton_processes() -> list[int]:
    """Pids of any skeleton service still alive (``skeleton.py --serve ...``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"skeleton.py") for c in cmd) and b"--serve" in cmd:
            found.append(int(pid))
    return found


def test_skeleton_script_runs_the_pipelines_shape() -> None:
    # A real run: its own redis-server and three services, a closed loop of two, every job's
    # stamps read back; nothing of it is left running afterwards.
    args = [sys.executable, str(REPO_ROOT / "scripts" / "skeleton.py"), "--json"]
    args += [
        "--concurrency",
        "2",
        "--requests",
        "12",
        "--warmup",
        "2",
        "--hold-ms",
        "5",
        "--hold-spread",
        "0.5",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["jobs"] == 12
    assert 0 < out["overhead_ms"]["p50"] <= out["overhead_ms"]["p90"] <= out["overhead_ms"]["p99"]
    assert len(out["hops_us_p50"]) == len(TIMESTAMPS) - 1 - 2
    assert all(v > 0 for v in out["hops_us_p50"].values())
    assert set(out["cpu_ms_per_job"]) == {"redis", "worker", "ingestion", "proxy"}
    assert all(v > 0 for v in out["cpu_ms_per_job"].values())
    assert _skeleton_processes() == []
    # Bad arguments get a usage error, not a traceback.
    bad = subprocess.run([*args[:3], "--hold-spread", "1.5"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--hold-spread" in bad.stderr and "Traceback" not in bad.stderr


def test_ingest_load_script_sets_ingestion_beside_a_bare_app() -> None:
    # install.sh installs wrk, which drives both; the figures are the script's to print, not this
    # test's to judge (a benchmark, not a timed assertion): it checks that they come out whole.
    script = Path(REPO_ROOT) / "scripts" / "ingest_load.py"
    args = [sys.executable, str(script), "--duration", "1", "--rounds", "1", "--connections", "4", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert len(figures["rounds"]) == 1 and figures["rounds"][0]["ingestion_non2xx"] == 0, figures
    assert figures["bare_rps_mean"] > 0 and figures["ingestion_rps_mean"] > 0, figures
    assert figures["ratio"] == pytest.approx(
        figures["ingestion_rps_mean"] / figures["bare_rps_mean"], abs=0.002
    )


def test_transparency_judges_every_round_against_the_targets() -> None:
    # A target is met only when every round met it; figures without a target are printed, not
    # judged; a missing figure is never counted as met.
    mod = load_script("transparency")
    pipe = {
        "p50_server_overhead_ms": 4.0,
        "p99_server_overhead_ms": 30.0,
        "pipeline_cpu": {"per_job_ms": 5.0, "per_1k_tokens_s": 0.05},
        "stages": {"prompt_build": {"p50_ms": 0.1}},
    }
    rounds = [
        mod.round_figures(
            pipe, {"paired_e2el": {"median_e2el_diff_ms": 9.0}}, {"overhead_ms": {"p50": 3.0, "p99": 9.0}}
        ),
        mod.round_figures(
            {**pipe, "p50_server_overhead_ms": 6.0, "p99_server_overhead_ms": 20.0},
            {"paired_e2el": {"median_e2el_diff_ms": 8.0}},
            None,
        ),
    ]
    ingest = {"ratio": 0.75, "rounds": [{"bare_rps": 100.0, "ingestion_rps": 75.0}]}
    rows = {
        r.target.split(" ≤")[0].split(" <")[0].split(" ≥")[0]: r for r in mod.verdicts(rounds, ingest, 9.0)
    }
    assert rows["ingestion ÷ bare FastAPI"].met is True
    assert (
        rows["server-side overhead p50"].figures == [4.0, 6.0]
        and rows["server-side overhead p50"].met is False
    )
    assert rows["server-side overhead p99"].met is False  # 30 in the first round
    assert rows["pipeline − direct E2EL, paired median"].met is True
    assert rows["prompt_build p50"].met is True
    assert rows["pipeline CPU per job"].met is False  # 5 > 9 / 2
    assert rows["pipeline CPU per 1,000 streamed tokens"].met is None
    assert rows["skeleton overhead p50 (context)"].figures == [3.0]  # the second round had none
    # A round without a figure is not met, even when the other rounds met it; failed jobs are said.
    half = mod.verdicts([rounds[0], mod.round_figures({**pipe, "failed": 2}, None, None)], None, None)
    half_rows = {r.target: r for r in half}
    assert half_rows["pipeline − direct E2EL, paired median ≤ 10 ms"].met is False
    assert half_rows["failed jobs (none expected)"].figures == [0.0, 2.0]
    assert "failed jobs (none expected)" not in {r.target for r in mod.verdicts(rounds, None, None)}
    no_both = mod.verdicts([mod.round_figures(pipe, None, None)], None, None)
    paired = next(r for r in no_both if r.target.startswith("pipeline − direct"))
    assert paired.figures == [] and paired.met is False
    assert not any(r.target.startswith("ingestion") for r in no_both)
    assert next(r for r in no_both if r.target == "pipeline CPU per job").met is None


def test_transparency_script_runs_every_figure_on_a_stack(stack: Stack, tmp_path: Path) -> None:
    # A real, small run of every part (ingestion beside bare FastAPI, pipeline, both, skeleton):
    # the table, the JSON and the plot come out, each figure read from its own run's summary.
    out = tmp_path / "tr"
    args = [sys.executable, str(REPO_ROOT / "scripts" / "transparency.py"), "--rounds", "1"]
    args += ["--concurrency", "2", "--requests", "6", "--both-requests", "4", "--warmup", "0"]
    args += ["--input-tokens", "64", "--output-tokens", "8", "--hold-ms", "20"]
    args += ["--ingest-duration", "1", "--ingest-rounds", "1", "--out", str(out)]
    done = subprocess.run(args, env=stack.env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verdicts here only orient" in done.stdout
    got = json.loads((out / "transparency.json").read_text())
    (r,) = got["rounds"]
    summary = json.loads((out / "round1-pipeline" / "summary.json").read_text())
    assert r["overhead_p50_ms"] == summary["p50_server_overhead_ms"] > 0
    assert r["cpu_ms_per_job"] == summary["pipeline_cpu"]["per_job_ms"] > 0
    assert r["completed"] == 6 and r["failed"] == 0
    both = json.loads((out / "round1-both" / "summary.json").read_text())
    assert r["paired_median_ms"] == both["paired_e2el"]["median_e2el_diff_ms"]
    assert r["skeleton_p50_ms"] > 0 and got["ingest"]["ratio"] > 0
    table = {row["target"]: row for row in got["table"]}
    assert table["server-side overhead p50 ≤ 5 ms"]["met"] == (r["overhead_p50_ms"] <= 5)
    assert (out / "transparency.png").stat().st_size > 0
    bad = subprocess.run([*args[:2], "--rounds", "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--rounds" in bad.stderr and "Traceback" not in bad.stderr


def _live_processes(words: tuple[bytes, ...]) -> set[int]:
    """Pids of live (not zombie) processes whose command line holds one of ``words``."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(w in cmd for w in words):
            found.add(int(pid))
    return found


def test_transparency_stops_a_step_past_its_timeout_with_everything_it_started(tmp_path: Path) -> None:
    # ingest_load.py starts a redis-server and ingestion of its own; past --timeout the whole
    # group goes, and the run stops with a message, not a traceback.
    words = (b"ingest_load.py", b"redis-server", b"services.ingestion")
    before = _live_processes(words)
    script = str(REPO_ROOT / "scripts" / "transparency.py")
    args = [sys.executable, script, "--rounds", "1", "--ingest-duration", "5", "--timeout", "3"]
    done = subprocess.run([*args, "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "took more than 3 s (--timeout): stopped" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    wait_until(lambda: not _live_processes(words) - before, 10, "the stopped step's processes to go")
