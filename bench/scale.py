"""Scale mode: what a run costs at N views, against the floor (`python -m bench.run --views 10 100 500`).

For each N, on its own database: a source table of 200,000 rows and N small materialized views in schema `mv`
(each reads every source row and holds 1,000 rows, with a unique index; every fifth view reads the view
before it), adopted as a new user
would (a defs.yaml of `schemas: [mv]`, `analytics-views discover`), with Dagster's storage in PostgreSQL
(the project's dagster.yaml). Then, alternated, `repeats` times each:
- the floor: the same views refreshed one after another with REFRESH MATERIALIZED VIEW CONCURRENTLY over one
  psycopg connection, in dependency order;
- the tool: `analytics-views refresh --all --force`, timed from the command's start to its exit;
and, after them, the tool with every view skipped (`analytics-views refresh --all`, sources unchanged). Then the
same job submitted to a running webserver (`daily_refresh_job`, forced `repeats` times after one warm-up run, then
with every view skipped): the UI's and the schedules' way, whose code server has loaded the definitions already.
For each tool run it reads from Dagster's storage: launch to first refresh (the command's start to its run's
first STEP_START), event-log rows per view, and storage sessions (pg_stat_database.sessions of the storage
database, before and after the command: every process counts, the command's own too).

`--project DIR` runs the tool from another checkout of the project (its package first on PYTHONPATH, the
same virtualenv): the before/after figures of docs/benchmarks.md compare two trees this way.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import psycopg
from psycopg import sql

from analytics_views.postgres.modes import RefreshMode
from analytics_views.operations.services import dagster_services, prepare_dagster_home, wait_for_webserver
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.postgres.database import libpq_url
from bench.dagster_jobs import DEFINITIONS_REPOSITORY as REPOSITORY
from bench.dagster_jobs import FORCE_REFRESH, free_port
from bench.postgres_measures import bench_database
from bench.timing import log

SOURCE_ROWS = 200_000
SCHEMA = "mv"
READS_ANOTHER_EVERY = 5
COMMAND = Path(sys.executable).parent / "analytics-views"
PROJECT = Path(__file__).resolve().parent.parent
JOB, LOCATION = "daily_refresh_job", "analytics_views"  # adopted views are daily unless the defs.yaml says otherwise


def view_name(number: int) -> str:
    return f"v{number:04d}"


def build_schema(url: str, views: int) -> None:
    """The source table and `views` populated materialized views, each with its unique index."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.scale_source (id bigint PRIMARY KEY, k integer NOT NULL, v numeric NOT NULL);"
            f"INSERT INTO public.scale_source SELECT g, g % 1000, g % 97 FROM generate_series(1, {SOURCE_ROWS}) AS g;"
            f"CREATE SCHEMA {SCHEMA}"
        )
        for number in range(views):
            name = sql.Identifier(SCHEMA, view_name(number))
            if number % READS_ANOTHER_EVERY == READS_ANOTHER_EVERY - 1:
                query = sql.SQL("SELECT k, n + {} AS n, total FROM {}").format(
                    sql.Literal(number), sql.Identifier(SCHEMA, view_name(number - 1))
                )
            else:
                # Every source row read, 1,000 rows written: about 0.1 s a refresh, as in issue 27's schema.
                query = sql.SQL(
                    "SELECT k, count(*) AS n, sum(v * {}) AS total FROM public.scale_source GROUP BY k"
                ).format(sql.Literal(number % 7 + 1))
            conn.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS {}").format(name, query))
            conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (k)").format(name))
        conn.execute("VACUUM ANALYZE")


