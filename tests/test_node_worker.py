"""A node's inference worker bound beyond loopback: every request needs the worker key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from services.contracts import new_id
from tests.stackutil import PYTHON, Proc, free_port, settings_env, wait_until

pytestmark = pytest.mark.slow


def test_an_exposed_worker_refuses_requests_without_the_key(tmp_path: Path) -> None:
    port, key = free_port(), "wkey-" + new_id()
    env = settings_env(
        {"worker_host": "0.0.0.0", "worker_port": port, "worker_api_key": key, "redis_port": free_port()}
    )
    worker = Proc("inference_worker", "services.inference_worker", env, tmp_path)
    worker.start()
    try:
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        wait_until(lambda: httpx.get(f"{base}/healthz", headers=auth).status_code == 200, 30, "worker up")
        for path in ("/healthz", "/readyz", "/metrics"):
            r = httpx.get(f"{base}{path}")
            assert r.status_code == 401, (path, r.text)
            assert "WORKER_API_KEY" in r.json()["detail"]
        assert httpx.post(f"{base}/v1/infer", json={}).status_code == 401
        assert httpx.get(f"{base}/docs", headers=auth).status_code == 404
        assert httpx.get(f"{base}/openapi.json", headers=auth).status_code == 404
    finally:
        worker.stop()


def test_an_exposed_worker_without_a_key_does_not_start(tmp_path: Path) -> None:
    env = settings_env(
        {"worker_host": "0.0.0.0", "worker_port": free_port(), "api_key": "", "worker_api_key": ""}
    )
    r = subprocess.run(
        [PYTHON, "-m", "services.inference_worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert "set WORKER_API_KEY" in r.stderr
