"""Real processes for tests: redis-server, the simulator, the three services.

Everything runs on loopback on free ports, with its own key prefix, and is
stopped at teardown. Settings reach the processes the way they reach them in
production: environment variables read by ``services.settings``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import redis

from services.contracts import Keys, new_id
from services.settings import REPO_ROOT, Settings


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts/ is not a package), registered in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


PYTHON = sys.executable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Errors that mean "not ready yet" while a service starts or restarts: connection refused or
#: reset, a timeout, a socket or file not there yet. Anything else from a condition is a bug.
NOT_READY: tuple[type[BaseException], ...] = (
    OSError,
    httpx.TransportError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def wait_until(
    pred: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    not_ready: tuple[type[BaseException], ...] = NOT_READY,
) -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout`` seconds.

    Only ``not_ready`` errors from ``pred`` count as "not yet" (the timeout names the last one);
    any other exception is raised at once, so a bug in the condition is not a bare timeout.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except not_ready as e:
            last = e
        time.sleep(interval)
    tail = f" (last error: {last!r})" if last is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    """True if GET ``url`` answers 200."""
    try:
        return httpx.get(url, timeout=1.0, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False


class RedisServer:
    """A real redis-server on a free port, in its own folder.

    ``launcher=True`` starts it the way production does, through ``python -m
    services.lifecycle.redis_launch`` (its redis.conf: AOF with ``appendfsync`` from the settings,
    ``noeviction``, the password in a 0600 file); the launcher execs redis-server, so
    :attr:`proc` is the server itself and a SIGKILL is a real crash of Redis.
    """

    def __init__(
        self,
        workdir: Path,
        password: str = "",
        appendonly: bool = False,
        *,
        launcher: bool = False,
        appendfsync: str = "everysec",
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly or launcher
        self.launcher = launcher
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    def _args(self) -> tuple[list[str], dict[str, str] | None]:
        if self.launcher:
            values = {
                "redis_port": self.port,
                "redis_password": self.password,
                "redis_appendfsync": self.appendfsync,
                "var_dir": str(self.workdir),
            }
            return [PYTHON, "-m", "services.lifecycle.redis_launch"], settings_env(values)
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
        ]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync]
        args += ["--maxmemory-policy", "noeviction"]
        if self.password:
            args += ["--requirepass", self.password]
        return args, None

    def start(self) -> None:
        """Start (or restart on the same port and data)."""
        args, env = self._args()
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        log.close()
        wait_until(self.ping, 10, f"redis on {self.port}")

    def client(self) -> redis.Redis:
        """A client of this server (strings decoded)."""
        return redis.Redis(port=self.port, password=self.password or None, decode_responses=True)

    def ping(self) -> bool:
        """True if the server answers PING."""
        r = redis.Redis(port=self.port, password=self.password or None, socket_timeout=0.5)
        try:
            return bool(r.ping())
        except redis.RedisError:  # refused, loading its AOF, or not yet up
            return False
        finally:
            r.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM waits for it; SIGKILL is a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Proc:
    """One service process (``python -m MODULE``) with its log in the work dir."""

    def __init__(
        self, name: str, module: str, env: dict[str, str], workdir: Path, args: list[str] | None = None
    ):
        self.name = name
        self.module = module
        self.env = env
        self.workdir = workdir
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def start(self) -> None:
        """Start the process (its stdout and stderr go to its log)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", self.module, *self.args],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int:
        """The process id (the process must be running)."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        if self.proc is not None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        """What the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """Process environment carrying these settings (and no env file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["LLMC_ENV_FILE"] = "/nonexistent/llmconsole.env"
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in values.items():
        env[k.upper()] = str(v)
    return env


class Stack:
    """The pipeline as real processes: simulator, inference worker, proxy worker(s), ingestion.

    Redis is shared (given); each stack has its own key prefix and ports.
    """

    def __init__(self, redis: RedisServer, workdir: Path, **overrides: Any) -> None:
        self.redis = redis
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, Any] = {
            "redis_port": redis.port,
            "redis_password": redis.password,
            "redis_prefix": f"t{new_id()[-10:]}:",
            "engine_kind": "sim",
            "engine_port": free_port(),
            "worker_port": free_port(),
            "ingestion_port": free_port(),
            "proxy_metrics_port": free_port(),
            "api_key": "test-key-" + new_id(),
            "sim_ttft_base_ms": 5,
            "sim_prefill_ms_per_token": 0.01,
            "sim_itl_ms": 1,
            "sim_itl_jitter_ms": 0.2,
            "lease_ms": 3000,
            "shutdown_grace_s": 5,
            "stream_trim_interval_s": 1,
            "var_dir": str(workdir / "var"),
            "results_dir": str(workdir / "runs"),
            "node_id": "test-node",
        }
        self.values.update(overrides)
        self.env = settings_env(self.values)
        self.procs: dict[str, Proc] = {
            "engine": Proc("engine", "services.sim_engine", self.env, workdir),
            "inference_worker": Proc("inference_worker", "services.inference_worker", self.env, workdir),
            "proxy_worker": Proc("proxy_worker", "services.proxy_worker", self.env, workdir),
            "ingestion": Proc("ingestion", "services.ingestion", self.env, workdir),
        }
        self.extra_proxies: list[Proc] = []

    @property
    def settings(self) -> Settings:
        """A Settings object pointing at this stack (for clients in the test)."""
        return Settings(_env_file=None, **self.values)  # type: ignore[call-arg]

    @property
    def headers(self) -> dict[str, str]:
        """Auth headers for ingestion."""
        return {"Authorization": f"Bearer {self.values['api_key']}"}

    def start(self) -> Stack:
        """Start every process and wait until each is ready."""
        for p in self.procs.values():
            p.start()
        s = self.settings
        wait_until(lambda: http_ok(f"{s.engine_url}/health"), 30, "engine /health")
        self.wait_ready("inference_worker")
        self.wait_ready("ingestion")
        return self

    def wait_ready(self, name: str, timeout: float = 30) -> None:
        """Wait for a service's readiness endpoint."""
        s = self.settings
        url = {
            "engine": f"{s.engine_url}/health",
            "inference_worker": f"http://127.0.0.1:{s.worker_port}/readyz",
            "ingestion": f"{s.ingestion_url}/readyz",
        }.get(name)
        proc = self.procs[name]
        if url is not None:
            wait_until(lambda: http_ok(url), timeout, f"{name} ready (log: {proc.log_text()[-2000:]})")
            return
        if name != "proxy_worker":
            raise ValueError(f"no readiness check for {name!r}")
        self.wait_consumer(proc, timeout)

    def consumer(self, proc: Proc) -> str:
        """The consumer name a proxy worker process reads the stream under."""
        return f"{socket.gethostname()[:40]}-{proc.pid}"

    def wait_consumer(self, proc: Proc, timeout: float = 30) -> None:
        """Wait until a proxy worker process has written its heartbeat (it is reading the stream)."""
        key = Keys(self.values["redis_prefix"]).consumer_heartbeat(self.consumer(proc))
        r = self.redis.client()
        try:
            wait_until(
                lambda: r.exists(key) == 1, timeout, f"{proc.name} up (log: {proc.log_text()[-2000:]})"
            )
        finally:
            r.close()

    def restart(self, name: str) -> None:
        """Graceful restart of one service."""
        self.procs[name].stop()
        self.procs[name].start()
        self.wait_ready(name)

    def add_proxy(self) -> Proc:
        """Start another proxy worker consumer."""
        p = Proc(
            f"proxy_worker{len(self.extra_proxies) + 2}", "services.proxy_worker", self.env, self.workdir
        )
        p.start()
        self.extra_proxies.append(p)
        return p

    def stop(self) -> None:
        """Stop everything (reverse order)."""
        for p in [*self.extra_proxies, *reversed(list(self.procs.values()))]:
            p.stop()

    def logs(self) -> str:
        """All process logs, for failure messages."""
        procs = {**self.procs, **{p.name: p for p in self.extra_proxies}}
        return "\n".join(f"--- {n}\n{p.log_text()[-3000:]}" for n, p in procs.items())

    # --- client helpers ----------------------------------------------------
    def submit(self, client: httpx.Client, **body: Any) -> str:
        """POST a job and return its id (asserts 202)."""
        r = client.post(f"{self.settings.ingestion_url}/v1/jobs", json=body, headers=self.headers)
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """Long-poll a job until it is final (or fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        url = f"{self.settings.ingestion_url}/v1/jobs/{job_id}"
        while time.monotonic() < deadline:
            try:
                r = client.get(url, params={"wait": 10}, headers=self.headers, timeout=15)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed", "dead"):
                return dict(r.json())
            if r.status_code not in (200, 503):
                raise AssertionError(f"GET {job_id}: {r.status_code} {r.text}")
            if r.status_code == 503:
                time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not final after {timeout}s\n{self.logs()}")