def floor(url: str, views: int) -> float:
    """The views refreshed one after another, CONCURRENTLY, over one connection (in dependency order)."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for number in range(views):
            conn.execute(
                sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.Identifier(SCHEMA, view_name(number)))
            )
        return time.perf_counter() - started


def storage_sessions(storage_url: str) -> int:
    with psycopg.connect(storage_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


# What the `analytics-views` console script runs (`run`; `main` in checkouts older than it), from the checkout's own
# folder: `python -c` puts the working directory first on sys.path.
_CONSOLE_SCRIPT = (
    "import sys, analytics_views.operations.cli as cli; run = getattr(cli, 'run', None); "
    "run() if run else sys.exit(cli.main())"
)


class Tool:
    """`analytics-views refresh` against one N's database, instance and defs.yaml."""

    def __init__(self, url: str, storage_url: str, work_dir: Path, project: Path | None):
        self.url, self.storage_url = url, storage_url
        # The instance settings of the checkout that runs (its storage's pooling is part of what is compared).
        self.home = prepare_dagster_home(work_dir / "dagster_home", (project or PROJECT) / "deploy" / "dagster.yaml")
        defs_yaml = work_dir / "defs" / "defs.yaml"
        defs_yaml.parent.mkdir(parents=True)
        defs_yaml.write_text(f"type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [{SCHEMA}]\n")
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_POSTGRES_URL": storage_url,
            "ANALYTICS_VIEWS_DEFS": str(defs_yaml),
        }
        os.environ["DAGSTER_POSTGRES_URL"] = storage_url  # what the instance's dagster.yaml reads, here too
        self.cwd = project or PROJECT
        if project is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))

    def command(self, *args: str, timeout_s: float = 7200) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _CONSOLE_SCRIPT, *args],
            env=self.env,
            cwd=self.cwd,  # `python -c` puts the working directory first on sys.path: the project's own folder
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def refresh(self, *args: str) -> dict:
        """One `refresh --all` (plus `args`), timed, with what Dagster's storage recorded of its run."""
        sessions_before = storage_sessions(self.storage_url)
        started_at = time.time()
        started = time.perf_counter()
        result = self.command("refresh", "--all", *args)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"refresh failed ({result.returncode}): {result.stderr[-2000:]} {result.stdout[-2000:]}")
        time.sleep(1.5)  # ended sessions report to the statistics when they exit
        outcomes = [line.split(": ", 1)[1].split(" ", 1)[0] for line in result.stdout.splitlines() if ": " in line]
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            runs = [
                record.dagster_run
                for record in instance.get_run_records(limit=20)
                if record.create_timestamp.timestamp() >= started_at - 1
            ]
            # When each stage was first reached, from the command's start: the run created (its planned events
            # written), its worker started, its first step started (the first refresh), its last event.
            stages = {"created": [], "RUN_START": [], "STEP_START": [], "ended": []}
            for run in runs:
                records = instance.get_records_for_run(run.run_id).records
                if records:
                    stages["created"].append(records[0].timestamp)
                    stages["ended"].append(records[-1].timestamp)
                for record in records:
                    kind = record.event_log_entry.dagster_event_type
                    if kind in (dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_START):
                        stages[kind.name].append(record.timestamp)
            timeline = {stage: round(min(times) - started_at, 2) if stage != "ended" and times else
                        round(max(times) - started_at, 2) if times else None for stage, times in stages.items()}
            first_step = min(stages["STEP_START"], default=None)
        with psycopg.connect(self.storage_url) as conn:
            rows = conn.execute(
                "SELECT count(*) FROM event_logs WHERE run_id = ANY(%s)", [[run.run_id for run in runs]]
            ).fetchone()[0]
        return {
            "wall_s": round(wall, 2),
            "first_refresh_s": round(first_step - started_at, 2) if first_step else None,
            "event_rows": rows,
            "storage_sessions": storage_sessions(self.storage_url) - sessions_before,
            "runs": len(runs),
            "timeline_s": timeline,
            "refreshed": outcomes.count("refreshed"),
            "skipped": outcomes.count("skipped"),
            "load_average": round(os.getloadavg()[0], 2),
        }


def measure(server_url: str, views: int, repeats: int, project: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"av-scale-{views}-") as tmp, bench_database(
        server_url, f"scale{views}"
    ) as url, bench_database(server_url, f"scale{views}_dagster") as storage_url:
        log(f"N={views}: building {views} views over {SOURCE_ROWS} source rows")
        build_schema(url, views)
        tool = Tool(url, libpq_url(storage_url), Path(tmp), project)
        discovered = tool.command("discover")
        if discovered.returncode != 0:
            raise RuntimeError(f"discover failed: {discovered.stderr[-2000:]}")
        floors, runs = [], []
        for turn in range(repeats):
            # Alternated, floor first then tool first, so that the machine's other load hits both alike.
            order = ("floor", "tool") if turn % 2 == 0 else ("tool", "floor")
            for which in order:
                if which == "floor":
                    floors.append(round(floor(url, views), 2))
                    log(f"N={views}: floor {floors[-1]} s (load {os.getloadavg()[0]:.2f})")
                else:
                    runs.append(tool.refresh("--force"))
                    log(f"N={views}: refresh --all --force {runs[-1]}")
        skipped = tool.refresh()
        log(f"N={views}: refresh --all, sources unchanged: {skipped}")
        ui = through_webserver(tool, Path(tmp), repeats)
        log(f"N={views}: through a running webserver (the UI's and the schedules' way): {ui}")
    floor_s = statistics.median(floors)
    wall_s = statistics.median(run["wall_s"] for run in runs)
    return {
        "views": views,
        "floor_s": floors,
        "forced": runs,
        "skipped": skipped,
        "floor_median_s": floor_s,
        "forced_median_s": wall_s,
        "target_s": round(floor_s * 1.2 + 10, 2),
        "overhead_per_view_s": round((wall_s - floor_s) / views, 3),
        "first_refresh_median_s": statistics.median(run["first_refresh_s"] or 0 for run in runs),
        "event_rows_per_view": round(statistics.median(run["event_rows"] for run in runs) / views, 1),
        "storage_sessions_median": statistics.median(run["storage_sessions"] for run in runs),
        "skipped_target_s": round(10 + 0.02 * views, 2),
        "webserver": ui,
    }


