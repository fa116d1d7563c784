"""Job runs submitted through the webserver and launched as the daemon launches them: the variants, each
run paired with the same run with nothing to refresh, and the Dagster processes' memory."""

import os
import socket
import statistics
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import psycopg

from analytics_views.postgres.database import libpq_url
from analytics_views.postgres.refresh import SKIPPED
from analytics_views.sql_files.views import load_views
from bench.postgres_measures import bench_database, refresh_sql
from bench.timing import log, median_time

# The job timings measure real refreshes: without this, every run after the first would find its sources
# unchanged and skip (measured on its own by measure_skips).
FORCE_REFRESH = {"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "skip_unchanged": False}}}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MemorySampler:
    """Peak of the summed RSS of the Dagster processes (and all their children), sampled every 50 ms."""

    def __init__(self, processes: list[subprocess.Popen]):
        self.roots = [psutil.Process(p.pid) for p in processes]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        for root in self.roots:
            try:
                members = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in members:
                try:
                    total += member.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.05)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dagster_home(path: Path, tuned: bool) -> Path:
    """The project's dagster.yaml (tuned) or the same without its run coordinator (Dagster's default queue)."""
    from analytics_views.operations.services import DAGSTER_YAML, prepare_dagster_home

    if tuned:
        return prepare_dagster_home(path)
    path.mkdir(parents=True, exist_ok=True)
    text = DAGSTER_YAML.read_text()
    start = text.find("run_coordinator:")
    if start >= 0:
        end = text.find("\n\n", start)
        text = text[:start] + text[end + 2 :]
    (path / "dagster.yaml").write_text(text)
    return path


def run_job(client, job: str, run_config: dict | None, sampler: MemorySampler, force: bool = True) -> dict:
    """Submit a run through the webserver and time it to SUCCESS. force: refresh every view (else a view whose
    sources did not change since its last refresh skips, which leaves the run's own cost)."""
    import dagster as dg

    from analytics_views.orchestration.jobs import executor_config

    run_config = {**(run_config or executor_config()), **(FORCE_REFRESH if force else {})}
    started = time.perf_counter()
    run_id = client.submit_job_execution(job, repository_location_name="analytics_views", run_config=run_config)
    while (status := client.get_run_status(run_id)) not in (
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    ):
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if status != dg.DagsterRunStatus.SUCCESS:
        raise RuntimeError(f"{job} run {run_id} ended {status}")
    with dg.DagsterInstance.get() as instance:
        records = instance.get_records_for_run(run_id).records
        run = instance.get_run_record_by_id(run_id)
    materializations = [
        event.event_specific_data.materialization
        for record in records
        if (event := record.event_log_entry.dagster_event) and event.is_step_materialization
    ]
    refreshes = {m.asset_key.to_user_string(): m.metadata["refresh_duration_s"].value for m in materializations}
    modes = {m.asset_key.to_user_string(): m.metadata["refresh_mode"].value for m in materializations}
    return {
        "wall_s": round(wall, 3),
        "slowest_view_s": round(max(refreshes.values()), 3),
        "sum_of_views_s": round(sum(refreshes.values()), 3),
        # Where the time goes: from submission until the run worker started, then the worker's own time.
        "submit_to_worker_start_s": round(run.start_time - run.create_timestamp.timestamp(), 3),
        "worker_s": round(run.end_time - run.start_time, 3),
        "views": refreshes,
        "modes": modes,
    }


