"""End to end under the real supervisord with the simulator engine."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.contracts import TIMESTAMPS
from tests.stackutil import wait_until
from tests.supervisedstack import SupervisedStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedStack]:
    st = SupervisedStack(tmp_path_factory.mktemp("sup"))
    try:
        st.start()
    except Exception:
        logs = "\n".join(
            f"--- {p}\n{st.log(p)}" for p in ("engine", "inference_worker", "proxy_worker", "ingestion")
        )
        st.stop()
        raise AssertionError(f"stack did not start\n{logs}") from None
    yield st
    st.stop()


def test_fifty_jobs_through_supervised_stack(sup: SupervisedStack) -> None:
    with httpx.Client(timeout=30) as c:
        jobs = sup.wait_jobs(c, sup.submit_jobs(c, 50, "sup50", input_tokens=200, output_tokens=30))
    assert [j["state"] for j in jobs] == ["succeeded"] * 50
    for j in jobs:
        values = [j["timestamps"][k] for k in TIMESTAMPS]
        assert None not in values and values == sorted(values)
        assert j["result"]["completion_tokens"] == 30


def test_restart_inference_worker_mid_run_loses_nothing(sup: SupervisedStack) -> None:
    before = sup.pids()["inference_worker"]
    with httpx.Client(timeout=30) as c:
        ids = sup.submit_jobs(c, 50, "suprestart", input_tokens=200, output_tokens=30)
        restarted = threading.Event()

        def restart() -> None:
            res = sup.ctl("restart", "inference_worker")
            assert "started" in res.stdout, res.stdout + res.stderr
            restarted.set()

        t = threading.Thread(target=restart)
        t.start()
        ids += sup.submit_jobs(c, 20, "suprestart2", input_tokens=200, output_tokens=30)
        jobs = sup.wait_jobs(c, ids)
        t.join(60)
    assert restarted.is_set()
    assert sup.pids()["inference_worker"] != before
    assert [j["state"] for j in jobs] == ["succeeded"] * 70
    assert len({j["job_id"] for j in jobs}) == 70


def test_socket_and_env_file_are_private(sup: SupervisedStack) -> None:
    sock = Path(sup.settings.supervisor_socket)
    assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(sup.env_file).st_mode) == 0o600
    # Every service listens on loopback only.
    ports = [sup.values[k] for k in ("redis_port", "engine_port", "worker_port", "ingestion_port")]
    for port in ports:
        # A service the test before restarted may still be starting (supervisord calls it started
        # after startsecs, before uvicorn has bound): wait for its socket, then check where it is.
        wait_until(lambda port=port: bool(_listen_addresses(port)), 30, f"something listening on {port}")
        addrs = _listen_addresses(port)
        assert addrs == {"127.0.0.1"}, addrs


def _listen_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a listening TCP socket on ``port`` (from /proc/net)."""
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr_hex, port_hex = cols[1].split(":")
            if cols[3] != "0A" or int(port_hex, 16) != port:
                continue
            if len(addr_hex) == 8:
                out.add(".".join(str(b) for b in reversed(bytes.fromhex(addr_hex))))
            else:
                out.add("::" if set(addr_hex) == {"0"} else addr_hex)
    return out


def test_redis_has_password_and_aof(sup: SupervisedStack) -> None:
    import redis

    s = sup.settings
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=s.redis_port).ping()
    r = redis.Redis(port=s.redis_port, password=s.redis_password.get_secret_value(), decode_responses=True)
    cfg = r.config_get("appendonly") | r.config_get("appendfsync") | r.config_get("maxmemory-policy")
    assert cfg == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
    r.close()