def _timed_submission(client, instance_home: Path, force: bool) -> dict:
    """One run of the job submitted to the webserver (as the UI's Materialize all does), timed from the
    submission: its first refresh, its end, and how many views it skipped."""
    started_at = time.time()
    run_id = client.submit_job_execution(
        JOB, repository_location_name=LOCATION, repository_name=REPOSITORY, run_config=FORCE_REFRESH if force else None
    )
    while client.get_run_status(run_id) not in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):
        time.sleep(0.1)
    with dg.DagsterInstance.from_config(str(instance_home)) as instance:
        records = instance.get_records_for_run(run_id).records
        run = instance.get_run_by_id(run_id)
    if run.status != dg.DagsterRunStatus.SUCCESS:
        raise RuntimeError(f"{JOB} run {run_id} through the webserver ended {run.status}")
    starts = [r.timestamp for r in records if r.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_START]
    modes = [
        r.event_log_entry.dagster_event.event_specific_data.materialization.metadata[keys.REFRESH_MODE].value
        for r in records
        if r.event_log_entry.dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
    ]
    return {
        "wall_s": round(records[-1].timestamp - started_at, 2),
        "first_refresh_s": round(min(starts) - started_at, 2),
        "skipped": sum(mode == RefreshMode.SKIPPED for mode in modes),
        "load_average": round(os.getloadavg()[0], 2),
    }


def through_webserver(tool: Tool, work_dir: Path, repeats: int) -> dict:
    """The job submitted to a running webserver, whose code server has loaded the definitions already: what
    the UI's and the daemon's schedules' runs cost (the CLI adds its own start and a code server's)."""
    from dagster_graphql import DagsterGraphQLClient

    port = free_port()
    workspace = tool.cwd / "workspace.yaml"
    with dagster_services(env=tool.env, port=port, log_dir=work_dir / "services", workspace=workspace) as processes:
        wait_for_webserver("127.0.0.1", port, processes, timeout_s=300)
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        _timed_submission(client, tool.home, force=True)  # the code server loads the definitions
        forced = [_timed_submission(client, tool.home, force=True) for _ in range(repeats)]
        skipped = _timed_submission(client, tool.home, force=False)
    return {
        "forced": forced,
        "skipped": skipped,
        "forced_median_s": statistics.median(run["wall_s"] for run in forced),
        "first_refresh_median_s": statistics.median(run["first_refresh_s"] for run in forced),
    }


def report(results: list[dict]) -> str:
    lines = [
        "| N views | floor (one connection, sequential) | `refresh --all --force` | per view over the floor | target (floor x 1.2 + 10 s) "
        "| launch to first refresh | all skipped (target) | event-log rows per view | storage sessions per run "
        "| webserver: forced, first refresh, all skipped | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        loads = [run["load_average"] for run in r["forced"]] + [r["skipped"]["load_average"]]
        ui = r.get("webserver")  # measured since the storage was pooled
        ui_cell = (
            f"{ui['forced_median_s']:.1f} s, {ui['first_refresh_median_s']:.1f} s, {ui['skipped']['wall_s']:.1f} s"
            if ui else "not measured"
        )
        lines.append(
            f"| {r['views']} | {r['floor_median_s']:.1f} s | {r['forced_median_s']:.1f} s | {r['overhead_per_view_s'] * 1000:.0f} ms "
            f"| {r['target_s']:.1f} s | {r['first_refresh_median_s']:.1f} s | {r['skipped']['wall_s']:.1f} s ({r['skipped_target_s']:.1f} s) "
            f"| {r['event_rows_per_view']} | {r['storage_sessions_median']:.0f} | {ui_cell} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines)


def comparison(after: list[dict], before: list[dict]) -> str:
    """Before and after side by side, N by N (the tables of docs/benchmarks.md, *Scale*)."""

    def loads(size: dict) -> str:
        values = [run["load_average"] for run in size["forced"]] + [size["skipped"]["load_average"]]
        return f"{min(values):.1f}-{max(values):.1f}"

    lines = [
        "| N views | | floor | `refresh --all --force` | per view over the floor | launch to first refresh | all skipped | "
        "event-log rows per view | storage sessions per run | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_views = {size["views"]: size for size in before}
    for size in after:
        for label, figures in (("before", by_views.get(size["views"])), ("after", size)):
            if figures is None:
                continue
            lines.append(
                f"| {size['views']} | {label} | {figures['floor_median_s']:.1f} s | {figures['forced_median_s']:.1f} s "
                f"| {figures['overhead_per_view_s'] * 1000:.0f} ms | {figures['first_refresh_median_s']:.1f} s "
                f"| {figures['skipped']['wall_s']:.1f} s | {figures['event_rows_per_view']} | {figures['storage_sessions_median']:.0f} "
                f"| {loads(figures)} |"
            )
    return "\n".join(lines)
