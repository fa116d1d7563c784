"""Job runs submitted through the webserver and launched as the daemon launches them: the variants, each
run paired with the same run with nothing to refresh, and the Dagster processes' memory.

Each variant is a code location (bench/variants.py, or the project's own definitions) in a workspace.yaml
written for the session, so that a run's executor is the one its definitions fix, not a run-config choice.
"""

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
import yaml

from analytics_views.postgres.modes import RefreshMode
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.operations.services import dagster_services
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import libpq_url
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


def is_code_server(process: psutil.Process) -> bool:
    """A code server the webserver or the daemon started (`dagster api grpc` or `dagster code-server start`)."""
    command = " ".join(process.cmdline())
    return " api grpc" in command or " code-server start" in command


class MemorySampler:
    """Peak of the summed RSS of the Dagster processes (and all their children), sampled every 50 ms: over the
    whole session (`peak`), and while each label was set (the variant whose runs were going on): of all of them
    (`peaks`) and of the code servers' children (`run_peaks`: run workers and their step processes or
    forkserver), which other variants' code servers do not blur."""

    def __init__(self, processes: list[subprocess.Popen]):
        self.roots = [psutil.Process(p.pid) for p in processes]
        self.peak = 0
        self.label: str | None = None
        self.peaks: dict[str, int] = {}
        self.run_peaks: dict[str, int] = {}
        self._code_servers: dict[tuple[int, float], bool] = {}  # by (pid, start time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _members(self) -> list[psutil.Process]:
        members = []
        for root in self.roots:
            try:
                members += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return members

    def code_servers(self) -> list[psutil.Process]:
        servers = []
        for member in self._members():
            try:
                key = (member.pid, member.create_time())
                if key not in self._code_servers:
                    self._code_servers[key] = is_code_server(member)
            except psutil.Error:
                continue
            if self._code_servers[key]:
                servers.append(member)
        return servers

    def sizes(self) -> tuple[int, int]:
        """RSS of all the processes, and of the code servers' descendants (the runs' processes)."""
        rss: dict[int, int] = {}
        for member in self._members():
            try:
                rss[member.pid] = member.memory_info().rss
            except psutil.Error:
                pass
        runs: set[int] = set()
        for server in self.code_servers():
            try:
                runs.update(child.pid for child in server.children(recursive=True))
            except psutil.Error:
                pass
        return sum(rss.values()), sum(rss.get(pid, 0) for pid in runs)

    def current(self) -> int:
        return self.sizes()[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            label, (total, runs) = self.label, self.sizes()
            self.peak = max(self.peak, total)
            if label is not None:
                self.peaks[label] = max(self.peaks.get(label, 0), total)
                self.run_peaks[label] = max(self.run_peaks.get(label, 0), runs)
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


# The code locations the variants run in: name -> (module, attribute, how its jobs run their steps).
LOCATIONS = {
    "in_process": ("bench.variants", "in_process_defs", "in_process"),
    "multiprocess_spawn": ("bench.variants", "multiprocess_spawn_defs", "multiprocess (spawn, at most one per core)"),
    "multiprocess_forkserver": (
        "bench.variants",
        "multiprocess_forkserver_defs",
        "multiprocess (forkserver preloading bench.variants, max_concurrent 8)",
    ),
    "multi_asset": ("bench.variants", "multi_asset_defs", "in_process, one multi_asset step per cadence, 4 connections"),
    # Whatever executor the project's own definitions fix (project_executor names it).
    "project": ("analytics_views.definitions", "defs", None),
}


def write_workspace(path: Path, locations: list[str]) -> Path:
    """A workspace.yaml loading each location from its module (bench/ is found from the project's root)."""
    load_from = [
        {
            "python_module": {
                "module_name": LOCATIONS[location][0],
                "attribute": LOCATIONS[location][1],
                "location_name": location,
                "working_directory": str(PROJECT_ROOT),
            }
        }
        for location in locations
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"load_from": load_from}, sort_keys=False))
    return path


# The name of the repository a Definitions object becomes (Dagster's, not exported).
DEFINITIONS_REPOSITORY = "__repository__"


def run_job(client, location: str, job: str, force: bool = True) -> dict:
    """Submit a run of the location's job through the webserver and time it to SUCCESS. force: refresh every
    view (else a view whose sources did not change since its last refresh skips, which leaves the run's own
    cost)."""
    import dagster as dg

    started = time.perf_counter()
    run_id = client.submit_job_execution(
        job,
        repository_location_name=location,
        repository_name=DEFINITIONS_REPOSITORY,  # every location has jobs of the same names
        run_config=FORCE_REFRESH if force else None,
    )
    while (status := client.get_run_status(run_id)) not in (
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    ):
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if status != dg.DagsterRunStatus.SUCCESS:
        raise RuntimeError(f"{job} run {run_id} in {location} ended {status}")
    with dg.DagsterInstance.get() as instance:
        records = instance.get_records_for_run(run_id).records
        run = instance.get_run_record_by_id(run_id)
    materializations = [
        event.event_specific_data.materialization
        for record in records
        if (event := record.event_log_entry.dagster_event) and event.is_step_materialization
    ]
    refreshes = {m.asset_key.to_user_string(): m.metadata[keys.REFRESH_DURATION_S].value for m in materializations}
    modes = {m.asset_key.to_user_string(): m.metadata[keys.REFRESH_MODE].value for m in materializations}
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


