"""supervisord's XML-RPC interface over its unix socket, as the console uses it.

supervisord (``[unix_http_server]`` + ``[rpcinterface:supervisor]``) speaks
XML-RPC over HTTP on a unix socket; :func:`services.lifecycle.supervisor_client.supervisor_proxy`
provides the ``AF_UNIX`` transport. Every call opens a fresh proxy (cheap on a
unix socket), so a restarted supervisord is picked up without reconnect logic
and calls from several threads never share a connection.
"""

from __future__ import annotations

import http.client
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.lifecycle.supervisor_client import supervisor_proxy


class SupervisorError(Exception):
    """supervisord is unreachable, or refused a call (``message`` says which)."""


@dataclass(frozen=True)
class ProcessInfo:
    """One supervisord program, as ``getProcessInfo`` reports it."""

    name: str
    group: str
    state: str  # RUNNING, STOPPED, STARTING, BACKOFF, STOPPING, EXITED, FATAL, UNKNOWN
    pid: int
    start: int  # unix seconds; 0 if never started
    now: int  # supervisord's clock at the time of the call
    description: str
    exitstatus: int = 0

    @property
    def uptime_s(self) -> int | None:
        """Seconds since the program started, while it runs."""
        if self.state != "RUNNING" or not self.start:
            return None
        return max(0, self.now - self.start)

    @property
    def full_name(self) -> str:
        """``group:name`` as supervisord's start/stop calls want it."""
        return self.name if self.group == self.name else f"{self.group}:{self.name}"

    @classmethod
    def from_rpc(cls, d: dict[str, Any]) -> ProcessInfo:
        """Build from one ``getAllProcessInfo`` entry."""
        return cls(
            name=str(d.get("name", "")),
            group=str(d.get("group", d.get("name", ""))),
            state=str(d.get("statename", "UNKNOWN")),
            pid=int(d.get("pid") or 0),
            start=int(d.get("start") or 0),
            now=int(d.get("now") or 0),
            description=str(d.get("description", "")),
            exitstatus=int(d.get("exitstatus") or 0),
        )


@dataclass(frozen=True)
class LogChunk:
    """A slice of a program's log: text, the offset to continue from, and whether bytes were skipped."""

    text: str
    offset: int
    overflow: bool


class SupervisorClient:
    """Blocking client of supervisord's XML-RPC API (call it from a worker thread)."""

    def __init__(self, socket_path: Path | str, timeout: float = 3.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _proxy(self) -> Any:
        if not self.socket_path.exists():
            raise SupervisorError(f"supervisord is not running (no socket at {self.socket_path})")
        return supervisor_proxy(self.socket_path, self.timeout)

    def _call(self, method: str, *args: Any) -> Any:
        proxy = self._proxy()
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as e:
            raise SupervisorError(f"supervisord refused {method}: {e.faultString}") from e
        except xmlrpc.client.ProtocolError as e:
            raise SupervisorError(f"supervisord answered {e.errcode} {e.errmsg}") from e
        except (OSError, http.client.HTTPException) as e:
            raise SupervisorError(f"supervisord unreachable at {self.socket_path}: {e}") from e

    def processes(self) -> list[ProcessInfo]:
        """Every program with its state (``getAllProcessInfo``)."""
        return [ProcessInfo.from_rpc(d) for d in self._call("getAllProcessInfo")]

    def start(self, name: str) -> None:
        """Start a program and wait until it is running (or failed)."""
        self._call("startProcess", name, True)

    def stop(self, name: str) -> None:
        """Stop a program and wait until it has stopped."""
        self._call("stopProcess", name, True)

    def restart(self, name: str) -> None:
        """Stop (if running) then start a program."""
        try:
            self.stop(name)
        except SupervisorError as e:
            if "NOT_RUNNING" not in str(e):
                raise
        self.start(name)

    def tail(self, name: str, offset: int, length: int) -> LogChunk:
        """``tailProcessStdoutLog``: up to ``length`` bytes from ``offset`` (0 = the last ``length``)."""
        data, new_offset, overflow = self._call("tailProcessStdoutLog", name, offset, length)
        return LogChunk(str(data), int(new_offset), bool(overflow))
