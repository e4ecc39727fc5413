"""A stand-in for the Hugging Face hub's HTTP API, for ``services.lifecycle.model_fetch`` tests.

The hub cannot be reached from the test machines (only the package registries can), so the real
``huggingface_hub`` client of the engine venv is pointed (``HF_ENDPOINT``) at this small server,
which answers the calls a download makes: repo info, the tree listing, and ``resolve`` (HEAD for
the metadata, GET for the bytes, sent slowly when asked so progress can be watched).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    """Serves one model repository; ``mode`` may be ``ok``, ``gated`` or ``missing``."""

    def __init__(
        self,
        repo_id: str,
        files: dict[str, bytes],
        mode: str = "ok",
        bytes_per_s: float | None = None,
        claimed_sizes: dict[str, int] | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.files = files
        self.mode = mode
        self.bytes_per_s = bytes_per_s
        self.claimed_sizes = claimed_sizes or {}
        self.downloads: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what the hub would answer -------------------------------------------------------
    def _size(self, path: str) -> int:
        return self.claimed_sizes.get(path, len(self.files[path]))

    def _entry(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        entry: dict[str, Any] = {
            "type": "file",
            "oid": hashlib.sha1(data).hexdigest(),  # a git blob id stand-in
            "size": self._size(path),
            "path": path,
        }
        if len(data) > 1024:  # big files live in LFS on the hub
            entry["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": self._size(path),
                "pointerSize": 134,
            }
        return entry

    def tree(self, under: str, recursive: bool) -> list[dict[str, Any]]:
        """The tree listing of folder ``under`` ("" for the top)."""
        prefix = f"{under}/" if under else ""
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(self.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            out.append(self._entry(path))
        out += [{"type": "directory", "oid": "0" * 40, "path": f} for f in sorted(folders)]
        return out

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse(self) -> bool:
                refusal = {"gated": (403, "GatedRepo"), "missing": (404, "RepoNotFound")}.get(hub.mode)
                if refusal is None:
                    return False
                status, code = refusal
                self._send(
                    status, b'{"error":"refused"}', {"X-Error-Code": code, "Content-Type": "application/json"}
                )
                return True

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                repo = re.escape(hub.repo_id)
                if m := re.fullmatch(rf"/api/models/{repo}/revision/([^/]+)", path):
                    if self._refuse():
                        return
                    info = {
                        "id": hub.repo_id,
                        "sha": COMMIT,
                        "private": False,
                        "siblings": [{"rfilename": p} for p in hub.files],
                    }
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                elif m := re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)(?:/(.*))?", path):
                    if self._refuse():
                        return
                    recursive = "recursive=true" in parts.query.lower()
                    body = json.dumps(hub.tree(m.group(2) or "", recursive)).encode()
                    self._send(200, body, {"Content-Type": "application/json"})
                elif (m := re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path)) and m.group(2) in hub.files:
                    if self._refuse():
                        return
                    self._file(m.group(2))
                else:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

            def _file(self, name: str) -> None:
                data = hub.files[name]
                entry = hub._entry(name)
                etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                hub.downloads.append(name)
                step = 64 * 1024
                for i in range(0, len(data), step):
                    self.wfile.write(data[i : i + step])
                    if hub.bytes_per_s:
                        time.sleep(step / hub.bytes_per_s)

        return Handler
