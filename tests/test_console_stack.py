"""The console's real sources and its launcher against real processes.

* the pipeline on the simulator (the ``stack`` fixture): queue, jobs, engine metrics, nodes,
  and a benchmark launched from the form that runs to the end;
* a real supervisord with two small programs: states, stop/start/restart, log tail, and
  which processes descend from which program.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from textual.widgets import Input, Select

from console.app import ConsoleApp
from console.collector import BackgroundLoop, Collector
from console.screens.bench import BenchScreen, RunScreen
from console.sources import LibraryBench, ProcTree, SourceDown, XmlRpcSupervisor, real_sources
from services.lifecycle.supervisor_client import supervisor_proxy
from services.settings import REPO_ROOT
from services.telemetry import make_backend
from tests.stackutil import Stack, wait_until

pytestmark = pytest.mark.slow

VENV_BIN = Path(REPO_ROOT) / ".venv" / "bin"


def _submit_and_wait(stack: Stack, n: int) -> list[str]:
    with httpx.Client(timeout=30) as c:
        ids = [stack.submit(c, input_tokens=32, output_tokens=8, label="console-test") for _ in range(n)]
        for job_id in ids:
            assert stack.wait_job(c, job_id)["state"] == "succeeded"
    return ids


async def test_collector_reads_the_real_stack(stack: Stack) -> None:
    ids = _submit_and_wait(stack, 3)
    sources = real_sources(stack.settings)
    loop = BackgroundLoop()
    try:
        collector = Collector(sources)
        await loop.run(collector.collect())
        snap = await loop.run(collector.collect())
    finally:
        loop.close(sources.aclose())
    q = snap.queue
    assert q.error is None
    assert q.submitted >= 3 and q.succeeded >= 3 and q.consumers >= 1
    shown = {j.job_id: j for j in snap.jobs.jobs}
    for job_id in ids:
        job = shown[job_id]
        assert job.state == "succeeded"
        assert job.result is not None and job.result.completion_tokens == 8
        assert job.stages_s["queue_wait"] is not None
    e = snap.engine
    assert e.error is None and e.running is not None and e.requests_total is not None
    assert e.requests_total >= 3
    # No supervisord in this stack: said plainly. GPUs: what NVML reads here, or NVML's reason
    # as the node reported it.
    assert snap.services.error is not None and "supervisord is not running" in snap.services.error
    assert [n.node for n in snap.gpus.nodes] == ["test-node"]
    nvml = make_backend()
    if nvml.available():
        assert len(snap.gpus.gpus) == len(nvml.sample()) and snap.gpus.no_gpu_reason is None
    else:
        assert snap.gpus.gpus == ()
        assert snap.gpus.no_gpu_reason is not None and str(nvml.reason) in snap.gpus.no_gpu_reason


async def test_launch_a_benchmark_from_the_form_against_the_stack(stack: Stack) -> None:
    settings = stack.settings
    app = ConsoleApp(real_sources(settings), bench=LibraryBench(settings), refresh_s=1.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        form = {
            "input_tokens": "48",
            "output_tokens": "6",
            "prefix_share": "0.5",
            "requests": "8",
            "load_value": "2",
        }
        for name, value in form.items():
            screen.query_one(f"#f-{name}", Input).value = value
        screen.query_one("#f-label", Input).value = "from-the-form"
        screen.query_one("#f-path", Select).value = "both"
        await pilot.pause()
        assert screen.config is not None
        await pilot.press("ctrl+r")
        deadline = time.monotonic() + 90
        while not isinstance(app.screen, RunScreen) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        assert isinstance(app.screen, RunScreen), (
            f"no result; status: {screen.query_one('#bench-status').render()}"
        )
        result = app.screen.result
        assert result.summary["label"] == "from-the-form"
        paths = result.summary["paths"]
        assert paths["pipeline"]["completed"] == 8 and paths["direct"]["completed"] == 8
        assert paths["pipeline"]["failed"] == 0
        assert all(r.completion_tokens == 6 for r in result.records)
        # The run is stored: the runs list finds it.
        rows = await app.bg.run(LibraryBench(settings).runs())
        row = next(r for r in rows if r.run_id == result.run_id)
        assert row.state == "finished" and row.label == "from-the-form"


# ---------------------------------------------------------------------------
# A real supervisord
# ---------------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    print("parent up", flush=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child {child.pid}", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def supervisord(tmp_path: Path) -> Iterator[Path]:
    """supervisord with programs 'parent' (which starts a child) and 'sleeper'; yields its socket."""
    (tmp_path / "parent.py").write_text(PARENT)
    sock = tmp_path / "supervisor.sock"
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            [unix_http_server]
            file={sock}
            chmod=0700
            [supervisord]
            logfile={tmp_path}/supervisord.log
            pidfile={tmp_path}/supervisord.pid
            childlogdir={tmp_path}
            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
            [program:parent]
            command={sys.executable} -u {tmp_path}/parent.py
            startsecs=1
            stopasgroup=true
            killasgroup=true
            redirect_stderr=true
            stdout_logfile={tmp_path}/parent.log
            [program:sleeper]
            command=sleep 600
            startsecs=1
            stdout_logfile={tmp_path}/sleeper.log
            """
        )
    )
    subprocess.run([VENV_BIN / "supervisord", "-c", conf], check=True)
    sup = XmlRpcSupervisor(sock)
    try:
        wait_until(
            lambda: (
                all(p.state == "RUNNING" for p in sup.client.processes()) and len(sup.client.processes()) == 2
            ),
            30,
            "supervisord programs running",
        )
        yield sock
    finally:
        with contextlib.suppress(Exception):
            supervisor_proxy(sock).supervisor.shutdown()
        pid_file = tmp_path / "supervisord.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "supervisord gone")


