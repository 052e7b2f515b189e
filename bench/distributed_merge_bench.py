#!/usr/bin/env python3
"""One merge across 1, 2 and 3 Celery worker processes: wall time on the bench models.

Run it from the repository root with the project's virtualenv; Redis (``--redis``, default
``redis://127.0.0.1:6379/0``) and PostgreSQL (testbed.postgres) must be running:

    PYTHONPATH=$PWD .venv/bin/python bench/distributed_merge_bench.py
    PYTHONPATH=$PWD .venv/bin/python bench/distributed_merge_bench.py --size-gb 0.05 --repeats 1

What it does:

1. builds (or reuses) the merge bench's models (bench/merge_bench.py: a Llama-shaped fp16
   base and three fine-tunes of ``--size-gb`` each, cached in ``bench/.data/models/``);
2. for each worker count N of ``--workers`` (default 1,2,3): starts N ``weightsmith worker``
   processes (``--concurrency 1`` each) on a queue of their own, against a fresh PostgreSQL
   job store and a local artifact directory; then, for each method, submits the merge as a
   job (``parallelism: N``; none for N = 1, so that is the plain single-worker path) and
   waits for it to succeed; ``--repeats`` times (the first run also warms each worker
   process: its first task imports torch);
3. prints, per run: the wall time from submission to the job's success (the artifact
   published), the manifest's timings as the job's worker saw them (resolve, statistics,
   merge; "gather+finish": the rest up to the manifest, i.e. fetching the parts' shards from
   the artifact store and writing index, config and manifest; "queue+upload": the rest of
   the wall time, i.e. the message reaching a worker and publishing the version), how many
   parts each worker process ran, the peak RSS of each worker's process tree (sampled every
   50 ms), the ratio to the N = 1 run of the same repeat, and the load average.

Output shards are ``--shard-mb`` (default 64) so the output has enough shards for 3 parts.
The table is also written to ``bench/.data/results-distributed.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import merge_bench  # noqa: E402  (the bench models, their generator and the RSS sampler)

METHODS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "weight": 0.3, "parameters": {}},
    "ties_global": {
        "merge_method": "ties",
        "weight": 1.0,
        "parameters": {"density": 0.5, "scope": "global"},
    },
    "pcb": {"merge_method": "pcb", "weight": 1.0, "parameters": {"density": 0.1}},
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def recipe(method: str, dirs: list[Path], workers: int, shard_bytes: int) -> dict[str, Any]:
    m = METHODS[method]
    r: dict[str, Any] = {
        "merge_method": m["merge_method"],
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": m["weight"]}} for d in dirs[1:]],
        "parameters": m["parameters"],
        "dtype": "float16",
        "out_dtype": "float16",
        "seed": 1,
        "output": {"shard_size": shard_bytes},
    }
    if workers > 1:
        r["parallelism"] = workers
    return r


class WorkerPool:
    """N ``weightsmith worker`` processes on one queue, stopped on exit."""

    def __init__(self, n: int, env: dict[str, str], logs: Path) -> None:
        self.queue = f"weightsmith-bench-{secrets.token_hex(4)}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.samplers: list[merge_bench.RssSampler] = []
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            with (logs / f"{self.queue}-{i}.log").open("wb") as out:
                p = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "weightsmith", "worker", "--queues", self.queue),
                        *("--hostname", f"{self.queue}-{i}@%h", "--concurrency", "1"),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.processes.append(p)

    def sample(self) -> None:
        self.samplers = [merge_bench.RssSampler(p.pid, interval=0.05) for p in self.processes]
        for s in self.samplers:
            s.start()

    def peaks_mib(self) -> list[float]:
        for s in self.samplers:
            s.stop()
        return [s.peaks_mib()["VmRSS"] for s in self.samplers]

    def stop(self) -> None:
        for p in self.processes:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.3, help="per model (default 0.3)")
    ap.add_argument("--methods", default="task_arithmetic,ties_global")
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-mb", type=float, default=64)
    ap.add_argument("--data-dir", type=Path, default=merge_bench.DEFAULT_DATA_DIR)
    ap.add_argument("--redis", default=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--timeout", type=float, default=1800, help="per job, s")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose from {sorted(METHODS)}")
    counts = [int(n) for n in args.workers.split(",")]

    from infra.db import ApiKeys, JobStore, make_engine, upgrade_database
    from infra.db.parts import PartStore
    from schemas.jobs import JobCreate, JobKind, JobState
    from testbed.postgres import fresh_database

    print(f"cores: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}); {load()}")
    _, dirs = merge_bench.ensure_models(args.data_dir, args.size_gb, seed=0)
    in_mib = sum(merge_bench.dir_bytes(d) for d in dirs) / merge_bench.MIB
    print(f"models: {len(dirs)} x {merge_bench.dir_bytes(dirs[0]) / merge_bench.MIB:.0f} MiB")
    work = args.data_dir / "distributed"
    results: list[dict[str, Any]] = []
    from celery import Celery

    producer = Celery("weightsmith-bench", broker=args.redis)
    with fresh_database("weightsmith_bench_distributed") as db_url:
        upgrade_database(db_url)
        engine = make_engine(db_url)
        tenant_id = ApiKeys(engine).ensure_tenant("bench").id
        store = JobStore(engine, max_attempts=3, worker_lost_after=timedelta(seconds=300))
        parts = PartStore(engine, worker_lost_after=store.worker_lost_after)
        env = {
            **os.environ,
            "WEIGHTSMITH_DATA_DIR": str(work / "data"),
            "WEIGHTSMITH_BROKER_URL": args.redis,
            "WEIGHTSMITH_DATABASE_URL": db_url,
            "WEIGHTSMITH_OBJECT_STORE_URL": f"file://{work}/artifacts",
            "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
            "WEIGHTSMITH_WORKER_HEARTBEAT_INTERVAL": "5",
            "WEIGHTSMITH_WORKER_LOST_AFTER": "300",
            "PYTHONPATH": str(ROOT),
        }
        base_wall: dict[tuple[str, int], float] = {}
        for n in counts:
            pool = WorkerPool(n, env, work / "logs")
            try:
                time.sleep(3)  # the workers connect
                for repeat in range(args.repeats):
                    for method in methods:
                        name = f"{method.replace('_', '-')}-w{n}-r{repeat}-{secrets.token_hex(2)}"
                        request = JobCreate(
                            kind=JobKind.MERGE,
                            recipe=recipe(method, dirs, n, int(args.shard_mb * 2**20)),
                            artifact_name=name,
                        )
                        pool.sample()
                        t0 = time.monotonic()
                        job_id = store.create_job(tenant_id, request).job.id
                        producer.send_task("weightsmith.run_job", args=[job_id], queue=pool.queue)
                        while True:
                            job = store.get(tenant_id, job_id)
                            assert job is not None
                            if JobState(job.state).is_terminal:
                                break
                            if time.monotonic() - t0 > args.timeout:
                                raise SystemExit(f"job {job_id} still {job.state}")
                            time.sleep(0.05)
                        wall = time.monotonic() - t0
                        rss = pool.peaks_mib()
                        if job.state != JobState.SUCCEEDED:
                            print(f"{method} N={n}: {job.state} {job.error}; {load()}")
                            continue
                        published = work / "artifacts" / "bench" / name
                        manifest = json.loads((published / "v1" / "manifest.json").read_text())
                        shutil.rmtree(published)  # the disk is shared: keep only the figures
                        per_worker: dict[str, int] = {}
                        for p in parts.parts(job_id):
                            pid = (p.worker_id or "?").split(":")[1]
                            per_worker[pid] = per_worker.get(pid, 0) + 1
                        if n == counts[0]:
                            base_wall[(method, repeat)] = wall
                        ratio = wall / base_wall.get((method, repeat), wall)
                        row = {
                            "method": method,
                            "workers": n,
                            "repeat": repeat,
                            "wall_s": round(wall, 2),
                            "x_first": round(ratio, 3),
                            "input_mib_s": round(in_mib / wall, 1),
                            "timings": manifest["timings"],
                            "parts_per_process": per_worker,
                            "worker_peak_rss_mib": [round(r) for r in rss],
                            "loadavg": os.getloadavg(),
                        }
                        results.append(row)
                        t = manifest["timings"]
                        steps = sum(t.get(k, 0.0) for k in ("resolve_s", "statistics_s", "merge_s"))
                        gather = t["total_s"] - steps  # the parts' shards fetched, the rest written
                        rest = wall - t["total_s"]  # the message's way to a worker, the upload
                        print(
                            f"{method:16s} N={n} run {repeat}: wall {wall:6.1f} s "
                            f"(x{ratio:.2f} of N={counts[0]}), {in_mib / wall:6.1f} MiB/s in; "
                            f"resolve {t.get('resolve_s', 0):.1f} s, statistics "
                            f"{t.get('statistics_s', 0):.1f} s, merge {t.get('merge_s', 0):.1f} s, "
                            f"gather+finish {gather:.1f} s, queue+upload {rest:.1f} s; "
                            f"parts per process {per_worker or '-'}; worker RSS peaks "
                            f"{[round(r) for r in rss]} MiB; {load()}",
                            flush=True,
                        )
            finally:
                pool.stop()
        engine.dispose()
    producer.close()
    out = args.data_dir / "results-distributed.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
