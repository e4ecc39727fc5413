"""Unit tests of the shared contracts."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from services.contracts import (
    STAGES,
    TIMESTAMPS,
    JobRequest,
    JobSpec,
    JobState,
    Keys,
    engine_time_s,
    job_hash_to_view,
    stage_durations,
    valid_id,
)


def test_stages_chain_from_received_to_finished() -> None:
    # Stages follow each other without gaps or overlaps, and cover the whole path.
    assert STAGES[0].start == TIMESTAMPS[0] and STAGES[-1].end == TIMESTAMPS[-1]
    for a, b in itertools.pairwise(STAGES):
        assert a.end == b.start
    for st in STAGES:
        assert TIMESTAMPS.index(st.start) < TIMESTAMPS.index(st.end)


def test_stage_durations_sum_to_end_to_end() -> None:
    ts = {name: 1_000_000_000 * (i + 1) + i * i * 1000 for i, name in enumerate(TIMESTAMPS)}
    d = stage_durations(ts)
    assert set(d) == {s.name for s in STAGES}
    total = sum(v for v in d.values() if v is not None)
    assert total == pytest.approx((ts["t_finished"] - ts["t_received"]) / 1e9)
    assert engine_time_s(ts) == pytest.approx((ts["t_engine_end"] - ts["t_engine_start"]) / 1e9)


def test_stage_durations_missing_timestamp_is_none() -> None:
    d = stage_durations({"t_received": 1, "t_enqueued": 5})
    assert d["ingest"] == pytest.approx(4e-9)
    assert d["queue_wait"] is None


def test_terminal_states() -> None:
    assert {s for s in JobState if s.terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD}


@pytest.mark.parametrize(
    "body",
    [
        {"input_tokens": 0},
        {"input_tokens": -5},
        {"output_tokens": 10**9},
        {"input_tokens": "100"},  # strings are not numbers
        {"prefix_share": 1.5},
        {"unknown": 1},
        {"prompt": ""},
        {"prompt": "hi", "input_tokens": 10},
        {"run_id": "bad id with spaces"},
        {"label": "x" * 1000},
    ],
)
def test_job_request_rejects(body: dict) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(body)


def test_job_request_accepts_seed_shape() -> None:
    r = JobRequest.model_validate(
        {"input_tokens": 1000, "output_tokens": 500, "prefix_share": 0.5, "run_id": "r1"}
    )
    assert r.input_tokens == 1000 and r.prompt is None


def test_keys_share_one_prefix() -> None:
    k = Keys("abc:")
    names = [
        k.stream,
        k.dead,
        k.job("x"),
        k.active,
        k.stats,
        k.recent,
        k.idempotency("i"),
        k.events,
        k.run("r"),
        k.run_jobs("r"),
        k.runs,
        k.nodes,
        k.node("n"),
        k.gpu_samples("n"),
        k.consumer_heartbeat("c"),
    ]
    assert all(n.startswith("abc:") for n in names)
    assert len(set(names)) == len(names)


def test_valid_id() -> None:
    assert valid_id("j18c2abc")
    assert not valid_id("../etc/passwd")
    assert not valid_id("")
    assert not valid_id("a" * 65)


def test_job_hash_round_trip() -> None:
    spec = JobSpec(job_id="j1", input_tokens=10, output_tokens=5, prefix_share=0.5, seed=3)
    view = job_hash_to_view(
        {
            "job_id": "j1",
            "state": "running",
            "attempt": "2",
            "spec": spec.model_dump_json(),
            "t_received": "100",
            "t_enqueued": "300",
        }
    )
    assert view.state is JobState.RUNNING and view.attempt == 2 and view.spec == spec
    assert view.stages_s["ingest"] == pytest.approx(200e-9)
