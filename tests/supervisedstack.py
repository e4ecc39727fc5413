"""The real supervisord running the real supervisord.conf, in a temporary var/ folder."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from services.contracts import new_id
from services.lifecycle.readiness import checks
from services.lifecycle.supervisor_client import supervisor_proxy
from services.settings import REPO_ROOT, Settings
from tests.stackutil import free_port, wait_until

VENV_BIN = Path(REPO_ROOT) / ".venv" / "bin"


def private_conf(workdir: Path, name: str) -> tuple[Path, Path]:
    """The repository's supervisord config ``name`` with its var/ moved under ``workdir``: (var, conf)."""
    var = workdir / "var"
    (var / "log").mkdir(parents=True, exist_ok=True)
    var.chmod(0o700)
    conf = workdir / "supervisord.conf"
    text = (REPO_ROOT / name).read_text()
    conf.write_text(text.replace("%(here)s/var", str(var)).replace("%(here)s", str(REPO_ROOT)))
    return var, conf


class SupervisedStack:
    """supervisord.conf from the repository, with var/ moved to ``workdir`` and ports made free."""

    def __init__(self, workdir: Path, **overrides: Any) -> None:
        self.workdir = workdir
        self.var, self.conf = private_conf(workdir, "supervisord.conf")
        self.values: dict[str, Any] = {
            "redis_port": free_port(),
            "redis_password": "pw-" + new_id(),
            "api_key": "key-" + new_id(),
            "engine_api_key": "ekey-" + new_id(),
            "engine_kind": "sim",
            "engine_port": free_port(),
            "worker_port": free_port(),
            "ingestion_port": free_port(),
            "proxy_metrics_port": free_port(),
            "var_dir": str(self.var),
            "results_dir": str(workdir / "runs"),
            "sim_ttft_base_ms": 5,
            "sim_prefill_ms_per_token": 0.01,
            "sim_itl_ms": 2,
            "lease_ms": 3000,
            "shutdown_grace_s": 10,
            "node_id": "sup-test",
        }
        self.values.update(overrides)
        self.env_file = self.var / "llmconsole.env"
        self.env_file.write_text("".join(f"{k.upper()}={v}\n" for k, v in self.values.items()))
        self.env_file.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env["LLMC_ENV_FILE"] = str(self.env_file)

    @property
    def settings(self) -> Settings:
        """Settings as every supervised process reads them."""
        return Settings(_env_file=self.env_file)  # type: ignore[call-arg]

    @property
    def headers(self) -> dict[str, str]:
        """Auth headers for ingestion."""
        return {"Authorization": f"Bearer {self.values['api_key']}"}

    def start(self, timeout: float = 60) -> None:
        """Start supervisord and wait for every service."""
        subprocess.run([VENV_BIN / "supervisord", "-c", self.conf], env=self.env, check=True)
        s = self.settings
        wait_until(lambda: all(checks(s).values()), timeout, f"stack ready: {checks(s)}", interval=0.3)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run supervisorctl against this supervisord."""
        return subprocess.run(
            [VENV_BIN / "supervisorctl", "-c", self.conf, *args], env=self.env, capture_output=True, text=True
        )

    def rpc(self) -> Any:
        """supervisord's XML-RPC proxy."""
        return supervisor_proxy(self.settings.supervisor_socket)

    def pids(self) -> dict[str, int]:
        """Program name → pid of the running programs."""
        return {i["name"]: i["pid"] for i in self.rpc().supervisor.getAllProcessInfo() if i["pid"]}

    def stop(self) -> None:
        """Shut supervisord down and wait until its programs are gone."""
        try:
            pids = list(self.pids().values())
            main_pid = self.rpc().supervisor.getPID()
        except Exception:
            return
        self.ctl("shutdown")
        deadline = time.monotonic() + 60
        for pid in [*pids, main_pid]:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def submit_jobs(self, c: httpx.Client, n: int, run_id: str, **body: Any) -> list[str]:
        """POST ``n`` jobs of one run (seed = index) and return their ids (asserts 202)."""
        ids = []
        for i in range(n):
            r = c.post(
                f"{self.settings.ingestion_url}/v1/jobs",
                json={"run_id": run_id, "seed": i, **body},
                headers=self.headers,
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        return ids

    def wait_jobs(self, c: httpx.Client, ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
        """Long-poll every job until it is final; fail with the proxy worker's log after ``timeout``."""
        out = []
        for jid in ids:
            deadline = time.monotonic() + timeout
            while True:
                r = c.get(
                    f"{self.settings.ingestion_url}/v1/jobs/{jid}",
                    params={"wait": 30},
                    headers=self.headers,
                    timeout=60,
                )
                if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed", "dead"):
                    out.append(r.json())
                    break
                assert time.monotonic() < deadline, f"job {jid} not final\n{self.log('proxy_worker')}"
        return out

    def log(self, program: str) -> str:
        """A program's log."""
        p = self.var / "log" / f"{program}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""
