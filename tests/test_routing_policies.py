"""Routing policies as pure functions: no Redis, no processes."""

from __future__ import annotations

from collections import Counter

import pytest

from services.contracts import JobSpec, prefix_key
from services.routing.policies import (
    Guards,
    JobInfo,
    NodeView,
    choose,
    imbalanced,
    least_loaded,
    over_fair_share,
    prefix_affinity,
    round_robin,
)


def views(*loads: int, cap: int = 10) -> list[NodeView]:
    """Nodes n0, n1, ... with these in-flight counts."""
    return [NodeView(f"n{i}", x, cap) for i, x in enumerate(loads)]


def test_round_robin_cycles_and_skips_full_nodes() -> None:
    nodes = views(0, 0, 0)
    assert [round_robin(nodes, t).node for t in range(6)] == ["n0", "n1", "n2", "n0", "n1", "n2"]  # type: ignore[union-attr]
    nodes = [NodeView("n0", 0, 1), NodeView("n1", 1, 1), NodeView("n2", 0, 1)]
    assert [round_robin(nodes, t).node for t in range(3)] == ["n0", "n2", "n2"]  # type: ignore[union-attr]
    assert round_robin(views(10, 10), 0) is None


def test_least_loaded_uses_load_relative_to_capacity_and_spreads_ties() -> None:
    nodes = [NodeView("big", 10, 100), NodeView("small", 2, 4)]
    assert least_loaded(nodes).node == "big"  # type: ignore[union-attr]
    picks = Counter(least_loaded(views(0, 0, 0), t).node for t in range(30))  # type: ignore[union-attr]
    assert picks == {"n0": 10, "n1": 10, "n2": 10}
    assert least_loaded(views(10, 10)) is None


def test_imbalance_guard_needs_both_thresholds() -> None:
    g = Guards(balance_abs=4, balance_rel=1.5)
    assert imbalanced(views(10, 5), g)  # 5 > 4 and 10 > 7.5
    assert not imbalanced(views(9, 5), g)  # 4 is not > 4
    assert not imbalanced(views(40, 30), Guards(balance_abs=4, balance_rel=1.5))  # 40 < 45
    assert not imbalanced(views(40), g)


def test_prefix_affinity_sticks_to_the_owner() -> None:
    g = Guards(balance_abs=100, fair_share=1.5, fair_share_abs=4)
    nodes = views(3, 2, 2, cap=64)
    d = prefix_affinity(JobInfo("p1", ("n0",)), nodes, 0, g)
    assert d is not None and (d.node, d.reason, d.owners) == ("n0", "prefix_hit", ("n0",))


def test_a_new_prefix_goes_to_the_node_owning_fewest_prefixes() -> None:
    nodes = [NodeView("a", 0, 64, prefixes=3), NodeView("b", 5, 64, prefixes=1), NodeView("c", 0, 64, 2)]
    d = prefix_affinity(JobInfo("new"), nodes)
    assert d is not None and (d.node, d.reason, d.owners) == ("b", "prefix_new", ("b",))


def test_without_a_prefix_it_is_least_loaded() -> None:
    d = prefix_affinity(JobInfo(""), views(5, 1, 3))
    assert d is not None and (d.node, d.reason) == ("n1", "least_loaded")


def test_imbalance_sends_the_job_to_the_least_loaded_node_and_it_becomes_an_owner() -> None:
    g = Guards(balance_abs=8, balance_rel=1.5, fair_share=100)
    d = prefix_affinity(JobInfo("p", ("n0",)), views(30, 2, 10, cap=64), 0, g)
    assert d is not None and (d.node, d.reason, d.owners) == ("n1", "imbalance", ("n0", "n1"))


def test_fair_share_guard_spreads_a_hot_prefix() -> None:
    g = Guards(balance_abs=1000, fair_share=1.5, fair_share_abs=2, spill_load=0.1)
    nodes = views(12, 2, 2, 2, cap=64)  # total 18+1 → fair 4.75 per node → limit 9.1; 13 > 6.4
    assert over_fair_share(nodes[0], nodes, g)
    assert not over_fair_share(nodes[1], nodes, g)
    d = prefix_affinity(JobInfo("hot", ("n0",)), nodes, 0, g)
    assert d is not None and d.reason == "fair_share" and d.node != "n0"
    assert d.owners == ("n0", d.node)
    # Below spill_load × capacity the owner keeps the job (its engine runs it at once).
    d = prefix_affinity(JobInfo("hot", ("n0",)), nodes, 0, Guards(balance_abs=1000, spill_load=0.5))
    assert d is not None and (d.node, d.reason) == ("n0", "prefix_hit")


