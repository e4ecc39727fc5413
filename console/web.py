"""``llmconsole --web``: the same console in a browser, served by textual-serve on loopback.

Two changes to textual-serve's stock server:

* the page is the project's own template (``console/webpage/app_index.html``)
  whose fonts come from textual-serve's bundled files, so the page makes no
  request to any other host;
* every browser connection's app process is started in its own session and
  is ended for sure when the browser goes away: a polite ``quit`` first, then
  SIGTERM, then SIGKILL to its whole process group. (The stock service only
  asks the app to quit; an app that had not drawn yet could miss that and
  stay behind spinning.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

log = logging.getLogger("llmconsole.web")

TEMPLATES = Path(__file__).with_name("webpage")
#: How long an app process gets to quit by itself, then after SIGTERM.
QUIT_GRACE_S = 2.0
TERM_GRACE_S = 2.0
#: WebSocket ping interval; a browser that stops answering is gone.
HEARTBEAT_S = 5.0


class ConsoleAppService(AppService):
    """One browser connection's app process, ended with its process group when the browser leaves."""

    async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
        env = self._build_environment(width=width, height=height)
        # exec, not a shell: the pid we hold is the app itself; its own session lets us
        # signal everything it started in one go.
        self._process = process = await asyncio.create_subprocess_exec(
            *shlex.split(self.command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    async def stop(self) -> None:
        """Ask the app to quit; if it does not within the grace time, terminate, then kill its group."""
        process = self._process
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._download_manager.cancel_app_downloads(app_service_id=self.app_service_id)
            with contextlib.suppress(Exception):
                await self.send_meta({"type": "quit"})
        if process is not None:
            await end_process_group(process)
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, QUIT_GRACE_S)


async def end_process_group(process: asyncio.subprocess.Process) -> None:
    """Wait a little for ``process`` to exit, then SIGTERM and SIGKILL its process group."""
    for sig, grace in ((None, QUIT_GRACE_S), (signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        if process.returncode is not None:
            return
        if sig is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)


class ConsoleServer(Server):
    """textual-serve's server with the project's page and process handling."""

    def __init__(self, command: str, host: str, port: int) -> None:
        super().__init__(command, host=host, port=port, title="llmconsole", templates_path=TEMPLATES)
        self.services: set[ConsoleAppService] = set()

    async def on_shutdown(self, app: web.Application) -> None:
        """The server is stopping: end every app process still running."""
        await asyncio.gather(*(s.stop() for s in list(self.services)), return_exceptions=True)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """One browser connection drives one app process, which ends when the connection does."""
        # A short heartbeat notices a browser that vanished without closing (crash, lost network).
        websocket = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        service: ConsoleAppService | None = None
        try:
            await websocket.prepare(request)
            service = ConsoleAppService(
                self.command,
                write_bytes=websocket.send_bytes,
                write_str=websocket.send_str,
                close=websocket.close,
                download_manager=self.download_manager,
                debug=self.debug,
            )
            self.services.add(service)
            await service.start(width, height)
            await self._process_messages(websocket, service)
        except asyncio.CancelledError:
            await websocket.close()
        except Exception:
            log.exception("web console connection failed")
        finally:
            if service is not None:
                await service.stop()
                self.services.discard(service)
        return websocket


def app_command(argv: list[str]) -> str:
    """The command line of one app process: this Python running the console with ``argv``."""
    return shlex.join([sys.executable, "-m", "console.cli", *argv])


def serve(argv: list[str], *, host: str = "127.0.0.1", port: int = 8765, **_: Any) -> int:
    """Serve the console at http://host:port until interrupted."""
    server = ConsoleServer(app_command(argv), host=host, port=port)
    try:
        server.serve()
    except OSError as e:
        print(f"llmconsole --web: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
