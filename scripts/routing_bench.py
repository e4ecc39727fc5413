"""Routing policies side by side on 4 simulator nodes sharing one Redis (issue 10's done-when bench).

Starts, on loopback and free ports, in a temporary folder: one Redis (llmconsole's own config,
AOF everysec), four nodes (a simulator engine with a small KV cache + its inference worker,
each its own NODE_ID and ports), one ingestion and one proxy worker. Then it runs the same
prefix-group workload once per policy through the pipeline (``llmconsole bench`` as a library,
``--routing`` per run), prints the per-node tables and the comparison, and checks the targets:

* ``prefix_affinity`` reaches at least 90 % of the hit rate the workload allows (its
  shared-prefix tokens less each group's first miss, over all prompt tokens);
* it beats ``round_robin`` on hit rate and on median TTFT;
* its hotspot (nodes × the largest share of jobs) is at most 1.5.

Each node's cache holds only a few of the groups (``--kv-blocks``): a policy that sends every
group everywhere keeps evicting them. Exit code 0 when every target is met, 1 otherwise.

    ./.venv/bin/python scripts/routing_bench.py                      # the defaults below
    ./.venv/bin/python scripts/routing_bench.py --requests 640 --concurrency 32 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a checkout: the repository root on the path (``python scripts/routing_bench.py``).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from rich.console import Console

from bench.compare import Comparison, compare_summaries
from bench.config import BenchConfig
from bench.render import comparison_table, routing_table
from bench.report import load_run
from bench.runner import run_benchmark
from services.contracts import Keys, NodeHeartbeat, new_id
from services.settings import Settings
from tests.stackutil import Proc, RedisServer, free_port, http_ok, settings_env, wait_until

POLICIES = ("round_robin", "prefix_affinity")
#: The pipeline figures shown beside the routing ones in the comparison.
COMPARED = frozenset(
    {"request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms", "failed"}
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="simulator nodes (default 4)")
    p.add_argument("--prefix-groups", type=int, default=16, help="prefix groups (default 16)")
    p.add_argument("--requests", type=int, default=480, help="measured requests per policy (default 480)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--input-tokens", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--prefix-share", type=float, default=0.75, help="shared-prefix share (default 0.75)")
    p.add_argument("--output-tokens", type=int, default=16, help="output tokens (default 16)")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=320,
        help="KV blocks of 16 tokens per node (default 320: about five of the 48-block prefixes "
        "beside the running requests)",
    )
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, runs)")
    return p.parse_args(argv)


class Cluster:
    """Redis, N simulator nodes, ingestion and one proxy worker, as real processes."""

    def __init__(self, workdir: Path, nodes: int, kv_blocks: int) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", password="pw-" + new_id(), launcher=True)
        self.shared: dict[str, Any] = {
            "redis_port": self.redis.port,
            "redis_password": self.redis.password,
            "redis_prefix": f"rb{new_id()[-8:]}:",
            "api_key": "key-" + new_id(),
            "worker_api_key": "wkey-" + new_id(),
            "engine_kind": "sim",
            "ingestion_port": free_port(),
            "proxy_metrics_port": 0,
            "sim_kv_blocks": kv_blocks,
            "sim_block_size": 16,
            "node_ttl_s": 5,
            "var_dir": str(workdir / "var"),
            "results_dir": str(workdir / "runs"),
        }
        self.procs: list[Proc] = []
        self.node_ids = [f"sim-node-{i + 1}" for i in range(nodes)]
        for node in self.node_ids:
            values = {
                **self.shared,
                "node_id": node,
                "engine_port": free_port(),
                "worker_port": free_port(),
                "var_dir": str(workdir / node),
            }
            env = settings_env(values)
            self.procs.append(Proc(f"{node}-engine", "services.sim_engine", env, workdir))
            self.procs.append(Proc(f"{node}-worker", "services.inference_worker", env, workdir))
        env = settings_env(self.shared)
        self.procs.append(Proc("ingestion", "services.ingestion", env, workdir))
        self.procs.append(Proc("proxy_worker", "services.proxy_worker", env, workdir))

    @property
    def settings(self) -> Settings:
        """Settings of a client of this cluster (the bench)."""
        return Settings(_env_file=None, **self.shared)  # type: ignore[call-arg]

    def live_nodes(self) -> list[str]:
        """Nodes whose heartbeat says up and ready with a capacity."""
        keys = Keys(self.shared["redis_prefix"])
        r = redis.Redis(port=self.redis.port, password=self.redis.password, decode_responses=True)
        try:
            out = []
            for node in sorted(r.smembers(keys.nodes)):  # type: ignore[union-attr]
                h = r.hgetall(keys.node(node))
                if h:
                    hb = NodeHeartbeat.from_redis(h)  # type: ignore[arg-type]
                    if hb.ready and hb.capacity > 0 and hb.state == "up":
                        out.append(node)
            return out
        finally:
            r.close()

    def start(self) -> None:
        """Start everything; wait for ingestion and every node to be ready."""
        self.redis.start()
        for p in self.procs:
            p.start()
        s = self.settings
        wait_until(lambda: http_ok(f"{s.ingestion_url}/readyz"), 60, "ingestion ready")
        wait_until(
            lambda: len(self.live_nodes()) == len(self.node_ids),
            90,
            f"{len(self.node_ids)} nodes up and ready in Redis (logs in {self.workdir})",
            interval=0.3,
        )

    def stop(self) -> None:
        """Stop every process (services first, Redis last)."""
        for p in reversed(self.procs):
            p.stop()
        self.redis.stop()


async def run_policies(args: argparse.Namespace, cluster: Cluster, out: Path) -> dict[str, dict[str, Any]]:
    """One run per policy, same workload; returns summaries by policy."""
    summaries: dict[str, dict[str, Any]] = {}
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        cfg = BenchConfig(
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
            prefix_share=args.prefix_share,
            prefix_groups=args.prefix_groups,
            requests=args.requests,
            concurrency=args.concurrency,
            seed=args.seed,
            routing=policy,  # type: ignore[arg-type]
            label=f"routing {policy}",
            out=str(out / policy),
            plots=False,
        )
        t0 = time.perf_counter()
        result = await run_benchmark(cfg, None, settings=cluster.settings)
        print(f"{policy}: {result.summary.get('completed')} requests in {time.perf_counter() - t0:.1f} s")
        summaries[policy] = result.summary
    return summaries


def check(summaries: dict[str, dict[str, Any]], console: Console) -> bool:
    """Print the targets and whether each is met."""
    pa, rr = summaries.get("prefix_affinity"), summaries.get("round_robin")
    if pa is None or rr is None:
        console.print("targets need both round_robin and prefix_affinity")
        return False
    ra, rb = pa.get("routing") or {}, rr.get("routing") or {}
    rows = [
        (
            "prefix_affinity hit rate >= 90 % of the allowed",
            f"{(ra.get('hit_rate_of_allowed') or 0) * 100:.1f} % "
            f"({(ra.get('hit_rate') or 0) * 100:.1f} % of {(ra.get('hit_rate_allowed') or 0) * 100:.1f} %)",
            (ra.get("hit_rate_of_allowed") or 0) >= 0.9,
        ),
        (
            "hit rate: prefix_affinity > round_robin",
            f"{(ra.get('hit_rate') or 0) * 100:.1f} % vs {(rb.get('hit_rate') or 0) * 100:.1f} %",
            (ra.get("hit_rate") or 0) > (rb.get("hit_rate") or 0),
        ),
        (
            "median TTFT: prefix_affinity < round_robin",
            f"{pa.get('median_ttft_ms', 0):.1f} ms vs {rr.get('median_ttft_ms', 0):.1f} ms",
            pa.get("median_ttft_ms", 1e18) < rr.get("median_ttft_ms", 0),
        ),
        (
            "prefix_affinity hotspot <= 1.5",
            f"{ra.get('hotspot') or 0:.2f}",
            ra.get("hotspot") is not None and ra["hotspot"] <= 1.5,
        ),
    ]
    ok = True
    for what, value, met in rows:
        console.print(f"{'MET    ' if met else 'NOT MET'}  {what}: {value}")
        ok &= met
    return ok


def main(argv: list[str] | None = None) -> int:
    """Start the cluster, run the policies, print the comparison; 0 if every target is met."""
    args = parse_args(argv)
    console = Console(width=140)
    tmp = Path(tempfile.mkdtemp(prefix="llmc-routing-bench-"))
    out = Path(args.out) if args.out else tmp / "runs"
    cluster = Cluster(tmp, args.nodes, args.kv_blocks)
    console.print(
        f"{args.nodes} simulator nodes ({args.kv_blocks} KV blocks of 16 tokens each), "
        f"{args.prefix_groups} prefix groups, {args.requests} requests of {args.input_tokens} in "
        f"(prefix share {args.prefix_share}) / {args.output_tokens} out, concurrency {args.concurrency}"
    )
    try:
        cluster.start()
        summaries = asyncio.run(run_policies(args, cluster, out))
    except BaseException:
        for p in cluster.procs:
            console.print(f"--- {p.name}\n{p.log_text()[-1500:]}", markup=False)
        raise
    finally:
        cluster.stop()
    for policy, s in summaries.items():
        if s.get("routing"):
            console.print(routing_table(s["routing"]))
        console.print(
            f"{policy}: median TTFT {s.get('median_ttft_ms', 0):.1f} ms · "
            f"p99 TTFT {s.get('p99_ttft_ms', 0):.1f} ms · {s.get('request_throughput', 0):.1f} req/s"
        )
    if len(summaries) == 2:
        a, b = (load_run(out / p) for p in summaries)
        rows = [
            r
            for r in compare_summaries(a.summary, b.summary)
            if r.section == "routing" or (r.section == "pipeline" and r.key in COMPARED)
        ]
        console.print(comparison_table(Comparison(a, b, rows)))
    (out / "routing_bench.json").write_text(
        json.dumps(
            {
                p: {"routing": s.get("routing"), "median_ttft_ms": s.get("median_ttft_ms")}
                for p, s in summaries.items()
            },
            indent=1,
        )
    )
    ok = check(summaries, console)
    console.print(
        f"results: {out}" + ("" if args.keep or args.out else " (temporary: pass --keep to keep it)")
    )
    if not args.keep and not args.out:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
