"""supervisord's XML-RPC API over its unix socket (used by install's readiness wait and the console)."""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from pathlib import Path
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:  # type: ignore[override]
        return _UnixConnection(self._path, self._timeout)


def supervisor_proxy(socket_path: Path | str, timeout: float = 5.0) -> Any:
    """An XML-RPC proxy of supervisord at ``socket_path`` (``proxy.supervisor.getAllProcessInfo()``...)."""
    return xmlrpc.client.ServerProxy(
        "http://localhost/RPC2", transport=_UnixTransport(str(socket_path), timeout), allow_none=True
    )