EXECUTORS = {
    # Dagster's default: a new Python process per step, started with spawn, at most one per local core.
    "multiprocess (spawn)": {"execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}}}}},
    # Dagster's in_process: the run's own process, steps one after another.
    "in process (one after another)": "in_process",
    # What the jobs run with (executor.py): steps in threads of the run's own process.
    "threads (jobs' default)": "threads",
}
VARIANTS = [
    # (label, tuned dagster.yaml, executor)
    ("Dagster defaults (queue polled every 5 s, spawned step processes)", False, "multiprocess (spawn)"),
    ("project settings, steps one after another in process", True, "in process (one after another)"),
    ("project settings (runs start at once, steps in threads)", True, "threads (jobs' default)"),
]


def executor_run_config(executor: str) -> dict:
    from analytics_views.orchestration.jobs import executor_config

    config = EXECUTORS[executor]
    return executor_config(config) if isinstance(config, str) else config


def measure_jobs(url: str, server_url: str, work_dir: Path, repeats: int) -> dict:
    from dagster_graphql import DagsterGraphQLClient

    from analytics_views.operations.services import dagster_services

    jobs = {cadence: [v.name for v in load_views() if v.cadence == cadence] for cadence in ("daily", "weekly")}
    results: dict = {"old_way": {}, "variants": {}}
    for cadence, views in jobs.items():
        # The old service: one connection, each view refreshed CONCURRENTLY after the other.
        def old_way():
            with psycopg.connect(url, autocommit=True) as conn:
                for view in views:
                    conn.execute(refresh_sql(view, concurrently=True))

        results["old_way"][f"{cadence}_refresh_job"] = round(median_time(old_way, repeats), 3)

    for tuned in (False, True):
        with bench_database(server_url, "dagster") as dagster_url, ExitStack() as stack:
            home = dagster_home(work_dir / f"dagster_home_{'tuned' if tuned else 'default'}", tuned)
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "DAGSTER_POSTGRES_URL": libpq_url(dagster_url),
                "DAGSTER_HOME": str(home),
            }
            previous = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL")}
            os.environ.update({k: env[k] for k in previous})
            stack.callback(lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                                    for k, v in previous.items()])
            port = free_port()
            log(f"starting dagster-webserver and dagster-daemon ({'project' if tuned else 'default'} settings)")
            processes = stack.enter_context(dagster_services(env=env, port=port, log_dir=work_dir / "logs"))
            client = DagsterGraphQLClient("127.0.0.1", port_number=port)
            time.sleep(3)  # let the daemon start its loops
            sampler = stack.enter_context(MemorySampler(processes))
            idle = sampler.current()
            variants = [(label, executor) for label, variant_tuned, executor in VARIANTS if variant_tuned == tuned]
            run_job(client, "weekly_refresh_job", None, sampler)  # warm up: code server, first imports
            runs: dict = {}
            skipped: dict = {}
            # Variants interleaved, so that other load on the machine hits them alike. Each run is paired with
            # the same run with nothing to refresh (every view skips: sources unchanged), whose wall time is the
            # run's launch cost, what Dagster costs around the refreshes. The two runs of a pair go in turns
            # (refresh first, then skip first), so that neither always follows the other. Runs under Dagster's
            # defaults take several times longer: they get at most 3 pairs.
            for repeat in range(repeats):
                for label, executor in variants:
                    if not tuned and repeat >= min(repeats, 3):
                        continue
                    for cadence in jobs:
                        job = f"{cadence}_refresh_job"
                        config = executor_run_config(executor)
                        pair = {}
                        for force in (True, False) if repeat % 2 == 0 else (False, True):
                            pair[force] = run_job(client, job, config, sampler, force=force)
                        if set(pair[False]["modes"].values()) != {SKIPPED}:
                            raise RuntimeError(f"{job} refreshed views with unchanged sources: {pair[False]['modes']}")
                        runs.setdefault((label, job), []).append(pair[True])
                        skipped.setdefault((label, job), []).append(pair[False])
                        log(f"{label}: {job} {pair[True]['wall_s']} s, nothing to refresh {pair[False]['wall_s']} s")
            for (label, job), job_runs in runs.items():
                variant = results["variants"].setdefault(label, {"executor": dict(variants)[label], "jobs": {}})
                summary = {
                    key: round(statistics.median(r[key] for r in job_runs), 3)
                    for key in ("wall_s", "slowest_view_s", "sum_of_views_s", "submit_to_worker_start_s", "worker_s")
                }
                pairs = list(zip(job_runs, skipped[label, job]))
                variant["jobs"][job] = summary | {
                    # Wall time of the same run when every view skips.
                    "launch_cost_s": round(statistics.median(skip["wall_s"] for _, skip in pairs), 3),
                    # What the refreshes added to the run, to compare with the slowest view: the median over the
                    # pairs of (run - the same run with nothing to refresh), each pair measured back to back.
                    "beyond_launch_s": round(statistics.median(r["wall_s"] - skip["wall_s"] for r, skip in pairs), 3),
                    # The target, pair by pair: run - (launch cost + slowest view) <= 0.
                    "over_target_s": round(
                        statistics.median(r["wall_s"] - skip["wall_s"] - r["slowest_view_s"] for r, skip in pairs), 3
                    ),
                    "runs": job_runs,
                    "runs_with_nothing_to_refresh": skipped[label, job],
                }
            results.setdefault("memory_mb", {})["project settings" if tuned else "Dagster defaults"] = {
                "idle": round(idle / 2**20),
                "peak": round(sampler.peak / 2**20),
            }
    return results