def test_a_full_owner_is_passed_over() -> None:
    nodes = [NodeView("a", 4, 4), NodeView("b", 0, 4)]
    d = prefix_affinity(JobInfo("p", ("a",)), nodes)
    assert d is not None and d.node == "b" and d.owners == ("a", "b")


def test_owners_that_left_are_ignored() -> None:
    d = prefix_affinity(JobInfo("p", ("gone", "n1")), views(0, 0))
    assert d is not None and (d.node, d.reason, d.owners) == ("n1", "prefix_hit", ("n1",))


def test_none_when_every_node_is_full_or_there_is_none() -> None:
    for policy in ("round_robin", "least_loaded", "prefix_affinity"):
        assert choose(policy, JobInfo("p", ("n0",)), views(10, 10)) is None
        assert choose(policy, JobInfo("p"), []) is None


def test_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin, least_loaded, prefix_affinity or kv_events"):
        choose("random", JobInfo(), views(0))


def simulate(
    policy: str, groups: list[str], nodes: int, cap: int, g: Guards
) -> tuple[Counter[str], dict[str, set[str]]]:
    """Route a stream of jobs with ``in_flight`` jobs each held for a while; returns per-node counts."""
    owners: dict[str, tuple[str, ...]] = {}
    held: list[str] = []
    load = Counter[str]()
    served: Counter[str] = Counter()
    where: dict[str, set[str]] = {}
    for t, grp in enumerate(groups):
        firsts = Counter(o[0] for o in owners.values())
        vs = [NodeView(f"n{i}", load[f"n{i}"], cap, firsts[f"n{i}"]) for i in range(nodes)]
        d = choose(policy, JobInfo(grp, owners.get(grp, ())), vs, t, g)
        assert d is not None
        if d.owners:
            owners[grp] = d.owners
        load[d.node] += 1
        held.append(d.node)
        served[d.node] += 1
        where.setdefault(grp, set()).add(d.node)
        if len(held) > nodes * cap // 2:  # steady state: half the total capacity in flight
            load[held.pop(0)] -= 1
    return served, where


def test_even_prefix_groups_stay_on_one_node_each_and_spread_evenly() -> None:
    groups = [f"g{i % 16}" for i in range(4000)]
    served, where = simulate("prefix_affinity", groups, 4, 64, Guards())
    assert all(len(nodes) == 1 for nodes in where.values()), where
    hotspot = 4 * max(served.values()) / sum(served.values())
    assert hotspot <= 1.05, served


def test_one_hot_prefix_does_not_pin_everything_on_one_node() -> None:
    # 80 % of the jobs share one prefix; the rest are 15 cold groups.
    groups = ["hot" if i % 5 else f"c{i % 15}" for i in range(4000)]
    served, where = simulate("prefix_affinity", groups, 4, 64, Guards())
    hotspot = 4 * max(served.values()) / sum(served.values())
    assert hotspot <= 1.5, served
    assert len(where["hot"]) > 1
    # Round robin is even, but scatters every group over every node.
    _rr, where_rr = simulate("round_robin", groups, 4, 64, Guards())
    assert all(len(n) == 4 for n in where_rr.values())


def test_prefix_key_groups_jobs_by_run_and_group() -> None:
    def spec(**kw: object) -> JobSpec:
        base: dict[str, object] = {
            "job_id": "j",
            "input_tokens": 100,
            "output_tokens": 10,
            "prefix_share": 0.5,
            "seed": 1,
        }
        return JobSpec.model_validate({**base, **kw})

    assert prefix_key(spec(run_id="r", seed=2)) == prefix_key(spec(run_id="r", seed=3))
    assert prefix_key(spec(run_id="r", prefix_group=1)) != prefix_key(spec(run_id="r", prefix_group=2))
    assert prefix_key(spec(run_id="r")) != prefix_key(spec(run_id="s"))
    assert prefix_key(spec(run_id="r", prefix_share=0.0)) == ""
    assert prefix_key(spec(input_tokens=None, prompt="x" * 300)) == prefix_key(
        spec(input_tokens=None, prompt="x" * 256 + "y")
    )
