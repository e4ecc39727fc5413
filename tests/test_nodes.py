"""Three nodes on one machine sharing one Redis: each its own supervisord (supervisord.node.conf),
var dir and ports, with the simulator; one ingestion and one proxy worker route to them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.contracts import JOB_NODE_FIELD, JOB_POLICY_FIELD, Keys, NodeHeartbeat, NodeState, new_id
from services.engine_client import metric_sum, parse_prometheus
from services.lifecycle.supervisor_client import supervisor_proxy
from services.settings import REPO_ROOT, Settings
from tests.stackutil import PYTHON, Proc, RedisServer, free_port, http_ok, settings_env, wait_until
from tests.supervisedstack import private_conf

pytestmark = pytest.mark.slow

VENV_BIN = Path(REPO_ROOT) / ".venv" / "bin"
#: Each job runs about 0.6 s on the simulator; four at once per node.
SIM = {
    "engine_kind": "sim",
    "sim_ttft_base_ms": 5,
    "sim_prefill_ms_per_token": 0.01,
    "sim_itl_ms": 20,
    "sim_itl_jitter_ms": 0.5,
    "sim_max_num_seqs": 4,
    "node_capacity_factor": 1,
}
SHARED = {"node_ttl_s": 2, "lease_ms": 3000, "registry_refresh_s": 0.2, "node_suspect_s": 5}


class Node:
    """One node: supervisord.node.conf with var/ moved to its own folder, its own ports and id."""

    def __init__(self, workdir: Path, node_id: str, common: dict[str, Any], **sim: Any) -> None:
        self.var, self.conf = private_conf(workdir, "supervisord.node.conf")
        self.node_id = node_id
        self.values = {
            **common,
            **SIM,
            **SHARED,
            **sim,
            "engine_port": free_port(),
            "worker_port": free_port(),
            "engine_api_key": "ekey-" + new_id(),
            "var_dir": str(self.var),
            "node_id": node_id,
        }
        self.env_file = self.var / "llmconsole.env"
        self.write_env()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env["LLMC_ENV_FILE"] = str(self.env_file)

    def write_env(self) -> None:
        """Write ``values`` to the node's env file (0600)."""
        self.env_file.write_text("".join(f"{k.upper()}={v}\n" for k, v in self.values.items()))
        self.env_file.chmod(0o600)

    @property
    def settings(self) -> Settings:
        """Settings as the node's programs read them."""
        return Settings(_env_file=self.env_file)  # type: ignore[call-arg]

    def start(self) -> None:
        """Start the node's supervisord (it starts the engine and the worker)."""
        subprocess.run([VENV_BIN / "supervisord", "-c", self.conf], env=self.env, check=True)

    def pids(self) -> dict[str, int]:
        """Program name → pid, and supervisord's own as "supervisord"."""
        rpc = supervisor_proxy(self.settings.supervisor_socket)
        out = {i["name"]: i["pid"] for i in rpc.supervisor.getAllProcessInfo() if i["pid"]}
        out["supervisord"] = rpc.supervisor.getPID()
        return out

    def node_cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m services.lifecycle.node ...`` with this node's settings."""
        return subprocess.run(
            [PYTHON, "-m", "services.lifecycle.node", *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def stop(self) -> None:
        """Shut supervisord down (if it still runs) and wait for its programs."""
        try:
            pids = list(self.pids().values())
        except Exception:
            return
        subprocess.run(
            [VENV_BIN / "supervisorctl", "-c", self.conf, "shutdown"], env=self.env, capture_output=True
        )
        deadline = time.monotonic() + 60
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def log(self, program: str) -> str:
        """A program's log."""
        p = self.var / "log" / f"{program}.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""


class Cluster:
    """Nodes (three by default) + ingestion + one proxy worker, sharing one Redis and key prefix."""

    def __init__(
        self,
        redis_server: RedisServer,
        workdir: Path,
        nodes: int = 3,
        kv: bool = False,
        proxies: int = 1,
        **sim: Any,
    ) -> None:
        self.common: dict[str, Any] = {
            "redis_port": redis_server.port,
            "redis_password": redis_server.password,
            "redis_prefix": f"t{new_id()[-10:]}:",
            "worker_api_key": "wkey-" + new_id(),
            "api_key": "key-" + new_id(),
        }
        self.keys = Keys(self.common["redis_prefix"])
        self.nodes = [
            Node(
                workdir / f"n{i}",
                f"n{i}",
                self.common,
                **sim,
                **({"kv_events_port": free_port()} if kv else {}),
            )
            for i in range(nodes)
        ]
        head = {
            **self.common,
            **SHARED,
            "ingestion_port": free_port(),
            "var_dir": str(workdir / "head"),
            "results_dir": str(workdir / "runs"),
            "node_id": "head",
            "max_model_len": 2048,
        }
        self.head = Settings(_env_file=None, **head)  # type: ignore[call-arg]
        env = settings_env(head)
        #: Each proxy worker's /metrics port (start() waits until each sees every node).
        self.proxy_metrics = [free_port() for _ in range(proxies)]
        proxy = [
            Proc(
                "proxy_worker" if i == 0 else f"proxy_worker{i + 1}",
                "services.proxy_worker",
                {**env, "PROXY_METRICS_PORT": str(port)},
                workdir,
            )
            for i, port in enumerate(self.proxy_metrics)
        ]
        self.procs = [proxy[0], Proc("ingestion", "services.ingestion", env, workdir), *proxy[1:]]
        self.r = redis.Redis(port=redis_server.port, password=redis_server.password, decode_responses=True)
        self.headers = {"Authorization": f"Bearer {self.common['api_key']}"}

    def start(self) -> None:
        """Start the nodes and the head; wait until every node is ready in the registry."""
        for n in self.nodes:
            n.start()
        for p in self.procs:
            p.start()
        wait_until(lambda: http_ok(f"{self.head.ingestion_url}/readyz"), 60, "ingestion ready")
        names = sorted(n.node_id for n in self.nodes)
        try:
            wait_until(lambda: sorted(self.ready_nodes()) == names, 60, f"{names} ready")
            # A proxy routes to a node from its first registry refresh after the node got ready:
            # jobs submitted before would all go to the nodes it saw (and own their prefixes).
            wait_until(lambda: self.proxies_see() == len(names), 30, "every proxy worker to see every node")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.diag()}") from None

    def proxies_see(self) -> int:
        """The fewest nodes any proxy worker routes to now (its ``proxy_nodes_live`` gauge)."""
        seen = []
        for port in self.proxy_metrics:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return 0
            seen.append(int(metric_sum(parse_prometheus(text), "llmconsole:proxy_nodes_live") or 0))
        return min(seen)

    def ready_nodes(self) -> list[str]:
        """Nodes whose heartbeat says up and ready."""
        out = []
        for n in self.nodes:
            h = self.r.hgetall(self.keys.node(n.node_id))
            if h and NodeHeartbeat.from_redis(h).ready:
                out.append(n.node_id)
        return out

    def in_flight(self, node: str) -> list[str]:
        """Job ids holding a slot on ``node`` now (from Redis)."""
        return [m.rsplit(":", 1)[0] for m in self.r.zrange(self.keys.node_inflight(node), 0, -1)]

    def submit(
        self, c: httpx.Client, n: int, run_id: str, groups: int | list[int] = 6, **kw: Any
    ) -> list[str]:
        """``n`` jobs of ``groups`` prefix groups (or these groups, in order); their ids."""
        order = groups if isinstance(groups, list) else [i % groups for i in range(n)]
        ids = []
        for i in range(n):
            body = {
                "input_tokens": 200,
                "output_tokens": 30,
                "prefix_share": 0.5,
                "run_id": run_id,
                "prefix_group": order[i],
                "seed": i,
                **kw,
            }
            r = c.post(f"{self.head.ingestion_url}/v1/jobs", json=body, headers=self.headers)
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        return ids

    def wait_final(self, c: httpx.Client, ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
        """Every job's view once final (fails with the logs after ``timeout``)."""
        out = []
        deadline = time.monotonic() + timeout
        for jid in ids:
            while True:
                assert time.monotonic() < deadline, f"job {jid} not final\n{self.diag()}"
                r = c.get(
                    f"{self.head.ingestion_url}/v1/jobs/{jid}", params={"wait": 10}, headers=self.headers
                )
                if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed", "dead"):
                    out.append(r.json())
                    break
        return out

    def routed(self, job_id: str) -> tuple[str, str]:
        """(node, policy) the job hash records."""
        node, policy = self.r.hmget(self.keys.job(job_id), [JOB_NODE_FIELD, JOB_POLICY_FIELD])
        return node or "", policy or ""

    def diag(self) -> str:
        """Logs for failure messages."""
        parts = [f"--- {p.name}\n{p.log_text()[-3000:]}" for p in self.procs]
        for n in self.nodes:
            parts.append(f"--- {n.node_id} worker\n{n.log('inference_worker')}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop everything."""
        for p in reversed(self.procs):
            p.stop()
        for n in self.nodes:
            n.stop()
        self.r.close()


def _connections(pid: int, port: int) -> int:
    """Established TCP connections process ``pid`` holds to local ``port`` (/proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        # cols[2]: the far end (address:port, hex); cols[3] 01: established; cols[9]: the inode
        if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
            n += 1
    return n


@pytest.fixture
def cluster(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    """A started three-node cluster (stopped at teardown)."""
    cl = Cluster(redis_server, tmp_path)
    try:
        cl.start()
        yield cl
    finally:
        cl.stop()


def test_jobs_spread_and_a_killed_node_loses_none(cluster: Cluster) -> None:
    cl = cluster
    with httpx.Client(timeout=30) as c:
        ids = cl.submit(c, 60, "spread")
        # Jobs run on all three nodes at once (the in-flight sets in Redis say so).
        seen: set[str] = set()

        def all_busy() -> bool:
            seen.update(n.node_id for n in cl.nodes if cl.in_flight(n.node_id))
            return len(seen) == 3

        wait_until(all_busy, 60, f"jobs in flight on every node (seen {seen})", interval=0.02)
        # kill -9 node n2's supervisord (so nothing restarts), inference worker and engine while
        # it holds jobs.
        victim = cl.nodes[2]
        wait_until(lambda: len(cl.in_flight("n2")) > 0, 30, "jobs on n2", interval=0.01)
        pids = victim.pids()
        for name in ("supervisord", "inference_worker", "engine"):
            os.kill(pids[name], signal.SIGKILL)
        on_victim = cl.in_flight("n2")
        assert on_victim, "the kill came after n2's jobs finished"
        jobs = cl.wait_final(c, ids)
        assert [j["state"] for j in jobs] == ["succeeded"] * len(ids), [j.get("error") for j in jobs]
        by_id = {j["job_id"]: j for j in jobs}
        for jid in on_victim:
            assert by_id[jid]["result"]["node"] in ("n0", "n1"), by_id[jid]
            assert cl.routed(jid)[0] in ("n0", "n1")
        served = Counter(j["result"]["node"] for j in jobs)
        assert set(served) >= {"n0", "n1"}, served
        assert {cl.routed(j)[1] for j in ids} == {"prefix_affinity"}
        assert all(cl.routed(j)[0] == by_id[j]["result"]["node"] for j in ids)

        # Once its heartbeat expired, the dead node gets no new jobs.
        wait_until(lambda: not cl.r.exists(cl.keys.node("n2")), 30, "n2's heartbeat expired")
        more = cl.submit(c, 24, "after")
        later = cl.wait_final(c, more)
        assert [j["state"] for j in later] == ["succeeded"] * len(more)
        assert Counter(j["result"]["node"] for j in later).keys() <= {"n0", "n1"}
        assert not cl.r.zcard(cl.keys.node_inflight("n2"))


def test_a_drained_node_finishes_its_jobs_and_takes_no_more(cluster: Cluster) -> None:
    cl = cluster
    node = cl.nodes[1]
    with httpx.Client(timeout=30) as c:
        ids = cl.submit(c, 48, "drain")
        wait_until(lambda: len(cl.in_flight("n1")) > 0, 60, "jobs on n1", interval=0.01)
        proxy, worker_port = cl.procs[0], node.values["worker_port"]
        wait_until(lambda: _connections(proxy.pid, worker_port) > 0, 10, "the proxy's hop to n1's worker")
        drain = subprocess.Popen(
            [PYTHON, "-m", "services.lifecycle.node", "drain", "--timeout", "60"],
            env=node.env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_until(lambda: cl.r.exists(cl.keys.node_drain("n1")), 30, "the drain flag")
        held_at_drain = cl.in_flight("n1")

        def says_draining() -> bool:
            h = cl.r.hgetall(cl.keys.node("n1"))
            return bool(h) and NodeHeartbeat.from_redis(h).state == NodeState.DRAINING

        wait_until(says_draining, 30, "n1's heartbeat says draining")
        out, _ = drain.communicate(timeout=90)
        assert drain.returncode == 0, out
        assert not cl.in_flight("n1")
        # Its worker still runs, but no live node has its address: the proxy closes its idle
        # connections to it at its next registry read (0.2 s), not when the worker's keep-alive
        # (5 s) closes them from the other side; and forgets the pool.
        wait_until(
            lambda: _connections(proxy.pid, worker_port) == 0, 2.5, "the proxy's idle hops to n1 closed"
        )
        jobs = cl.wait_final(c, ids)
        assert [j["state"] for j in jobs] == ["succeeded"] * len(ids)
        by_id = {j["job_id"]: j for j in jobs}
        # What n1 held when asked to drain, it finished itself.
        for jid in held_at_drain:
            assert by_id[jid]["result"]["node"] == "n1", by_id[jid]
        more = cl.submit(c, 24, "after-drain")
        later = cl.wait_final(c, more)
        assert [j["state"] for j in later] == ["succeeded"] * len(more)
        assert Counter(j["result"]["node"] for j in later).keys() <= {"n0", "n2"}
        # Leaving: the node deregisters (install.sh --leave stops its supervisord in between).
        node.stop()
        r = node.node_cmd("deregister")
        assert r.returncode == 0, r.stderr
        assert not cl.r.sismember(cl.keys.nodes, "n1")
        assert not cl.r.exists(cl.keys.node("n1"), cl.keys.node_drain("n1"))


def test_two_proxies_fill_every_node_to_its_capacity_and_never_beyond(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Capacity 2 × 2 = 4 per node; jobs of ~1 s; two proxy workers share the slots in Redis.
    cl = Cluster(
        redis_server, tmp_path, nodes=2, proxies=2, sim_max_num_seqs=2, node_capacity_factor=2, sim_itl_ms=40
    )
    try:
        cl.start()
        peak: dict[str, int] = {"n0": 0, "n1": 0}
        with httpx.Client(timeout=30) as c:
            ids = cl.submit(c, 24, "fill", output_tokens=25)

            def full() -> bool:
                for n in peak:
                    peak[n] = max(peak[n], len(cl.in_flight(n)))
                return all(v == 4 for v in peak.values())

            wait_until(full, 60, f"both nodes at their capacity 4 (peak {peak})", interval=0.01)
            jobs = cl.wait_final(c, ids)
            for _ in range(50):  # and keep watching while the rest drains
                full()
        assert [j["state"] for j in jobs] == ["succeeded"] * len(ids)
        assert peak == {"n0": 4, "n1": 4}
    finally:
        cl.stop()


def test_a_node_that_refuses_the_worker_key_gets_no_jobs_and_fails_none(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    cl = Cluster(redis_server, tmp_path, nodes=2)
    cl.nodes[1].values["worker_api_key"] = "not-the-key"  # misconfigured: copied the wrong node.env
    cl.nodes[1].write_env()
    try:
        cl.start()
        with httpx.Client(timeout=30) as c:
            ids = cl.submit(c, 16, "wrong-key")
            jobs = cl.wait_final(c, ids)
        assert [j["state"] for j in jobs] == ["succeeded"] * len(ids), [j.get("error") for j in jobs]
        assert {j["result"]["node"] for j in jobs} == {"n0"}
        assert "refused the worker key" in cl.procs[0].log_text()
    finally:
        cl.stop()


def hit_rates(jobs: list[dict[str, Any]], block: int) -> tuple[float, float]:
    """(cached ÷ prompt tokens, the most the workload allows: every job's whole prefix blocks
    cached but each group's first)."""
    prompt = sum(j["result"]["prompt_tokens"] for j in jobs)
    cached = sum(j["result"]["cached_tokens"] or 0 for j in jobs)
    seen: set[int] = set()
    allowed = 0
    for j in jobs:
        group = j["spec"]["prefix_group"]
        if group in seen:
            allowed += j["result"]["prefix_tokens"] // block * block
        seen.add(group)
    return cached / prompt, allowed / prompt


def test_prefix_affinity_and_kv_events_keep_the_cache_hits_that_round_robin_loses(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # 4 nodes, 16 prefix groups of 28 KV blocks each; a node's 240 blocks keep about 6 groups beside
    # its running sequences, so only routing that keeps each group on one node keeps its hits.
    sim = {
        "sim_kv_blocks": 240,
        "sim_block_size": 16,
        "sim_itl_ms": 2,
        "sim_max_num_seqs": 16,
        "node_capacity_factor": 2,
    }
    cl = Cluster(redis_server, tmp_path, nodes=4, kv=True, **sim)
    try:
        cl.start()
        order = [i % 16 for i in range(256)]
        random.Random(7).shuffle(order)
        body = {"input_tokens": 512, "output_tokens": 8, "prefix_share": 0.9}
        rates = {}
        with httpx.Client(timeout=30) as c:
            for policy in ("prefix_affinity", "kv_events", "round_robin"):
                ids = cl.submit(c, len(order), f"hits-{policy}", order, routing=policy, **body)
                jobs = cl.wait_final(c, ids)
                assert [j["state"] for j in jobs] == ["succeeded"] * len(ids)
                served = Counter(j["result"]["node"] for j in jobs)
                rates[policy] = (*hit_rates(jobs, 16), 4 * max(served.values()) / len(jobs))
                if policy == "kv_events":
                    # Every node's worker mirrors its engine's events: the policy had holders.
                    held = {n: cl.r.smembers(cl.keys.node_kv_prefixes(n)) for n in ("n0", "n1", "n2", "n3")}
                    assert all(held.values()), held

        for policy in ("prefix_affinity", "kv_events"):
            hit, allowed, hotspot = rates[policy]
            assert hit >= 0.9 * allowed, rates
            assert hotspot <= 1.5, rates
            assert rates["round_robin"][0] < 0.5 * hit, rates
    finally:
        cl.stop()