async def test_supervisor_source_against_a_real_supervisord(supervisord: Path) -> None:
    sup = XmlRpcSupervisor(supervisord)
    procs = {p.name: p for p in await sup.processes()}
    assert set(procs) == {"parent", "sleeper"}
    assert all(p.state == "RUNNING" and p.pid > 0 for p in procs.values())
    assert procs["parent"].uptime_s is not None

    # vLLM-like: the program's child process is attributed to the program.
    wait_until(lambda: "child" in sup.client.tail("parent", 0, 4096).text, 10, "parent log")
    log = (await sup.tail("parent", 0, 4096)).text
    child_pid = int(log.split("child ")[1].split()[0])
    owners = await ProcTree().owners({procs["parent"].pid: "parent", procs["sleeper"].pid: "sleeper"})
    assert owners[child_pid] == "parent"
    assert owners[procs["sleeper"].pid] == "sleeper"

    chunk = await sup.tail("parent", 0, 4096)
    assert "parent up" in chunk.text and chunk.offset > 0
    more = await sup.tail("parent", chunk.offset, 4096)
    assert more.text == "" and more.offset == chunk.offset

    await sup.stop("sleeper")
    assert {p.name: p.state for p in await sup.processes()}["sleeper"] == "STOPPED"
    await sup.start("sleeper")
    after_start = {p.name: p for p in await sup.processes()}["sleeper"]
    assert after_start.state == "RUNNING"
    await sup.restart("sleeper")
    restarted = {p.name: p for p in await sup.processes()}["sleeper"]
    assert restarted.state == "RUNNING" and restarted.pid != after_start.pid
    with pytest.raises(SourceDown, match=r"no_such_program|BAD_NAME"):
        await sup.start("no_such_program")


async def test_supervisor_source_without_supervisord(tmp_path: Path) -> None:
    with pytest.raises(SourceDown, match="supervisord is not running"):
        await XmlRpcSupervisor(tmp_path / "supervisor.sock").processes()
    # A socket file nobody listens on: unreachable, said plainly.
    import socket

    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    with pytest.raises(SourceDown, match="unreachable"):
        await XmlRpcSupervisor(path).processes()
