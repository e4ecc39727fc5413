"""``llmconsole --web``: the project's own page, and app processes that end with their browser."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from console import web
from tests.stackutil import free_port, wait_until

pytestmark = pytest.mark.slow  # the web console and its app processes are real processes


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "--web", "--demo", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200, 30, "web console"
        )
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_makes_no_request_outside_the_server(server: tuple[subprocess.Popen[bytes], int]) -> None:
    _proc, port = server
    page = httpx.get(f"http://127.0.0.1:{port}/").text
    urls = re.findall(r"""(?:https?|wss?)://[^\s"')]+""", page)
    ours = (f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/")
    outside = [u for u in urls if not u.startswith(ours) and "www.w3.org/2000/svg" not in u]
    assert outside == []
    assert f"ws://127.0.0.1:{port}/ws" in page
    # The fonts it names are served by the same server.
    font = re.search(r'url\("([^"]+RobotoMono-VariableFont_wght\.ttf)"\)', page)
    assert font is not None
    assert httpx.get(font.group(1)).status_code == 200


async def test_app_process_ends_when_the_browser_goes_away(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = server
    url = f"ws://127.0.0.1:{port}/ws?width=100&height=30"

    async def gone() -> bool:
        for _ in range(200):
            if not children_of(proc.pid):
                return True
            await asyncio.sleep(0.05)
        return False

    async def started() -> bool:
        for _ in range(200):
            if children_of(proc.pid):
                return True
            await asyncio.sleep(0.05)
        return False

    async with aiohttp.ClientSession() as session:
        # A browser that leaves once the overview is drawn.
        async with session.ws_connect(url) as ws:
            seen = b""
            while b"Queue" not in seen or b"Services" not in seen:
                msg = await ws.receive(timeout=60)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                seen += msg.data
            assert len(children_of(proc.pid)) == 1
        assert await gone()
        # Connections that close before the app has drawn anything (left orphans spinning before):
        # each one's app process is seen started, then the browser leaves at once.
        for _ in range(3):
            async with session.ws_connect(url):
                assert await started(), "no app process was started for the connection"
            assert await gone()


async def test_a_process_that_ignores_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "QUIT_GRACE_S", 0.2)
    monkeypatch.setattr(web, "TERM_GRACE_S", 0.5)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"up\n"
    await web.end_process_group(proc)
    assert proc.returncode == -signal.SIGKILL