# Variants whose steps each start a Python process take several times longer: they get at most this many pairs.
SPAWN_PAIRS = 3
VARIANTS = [
    # (label, tuned dagster.yaml, code location, most pairs)
    ("Dagster defaults (queue polled every 5 s, spawned step processes)", False, "multiprocess_spawn", SPAWN_PAIRS),
    ("project settings, multiprocess spawn (Dagster's default executor)", True, "multiprocess_spawn", SPAWN_PAIRS),
    ("project settings, in_process (steps one after another)", True, "in_process", None),
    ("project settings, multiprocess forkserver (preloaded, at most 8 at once)", True, "multiprocess_forkserver", None),
    ("project settings, one multi_asset per cadence (a pool of connections in one step)", True, "multi_asset", None),
    ("project settings, the project's definitions", True, "project", None),
]


def project_executor() -> str:
    """The executor the project's own jobs run with (a label; the project fixes it, the benchmark does not)."""
    from analytics_views.definitions import defs

    return defs.resolve_job_def("daily_refresh_job").executor_def.name


def measure_jobs(url: str, server_url: str, work_dir: Path, repeats: int) -> dict:
    from dagster_graphql import DagsterGraphQLClient

    jobs = {cadence: [v.name for v in load_views() if v.cadence == cadence] for cadence in ("daily", "weekly")}
    results: dict = {"old_way": {}, "variants": {}}
    for cadence, views in jobs.items():
        # The old service: one connection, each view refreshed CONCURRENTLY after the other.
        def old_way():
            with psycopg.connect(url, autocommit=True) as conn:
                for view in views:
                    conn.execute(refresh_sql(view, concurrently=True))

        results["old_way"][f"{cadence}_refresh_job"] = round(median_time(old_way, repeats), 3)

    executors = {location: executor for location, (_, _, executor) in LOCATIONS.items()}
    executors["project"] = project_executor()
    for tuned in (False, True):
        session = [
            (label + (f" (executor {executors['project']})" if location == "project" else ""), location, most_pairs)
            for label, variant_tuned, location, most_pairs in VARIANTS
            if variant_tuned == tuned
        ]
        locations = list(dict.fromkeys(location for _, location, _ in session))
        name = "tuned" if tuned else "default"
        with bench_database(server_url, "dagster") as dagster_url, ExitStack() as stack:
            home = dagster_home(work_dir / f"dagster_home_{name}", tuned)
            workspace = write_workspace(work_dir / f"workspace_{name}" / "workspace.yaml", locations)
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "DAGSTER_POSTGRES_URL": libpq_url(dagster_url),
                "DAGSTER_HOME": str(home),
                # Code servers, run workers and step processes import bench.variants from the project's root.
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            }
            previous = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL")}
            os.environ.update({k: env[k] for k in previous})
            stack.callback(lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                                    for k, v in previous.items()])
            port = free_port()
            log(
                f"starting dagster-webserver and dagster-daemon ({'project' if tuned else 'default'} settings;"
                f" code locations {', '.join(locations)})"
            )
            processes = stack.enter_context(
                dagster_services(env=env, port=port, log_dir=work_dir / f"logs_{name}", workspace=workspace)
            )
            client = DagsterGraphQLClient("127.0.0.1", port_number=port)
            time.sleep(3)  # let the daemon start its loops
            sampler = stack.enter_context(MemorySampler(processes))
            # Idle once the webserver and the daemon have each started a code server per location.
            deadline = time.monotonic() + 120
            while len(sampler.code_servers()) < 2 * len(locations) and time.monotonic() < deadline:
                time.sleep(0.5)
            idle = sampler.current()
            log(f"idle: {len(sampler.code_servers())} code servers, {idle / 2**20:.0f} MB in all")
            for label, location, _ in session:  # warm up: each code location's first run and imports
                sampler.label = label
                run_job(client, location, "weekly_refresh_job")
            runs: dict = {}
            skipped: dict = {}
            # Variants interleaved, so that other load on the machine hits them alike. Each run is paired with
            # the same run with nothing to refresh (every view skips: sources unchanged), whose wall time is the
            # run's launch cost, what Dagster costs around the refreshes. The two runs of a pair go in turns
            # (refresh first, then skip first), so that neither always follows the other.
            for repeat in range(repeats):
                for label, location, most_pairs in session:
                    if most_pairs is not None and repeat >= most_pairs:
                        continue
                    sampler.label = label
                    for cadence in jobs:
                        job = f"{cadence}_refresh_job"
                        pair = {}
                        for force in (True, False) if repeat % 2 == 0 else (False, True):
                            pair[force] = run_job(client, location, job, force=force)
                        if set(pair[False]["modes"].values()) != {RefreshMode.SKIPPED}:
                            raise RuntimeError(f"{job} refreshed views with unchanged sources: {pair[False]['modes']}")
                        runs.setdefault((label, job), []).append(pair[True])
                        skipped.setdefault((label, job), []).append(pair[False])
                        log(f"{label}: {job} {pair[True]['wall_s']} s, nothing to refresh {pair[False]['wall_s']} s")
            sampler.label = None
            locations_of = {label: location for label, location, _ in session}
            for (label, job), job_runs in runs.items():
                variant = results["variants"].setdefault(
                    label,
                    {"executor": executors[locations_of[label]], "code_location": locations_of[label], "jobs": {}},
                )
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
            # Idle: the session's webserver, daemon and their code servers (each starts one per location) before
            # any run; peak: the largest sum while the variant's runs (its warm-up included) were going on, code
            # servers and all; runs: of that, the code servers' children (run worker, its step processes).
            for label, _, _ in session:
                results.setdefault("memory_mb", {})[label] = {
                    "idle": round(idle / 2**20),
                    "peak": round(sampler.peaks.get(label, 0) / 2**20),
                    "runs_peak": round(sampler.run_peaks.get(label, 0) / 2**20),
                }
    return results
