"""Benchmarking routing: --routing, --prefix-groups, per-node figures, compare of two policies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError
from rich.console import Console

from bench import load_run, run_benchmark
from bench.cli import UsageError, config_from_args, run_parser
from bench.compare import Comparison, compare_summaries
from bench.config import BenchConfig
from bench.metrics import routing_metrics
from bench.paths import PipelinePath
from bench.records import RequestRecord
from bench.render import comparison_table, routing_table
from bench.runner import RunResult
from bench.workload import assign_groups, build_workload
from services.contracts import JobSpec, RoutingPolicy, prefix_key
from services.routing.policies import JobInfo, NodeView, choose
from services.settings import Settings
from tests.stackutil import Stack


def _settings() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_groups_are_balanced_shuffled_and_seeded() -> None:
    g = assign_groups(100, 16, seed=7)
    counts = Counter(g)
    assert set(counts) == set(range(16))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert g == assign_groups(100, 16, seed=7)
    assert g != assign_groups(100, 16, seed=8)
    assert g != sorted(g)  # shuffled, not group after group


def test_workload_items_carry_their_group_and_jobs_their_own_prefix_key() -> None:
    cfg = BenchConfig(prefix_groups=4, requests=40, input_tokens=256, routing="round_robin").resolved(
        _settings()
    )
    items = build_workload(cfg, 40, "step0")
    assert Counter(it.prefix_group for it in items) == {0: 10, 1: 10, 2: 10, 3: 10}
    path = PipelinePath(_settings(), "run-x", None, routing=cfg.routing)
    bodies = [path.job_request(it) for it in items]
    assert {b.routing for b in bodies} == {"round_robin"}
    assert [b.prefix_group for b in bodies] == [it.prefix_group for it in items]
    # The routers' prefix key separates the groups (and is shared inside one).
    keys = {
        b.prefix_group: prefix_key(
            JobSpec(job_id="j", seed=1, **b.model_dump(exclude={"routing", "seed"}, exclude_none=True))
        )
        for b in bodies
    }
    assert len(set(keys.values())) == 4
    # Without groups nothing changes: no group on items or jobs.
    plain = build_workload(BenchConfig(requests=3).resolved(_settings()), 3, "step0")
    assert {it.prefix_group for it in plain} == {None}


def test_cli_flags_and_their_checks() -> None:
    p = run_parser(_settings())
    cfg = config_from_args(p.parse_args(["--routing", "least_loaded", "--prefix-groups", "16"]))
    assert cfg.routing == "least_loaded" and cfg.prefix_groups == 16
    with pytest.raises(UsageError, match="invalid choice: 'random'"):
        p.parse_args(["--routing", "random"])  # choices: the policies the proxy knows
    # Every policy of the contracts, kv_events included, and each one the routers know.
    assert "kv_events" in get_args(RoutingPolicy)
    for policy in get_args(RoutingPolicy):
        assert config_from_args(p.parse_args(["--routing", policy])).routing == policy
        assert choose(policy, JobInfo("k"), [NodeView("n", 0, 4)]) is not None
    with pytest.raises(ValidationError, match="routing applies to the pipeline"):
        BenchConfig(routing="round_robin", path="direct")
    with pytest.raises(ValidationError, match="prefix groups are a synthetic workload"):
        BenchConfig(prefix_groups=4, dataset="x.jsonl")


def _rec(i: int, node: str, group: int, cached: int, start: float, end: float) -> RequestRecord:
    return RequestRecord(
        index=i,
        path="pipeline",
        success=True,
        sent_s=float(i),
        node=node,
        policy="prefix_affinity",
        prefix_group=group,
        prefix_tokens=80,
        prompt_tokens=100,
        cached_tokens=cached,
        ttft_s=0.01 if cached else 0.05,
        node_start_s=start,
        node_end_s=end,
    )


def test_routing_metrics_per_node_hotspot_and_allowed_hit_rate() -> None:
    recs = [
        _rec(0, "a", 0, 0, 0.0, 2.0),  # group 0's first: a cold miss
        _rec(1, "a", 0, 80, 1.0, 3.0),
        _rec(2, "a", 0, 80, 1.5, 2.5),
        _rec(3, "b", 1, 0, 0.5, 1.0),  # group 1's first
        RequestRecord(index=4, path="pipeline", success=False, node="b"),  # failed: not counted
        RequestRecord(index=5, path="direct", success=True, prompt_tokens=100),  # direct: no node
    ]
    m = routing_metrics(recs, ["a", "b", "c"], policy=None, prefix_groups=2)
    assert m is not None
    assert m["policy"] == "prefix_affinity"
    assert m["nodes"]["a"]["jobs"] == 3 and m["nodes"]["b"]["jobs"] == 1 and m["nodes"]["c"]["jobs"] == 0
    assert m["nodes"]["a"]["share"] == pytest.approx(0.75)
    assert m["nodes"]["a"]["hit_rate"] == pytest.approx(160 / 300)
    assert m["nodes"]["b"]["hit_rate"] == 0
    assert m["nodes"]["a"]["in_flight_peak"] == 3  # all three overlap in [1.5, 2.0)
    assert m["nodes"]["b"]["in_flight_peak"] == 1
    # 3 live nodes, largest share 3/4: 2.25 (1.0 would be even)
    assert m["hotspot"] == pytest.approx(2.25)
    assert m["hit_rate"] == pytest.approx(160 / 400)
    # shared 4 × 80, less each group's first 80 (two groups), over 400 prompt tokens
    assert m["hit_rate_allowed"] == pytest.approx((320 - 160) / 400)
    assert m["hit_rate_of_allowed"] == pytest.approx(1.0)
    assert routing_metrics([RequestRecord(index=0, path="direct", success=True)]) is None
    # the table names every node, the empty one too
    text = _render(routing_table(m))
    assert "hotspot 2.25" in text
    assert any(line.startswith("│ c ") and "0.0 %" in line for line in text.splitlines())


def _render(t: object) -> str:
    c = Console(width=160, record=True)
    c.print(t)
    return c.export_text()


def test_compare_shows_two_policies_side_by_side() -> None:
    a = {"routing": {"policy": "round_robin", "hit_rate": 0.2, "hit_rate_of_allowed": 0.25, "hotspot": 1.02}}
    b = {
        "routing": {
            "policy": "prefix_affinity",
            "hit_rate": 0.76,
            "hit_rate_of_allowed": 0.95,
            "hotspot": 1.3,
        }
    }
    rows = {r.key: r for r in compare_summaries(a, b) if r.section == "routing"}
    assert rows["hit_rate"].verdict == "better"
    assert rows["hotspot"].verdict == "worse"
    assert rows["hit_rate_of_allowed"].ratio == pytest.approx(3.8)
    # The table's title names each run's policy (it once vanished as a rich markup tag).
    b["routing"]["policy"] = "kv_events"
    runs = [RunResult(f"run-{x}", BenchConfig(), s, []) for x, s in (("a", a), ("b", b))]
    text = _render(comparison_table(Comparison(*runs, compare_summaries(a, b))))
    assert "[routing round_robin]" in text and "[routing kv_events]" in text


@pytest.mark.slow
async def test_a_routed_prefix_group_run_through_the_stack(make_stack, tmp_path: Path) -> None:
    st: Stack = make_stack(sim_block_size=16)
    cfg = BenchConfig(
        input_tokens=256,
        output_tokens=4,
        prefix_share=0.5,
        prefix_groups=4,
        requests=24,
        concurrency=1,  # one at a time: a group's second job always finds its first one's blocks
        routing="least_loaded",
        out=str(tmp_path / "run"),
        plots=False,
    )
    res = await run_benchmark(cfg, settings=st.settings)
    assert res.summary["completed"] == 24, res.summary.get("errors")
    node = st.values["node_id"]
    # Every job went the way the run asked, and says so.
    assert {(r.policy, r.node) for r in res.records} == {("least_loaded", node)}
    assert Counter(r.prefix_group for r in res.records) == {0: 6, 1: 6, 2: 6, 3: 6}
    routing = res.summary["routing"]
    assert routing["policy"] == "least_loaded" and routing["prefix_groups"] == 4
    assert routing["nodes"][node]["jobs"] == 24 and routing["nodes"][node]["share"] == 1.0
    assert routing["hotspot"] == 1.0 and routing["nodes_live"] == 1
    # Four groups, four prefixes: each group's first job misses, the other 20 hit their prefix
    # (128 tokens, whole 16-token blocks), as many as the workload allows.
    assert routing["hit_rate_allowed"] == pytest.approx(20 * 128 / (24 * 256))
    assert routing["cached_tokens"] == 20 * 128
    assert routing["hit_rate_of_allowed"] == pytest.approx(1.0)
    # The summary and the saved run carry it; `bench show` prints the nodes table.
    again = load_run(tmp_path / "run")
    assert again.summary["routing"] == routing
    assert again.summary["routing_policy"] == "least_loaded"
