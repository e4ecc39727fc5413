"""Soak: many jobs at a steady rate through the whole pipeline while faults hit it every 30 s.

    ./.venv/bin/python scripts/soak.py                       # 100,000 jobs, own stack on the simulator
    ./.venv/bin/python scripts/soak.py --jobs 5000 --rate 30 # a shorter run
    ./.venv/bin/python scripts/soak.py --existing            # against the stack of var/llmconsole.env

By default it starts its own supervised stack (the repository's supervisord.conf, var/ in a temp
folder, the simulator, free ports), so it never touches a running installation. It submits
``--jobs`` jobs open-loop at ``--rate`` per second (short outputs), and every ``--fault-every``
seconds injects the next fault in turn:

1. ``kill -9`` of the proxy worker (supervisord restarts it; its jobs are reclaimed after a lease);
2. ``supervisorctl restart inference_worker``;
3. ``kill -9`` of the engine;
4. a Redis restart (``supervisorctl restart redis``; AOF keeps the queue).

It reports accepted, succeeded, failed/dead, lost (accepted but never final: must be 0), written
twice (the stats hash's ``succeeded`` counter against the distinct jobs seen succeeding: must be 0),
Redis memory at start, end and peak against its maxmemory, each service's RSS at start (after a
warm-up) and end, and writes ``soak.json`` and ``soak.png`` (throughput over time, faults marked)
to ``--out``. Exit code 0 when nothing was lost or written twice, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.contracts import Keys, new_id
from services.lifecycle.readiness import checks
from services.lifecycle.supervisor_client import supervisor_proxy
from services.queue import REDIS_DOWN, redis_client
from services.settings import REPO_ROOT, Settings, load_settings

VENV_BIN = REPO_ROOT / ".venv" / "bin"
SERVICES = ("redis", "engine", "inference_worker", "proxy_worker", "ingestion")
FAULTS = ("kill -9 proxy_worker", "restart inference_worker", "kill -9 engine", "restart redis")
FINAL = ("succeeded", "failed", "dead")


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------


class SoakStack:
    """A supervisord stack: its own in a temp folder, or the installed one (``--existing``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.own = not args.existing
        if not self.own:
            self.settings = load_settings()
            self.conf = REPO_ROOT / "supervisord.conf"
            self.env = dict(os.environ)
            return
        self.dir = Path(tempfile.mkdtemp(prefix="llmc-soak-"))
        var = self.dir / "var"
        (var / "log").mkdir(parents=True)
        var.chmod(0o700)
        text = (REPO_ROOT / "supervisord.conf").read_text()
        self.conf = self.dir / "supervisord.conf"
        self.conf.write_text(text.replace("%(here)s/var", str(var)).replace("%(here)s", str(REPO_ROOT)))
        values: dict[str, Any] = {
            "redis_port": _free_port(),
            "redis_password": "pw-" + new_id(),
            "api_key": "key-" + new_id(),
            "engine_api_key": "ekey-" + new_id(),
            "engine_kind": "sim",
            "engine_port": _free_port(),
            "worker_port": _free_port(),
            "ingestion_port": _free_port(),
            "proxy_metrics_port": 0,
            "var_dir": str(var),
            "results_dir": str(self.dir / "runs"),
            "lease_ms": 5000,
            "proxy_concurrency": 64,
            "redis_maxmemory_mb": args.redis_maxmemory_mb,
            "job_retention_max": args.job_retention_max,
            # Every submit carries an Idempotency-Key; at the default 24 h TTL a long soak's keys
            # would pile up (about 100 B each) and hide whether the rest of Redis stays flat.
            "idempotency_ttl_s": 600,
            "node_id": "soak",
        }
        env_file = var / "llmconsole.env"
        env_file.write_text("".join(f"{k.upper()}={v}\n" for k, v in values.items()))
        env_file.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env["LLMC_ENV_FILE"] = str(env_file)
        self.settings = Settings(_env_file=env_file)  # type: ignore[call-arg]

    def start(self, timeout: float = 120) -> None:
        """Start supervisord (own stack) and wait until every service answers."""
        if self.own:
            subprocess.run([VENV_BIN / "supervisord", "-c", self.conf], env=self.env, check=True)
        deadline = time.monotonic() + timeout
        while not all(checks(self.settings).values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"stack not ready after {timeout:.0f} s: {checks(self.settings)}")
            time.sleep(0.5)

    def ctl(self, *args: str) -> str:
        """supervisorctl against this stack's supervisord."""
        out = subprocess.run(
            [VENV_BIN / "supervisorctl", "-c", self.conf, *args], env=self.env, capture_output=True, text=True
        )
        return (out.stdout + out.stderr).strip()

    def pids(self) -> dict[str, int]:
        """Program → pid of the running programs."""
        rpc = supervisor_proxy(self.settings.supervisor_socket)
        return {i["name"]: i["pid"] for i in rpc.supervisor.getAllProcessInfo() if i["pid"]}

    def stop(self) -> None:
        """Shut the own stack down (an existing one is left running)."""
        if self.own:
            self.ctl("shutdown")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its children (vLLM runs several), from /proc."""
    total = 0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            if p == pid:
                return None
            continue
        todo.extend(int(c) for c in children)
    return total


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass
class Soak:
    """Everything the run observes."""

    accepted: dict[str, float] = field(default_factory=dict)  # job id → seconds since start
    final: dict[str, tuple[str, float]] = field(default_factory=dict)  # job id → (state, seconds)
    submit_retries: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    memory: list[tuple[float, int]] = field(default_factory=list)
    maxmemory: int = 0
    rss_start: dict[str, int | None] = field(default_factory=dict)
    rss_end: dict[str, int | None] = field(default_factory=dict)
    stats_start: dict[str, int] = field(default_factory=dict)
    stats_end: dict[str, int] = field(default_factory=dict)


async def submit_all(st: SoakStack, args: argparse.Namespace, soak: Soak, t0: float) -> None:
    """Submit every job at its scheduled time; retry refusals and outages with the same key."""
    s = st.settings
    headers = {"Authorization": f"Bearer {s.api_key.get_secret_value()}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    sem = asyncio.Semaphore(512)
    async with httpx.AsyncClient(base_url=s.ingestion_url, timeout=10, limits=limits) as c:

        async def one(i: int) -> None:
            body = {"input_tokens": args.input_tokens, "output_tokens": args.output_tokens, "seed": i,
                    "run_id": args.run_id}  # fmt: skip
            key = f"{args.run_id}-{i}"  # a retry after a lost reply gets the same job
            async with sem:
                while True:
                    try:
                        r = await c.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": key})
                    except httpx.HTTPError:
                        soak.submit_retries += 1
                        await asyncio.sleep(0.5)
                        continue
                    if r.status_code == 202:
                        soak.accepted[r.json()["job_id"]] = time.monotonic() - t0
                        return
                    if r.status_code in (429, 503):
                        soak.refused[r.status_code] = soak.refused.get(r.status_code, 0) + 1
                        await asyncio.sleep(min(float(r.headers.get("Retry-After", "1")), 5.0))
                        continue
                    if r.status_code >= 500:  # a server error: counted, and retried with the same key
                        soak.refused[r.status_code] = soak.refused.get(r.status_code, 0) + 1
                        await asyncio.sleep(0.5)
                        continue
                    raise SystemExit(f"submit {i}: {r.status_code} {r.text}")

        tasks = []
        for i in range(args.jobs):
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            if len(tasks) >= 2000:
                done = [t for t in tasks if t.done()]
                for t in done:
                    t.result()
                tasks = [t for t in tasks if not t.done()]
        await asyncio.gather(*tasks)


async def watch_events(st: SoakStack, soak: Soak, t0: float) -> None:
    """Final states from the job-event channel; resubscribes after a Redis restart (gaps are
    filled by the reconciliation at the end)."""
    keys = Keys(st.settings.redis_prefix)
    while True:
        r = redis_client(st.settings, blocking=True)
        try:
            async with r.pubsub() as ps:
                await ps.subscribe(keys.events)
                async for msg in ps.listen():
                    if msg.get("type") != "message":
                        continue
                    ev = json.loads(msg["data"])
                    if ev.get("state") in FINAL:
                        soak.final.setdefault(ev["job_id"], (ev["state"], time.monotonic() - t0))
        except asyncio.CancelledError:
            raise
        except Exception:
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await r.aclose()


async def watch_memory(st: SoakStack, soak: Soak, t0: float) -> None:
    """Redis used_memory once a second."""
    r = redis_client(st.settings)
    try:
        while True:
            with contextlib.suppress(*REDIS_DOWN, Exception):
                info = await r.info("memory")
                soak.memory.append((time.monotonic() - t0, int(info["used_memory"])))
                soak.maxmemory = int(info.get("maxmemory", 0))
            await asyncio.sleep(1.0)
    finally:
        await r.aclose()


async def inject_faults(st: SoakStack, soak: Soak, every_s: float, t0: float) -> None:
    """One fault every ``every_s`` seconds, in turn."""
    n = 0
    while True:
        await asyncio.sleep(every_s)
        fault = FAULTS[n % len(FAULTS)]
        n += 1
        try:
            pids = await asyncio.to_thread(st.pids)
            if fault.startswith("kill -9"):
                name = fault.split()[-1]
                os.kill(pids[name], signal.SIGKILL)
                out = f"pid {pids[name]}"
            else:
                out = await asyncio.to_thread(st.ctl, "restart", fault.split()[-1])
        except Exception as e:  # the stack mid-restart: note it, go on
            out = f"failed: {e.__class__.__name__}: {e}"
        soak.faults.append((time.monotonic() - t0, fault, out.replace("\n", "; ")))
        print(
            f"[{time.monotonic() - t0:7.1f}s] fault: {fault} ({out.splitlines()[0] if out else ''})",
            flush=True,
        )


async def stats(st: SoakStack) -> dict[str, int]:
    """The stats hash (lifetime counters), retried through a Redis restart."""
    for _ in range(60):
        r = redis_client(st.settings)
        try:
            return {k: int(v) for k, v in (await r.hgetall(Keys(st.settings.redis_prefix).stats)).items()}
        except REDIS_DOWN:
            await asyncio.sleep(1)
        finally:
            await r.aclose()
    return {}


async def reconcile(st: SoakStack, soak: Soak, t0: float, drain_s: float) -> list[str]:
    """Wait for every accepted job to be final; read the states events missed from the job hashes.

    Returns the jobs still not final after ``drain_s`` (lost, unless the wait was too short).
    """
    keys = Keys(st.settings.redis_prefix)
    deadline = time.monotonic() + drain_s
    while True:
        todo = [j for j in soak.accepted if j not in soak.final]
        if not todo:
            return []
        r = redis_client(st.settings)
        try:
            for i in range(0, len(todo), 1000):
                chunk = todo[i : i + 1000]
                async with r.pipeline(transaction=False) as p:
                    for j in chunk:
                        p.hget(keys.job(j), "state")
                    states = await p.execute()
                for j, state in zip(chunk, states, strict=True):
                    if state in FINAL:
                        soak.final.setdefault(j, (state, time.monotonic() - t0))
                    elif state is None:
                        # No hash: retention pruned it, and it prunes only final jobs (every
                        # accepted job has a hash). Final, state unseen; the counters tell.
                        soak.final.setdefault(j, ("pruned", time.monotonic() - t0))
        except REDIS_DOWN:
            pass
        finally:
            await r.aclose()
        todo = [j for j in soak.accepted if j not in soak.final]
        if not todo or time.monotonic() > deadline:
            return todo
        await asyncio.sleep(2)


async def reconcile_forever(st: SoakStack, soak: Soak, t0: float, every_s: float = 15.0) -> None:
    """Fill in, from the job hashes, final states the event channel missed (a Redis restart
    drops the subscription), while the jobs are still retained: at the end, retention may have
    pruned them, leaving them unverifiable."""
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(Exception):
            await reconcile(st, soak, t0, 0)


def rss_all(st: SoakStack) -> dict[str, int | None]:
    """RSS of every service now."""
    pids = st.pids()
    return {name: rss_bytes(pids[name]) if name in pids else None for name in SERVICES}


async def run(args: argparse.Namespace) -> int:
    """The whole soak; returns the exit code."""
    st = SoakStack(args)
    out = Path(args.out)
    print(
        f"starting {'own stack in ' + str(st.dir) if st.own else 'against the installed stack'}", flush=True
    )
    st.start()
    soak = Soak()
    soak.stats_start = await stats(st)
    t0 = time.monotonic()
    watchers = [
        asyncio.create_task(watch_events(st, soak, t0)),
        asyncio.create_task(watch_memory(st, soak, t0)),
        asyncio.create_task(reconcile_forever(st, soak, t0)),
    ]
    faults = asyncio.create_task(inject_faults(st, soak, args.fault_every, t0))

    async def rss_after_warmup() -> None:
        await asyncio.sleep(min(10.0, args.jobs / args.rate / 4))
        soak.rss_start = await asyncio.to_thread(rss_all, st)

    warm = asyncio.create_task(rss_after_warmup())
    progress = asyncio.create_task(_progress(soak, args, t0))
    try:
        await submit_all(st, args, soak, t0)
        print(f"[{time.monotonic() - t0:7.1f}s] all {len(soak.accepted)} jobs accepted", flush=True)
        # Faults go on while the queue drains; they stop before the final count.
        todo = await reconcile(st, soak, t0, 60)
        faults.cancel()
        if todo:
            todo = await reconcile(st, soak, t0, args.drain_s)
    finally:
        faults.cancel()
        progress.cancel()
        await warm
        soak.rss_end = await asyncio.to_thread(rss_all, st)
        soak.stats_end = await stats(st)
        await asyncio.sleep(1.5)  # one more memory sample
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, faults, progress, return_exceptions=True)
        if not args.keep:
            st.stop()
    elapsed = time.monotonic() - t0
    report = summarize(args, soak, todo, elapsed)
    await asyncio.to_thread(write_outputs, report, soak, out, args)
    return 0 if report["lost"] == 0 and report["written_twice"] == 0 else 1


async def _progress(soak: Soak, args: argparse.Namespace, t0: float) -> None:
    while True:
        await asyncio.sleep(15)
        mem = soak.memory[-1][1] if soak.memory else 0
        print(
            f"[{time.monotonic() - t0:7.1f}s] accepted {len(soak.accepted)}/{args.jobs}  final {len(soak.final)}"
            f"  redis {mem / 2**20:.1f} MiB",
            flush=True,
        )


def summarize(args: argparse.Namespace, soak: Soak, lost: list[str], elapsed: float) -> dict[str, Any]:
    """The figures of the run (soak.json)."""
    states = [s for s, _t in soak.final.values()]
    succeeded = states.count("succeeded")
    delta = soak.stats_end.get("succeeded", 0) - soak.stats_start.get("succeeded", 0)
    finals = sum(soak.stats_end.get(k, 0) - soak.stats_start.get(k, 0) for k in FINAL)
    mem = [m for _t, m in soak.memory]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "jobs": args.jobs,
        "rate": args.rate,
        "output_tokens": args.output_tokens,
        "elapsed_s": round(elapsed, 1),
        "accepted": len(soak.accepted),
        "succeeded": succeeded,
        "failed": states.count("failed"),
        "dead": states.count("dead"),
        "lost": len(lost),
        "lost_examples": lost[:10],
        # Each finish bumps one counter once: more finishes than distinct final jobs = a double write.
        "written_twice": finals - len(soak.final),
        "final_unseen_pruned": states.count("pruned"),
        "stats_succeeded_delta": delta,
        "submit_retries": soak.submit_retries,
        "refused": soak.refused,
        "faults": [{"t_s": round(t, 1), "fault": f, "output": o} for t, f, o in soak.faults],
        "redis_memory": {
            "start": mem[0] if mem else None,
            "end": mem[-1] if mem else None,
            "peak": max(mem) if mem else None,
            "maxmemory": soak.maxmemory,
        },
        "rss_start": soak.rss_start,
        "rss_end": soak.rss_end,
        "throughput_jobs_per_s": round(succeeded / elapsed, 2) if elapsed else None,
    }


def plot(soak: Soak, path: Path, args: argparse.Namespace) -> None:
    """Throughput over time (accepted and finished per 10 s), Redis memory, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = 10.0
    end = max([*soak.accepted.values(), *(t for _s, t in soak.final.values()), 1.0])
    n = int(end // bucket) + 1
    acc = [0] * n
    fin = [0] * n
    for t in soak.accepted.values():
        acc[int(t // bucket)] += 1
    for _s, t in soak.final.values():
        fin[int(t // bucket)] += 1
    xs = [i * bucket for i in range(n)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    ax1.plot(xs, [a / bucket for a in acc], label="accepted/s", color="tab:blue")
    ax1.plot(xs, [f / bucket for f in fin], label="finished/s", color="tab:green")
    ax1.axhline(args.rate, color="grey", lw=0.8, ls=":", label=f"target {args.rate:g}/s")
    ax1.set_ylabel("jobs/s (10 s bins)")
    ax1.set_title(
        f"soak: {len(soak.accepted):,} jobs at {args.rate:g}/s, a fault every {args.fault_every:g} s"
    )
    if soak.memory:
        ax2.plot(
            [t for t, _m in soak.memory], [m / 2**20 for _t, m in soak.memory], color="tab:red", label="used"
        )
        peak = max(m for _t, m in soak.memory) / 2**20
        if soak.maxmemory and soak.maxmemory / 2**20 < peak * 4:
            ax2.axhline(soak.maxmemory / 2**20, color="black", ls="--", lw=0.8, label="maxmemory")
        elif soak.maxmemory:  # far above: say it, keep the curve readable
            ax2.set_ylim(0, peak * 1.4)
            ax2.text(0.99, 0.95, f"maxmemory {soak.maxmemory / 2**20:,.0f} MiB (off the scale)",
                     transform=ax2.transAxes, ha="right", va="top", fontsize=8)  # fmt: skip
    ax2.set_ylabel("Redis used_memory (MiB)")
    ax2.set_xlabel("seconds since start")
    colors = {f: c for f, c in zip(FAULTS, ("tab:purple", "tab:orange", "tab:brown", "tab:red"), strict=True)}
    for t, f, _o in soak.faults:
        for ax in (ax1, ax2):
            ax.axvline(t, color=colors.get(f, "grey"), lw=0.6, alpha=0.6)
    handles = [plt.Line2D([], [], color=c, lw=1, label=f) for f, c in colors.items()]
    ax1.legend(handles=[*ax1.get_legend_handles_labels()[0], *handles], fontsize=7, loc="lower right", ncol=2)
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], soak: Soak, out: Path, args: argparse.Namespace) -> None:
    """soak.json, soak.png and the printed figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    plot(soak, out / "soak.png", args)
    print_report(report, out)


def print_report(rep: dict[str, Any], out: Path) -> None:
    """The figures, readable."""

    def mib(v: int | None) -> str:
        return f"{v / 2**20:.1f} MiB" if v is not None else "-"

    m = rep["redis_memory"]
    print(f"\njobs accepted {rep['accepted']:,}  succeeded {rep['succeeded']:,}  failed {rep['failed']}  "
          f"dead {rep['dead']}  LOST {rep['lost']}  WRITTEN TWICE {rep['written_twice']}")  # fmt: skip
    print(f"elapsed {rep['elapsed_s']} s, {rep['throughput_jobs_per_s']} jobs/s; {len(rep['faults'])} faults; "
          f"submit retries {rep['submit_retries']}, refusals {rep['refused']}")  # fmt: skip
    print(f"Redis memory: start {mib(m['start'])}, end {mib(m['end'])}, peak {mib(m['peak'])}, "
          f"maxmemory {mib(m['maxmemory'])}")  # fmt: skip
    for name in SERVICES:
        a, b = rep["rss_start"].get(name), rep["rss_end"].get(name)
        growth = f"{(b - a) / a * 100:+.1f} %" if a and b else "-"
        print(f"  RSS {name:17s} {mib(a):>11s} → {mib(b):>11s}  {growth}")
    print(f"written: {out / 'soak.json'}, {out / 'soak.png'}")


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs to submit (100,000)")
    p.add_argument("--rate", type=float, default=30.0, help="jobs per second, steady (30)")
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (30)")
    p.add_argument("--drain-s", type=float, default=600.0, help="longest wait for the last jobs (600)")
    p.add_argument("--redis-maxmemory-mb", type=int, default=1024, help="own stack's REDIS_MAXMEMORY_MB")
    p.add_argument(
        "--job-retention-max", type=int, default=20_000, help="own stack's JOB_RETENTION_MAX (20,000)"
    )
    p.add_argument("--existing", action="store_true", help="use the stack of var/llmconsole.env")
    p.add_argument("--keep", action="store_true", help="leave the own stack running")
    p.add_argument("--run-id", default="soak-" + new_id()[-8:])
    p.add_argument("--out", default=str(REPO_ROOT / "var" / "soak"))
    args = p.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
