"""The nodes in the GPU panel (state, in flight / capacity, hit rate, share) and draining one, on fakes."""

from __future__ import annotations

import dataclasses
from typing import Any

from textual.widgets import OptionList, Static

from console.app import ConsoleApp
from console.collector import Collector, node_job_figures
from console.fakes import CLUSTER_NODES, FakeBench, FakeClock, FakeStack, fake_sources, fixed_wall, make_job
from console.model import NodeView
from console.screens.dialogs import ConfirmScreen, PickScreen
from console.screens.overview import OverviewScreen
from console.sources import RedisStack, Sources
from services.contracts import JobState, Keys, NodeHeartbeat, new_id
from services.settings import Settings
from tests.stackutil import RedisServer
from tests.test_console_snapshots import SnapCompare, prepared


def make_app(sources: Sources | None = None, **kw: Any) -> ConsoleApp:
    return ConsoleApp(
        sources or fake_sources(gpu=False, cluster=True),
        bench=FakeBench(),
        refresh_s=3600,
        clock=FakeClock(),
        wall=fixed_wall,
        **kw,
    )


def gpu_text(app: ConsoleApp) -> str:
    return str(app.screen.query_one("#gpu-text", Static).render())


def test_share_and_hit_rate_come_from_the_recent_jobs() -> None:
    nodes = (NodeView("a"), NodeView("b"), NodeView("c"))
    jobs = [
        make_job(1, node="a", cached_share=0.5, input_tokens=100),
        make_job(2, node="a", cached_share=1.0, input_tokens=300),
        make_job(3, node="b", cached_share=0.0, input_tokens=100),
        make_job(4, JobState.RUNNING, node="c"),  # not finished: not counted
        make_job(5, JobState.FAILED, node="c"),
    ]
    a, b, c = node_job_figures(nodes, jobs)
    assert a.share == 2 / 3 and a.hit_rate == (50 + 300) / 400
    assert b.share == 1 / 3 and b.hit_rate == 0
    assert c.share is None and c.hit_rate is None


async def test_every_node_with_its_state_load_and_cache_figures() -> None:
    app = make_app()
    async with app.run_test(size=(160, 44)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        text = gpu_text(app)
        a, b, c, d = CLUSTER_NODES
        # 15 succeeded jobs (37..21 but 33 and 27), job n on node n mod 3: a 4, b 6, c 5;
        # a caches 80 % of each prompt (rounded down to whole tokens), b 25 %.
        assert f"{a} up 15/128 · 27% jobs" in text and "hit 79.9%" in text
        assert f"{b} up 10/128 · 40% jobs" in text and "hit 25.0%" in text
        assert f"{c} draining 5/128 · 33% jobs" in text
        assert f"{d} lost" in text and "no heartbeat" in text
        assert "hit 79.9% · sim 0.1" in text  # the simulator's engine name, shortened
        assert "No GPU" in text


async def test_drain_picks_a_node_asks_and_sets_the_flag() -> None:
    sources = fake_sources(gpu=False, cluster=True)
    stack = sources.nodes
    assert isinstance(stack, FakeStack)
    app = make_app(sources)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("d")
        await pilot.pause()
        picker = app.screen
        assert isinstance(picker, PickScreen)
        # Only nodes that are up can be drained.
        options = picker.query_one(OptionList)
        assert [options.get_option_at_index(i).id for i in range(options.option_count)] == list(
            CLUSTER_NODES[:2]
        )
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert CLUSTER_NODES[1] in app.screen.question
        await pilot.press("n")  # no: nothing happens
        await pilot.pause()
        assert stack.drained == []
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("down", "enter")
        await pilot.pause()
        await pilot.press("y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert stack.drained == [CLUSTER_NODES[1]]
        assert isinstance(app.screen, OverviewScreen)
        assert f"{CLUSTER_NODES[1]} draining" in gpu_text(app)


async def test_one_node_up_is_asked_about_directly_and_readonly_cannot_drain() -> None:
    sources = fake_sources()
    stack = sources.nodes
    assert isinstance(stack, FakeStack)
    app = make_app(sources)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await app.workers.wait_for_complete()
        assert stack.drained == ["gpu-node-1"]
    ro_sources = fake_sources()
    ro = make_app(ro_sources, readonly=True)
    async with ro.run_test(size=(80, 24)) as pilot:
        await ro.workers.wait_for_complete()
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(ro.screen, OverviewScreen)  # the key does nothing in read-only mode
        assert ro_sources.nodes.drained == []  # type: ignore[attr-defined]


def test_cluster_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=prepared())


def test_cluster_wide(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(160, 44), run_before=prepared())


async def test_redis_nodes_and_drain_on_a_real_redis(redis_server: RedisServer) -> None:
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_port=redis_server.port,
        redis_password=redis_server.password,
        redis_prefix=f"t{new_id()[-10:]}:",
    )
    keys = Keys(s.redis_prefix)
    stack = RedisStack(s)
    try:
        beat = NodeHeartbeat(node="n1", url="http://127.0.0.1:1", engine="sim", capacity=128, in_flight=3)
        await stack.r.sadd(keys.nodes, "n1", "n2")
        await stack.r.hset(keys.node("n1"), mapping=beat.to_redis())
        collector = Collector(fake_sources(), clock=FakeClock(), wall=fixed_wall)
        collector.sources = dataclasses.replace(collector.sources, nodes=stack)
        views = {n.node: n for n in (await collector.collect()).gpus.nodes}
        assert views["n1"].state == "up" and views["n1"].capacity == 128 and views["n1"].in_flight == 3
        assert views["n2"].state == "lost"  # registered, no heartbeat
        await stack.drain("n1")
        assert await stack.r.exists(keys.node_drain("n1")) == 1  # the flag --leave sets too
        views = {n.node: n for n in (await collector.collect()).gpus.nodes}
        assert views["n1"].state == "draining"
    finally:
        await stack.aclose()
