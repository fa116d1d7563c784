"""The refresh benchmark: how close each view's refresh is to what PostgreSQL cannot do faster.

    .venv/bin/python -m bench.run --size small        # a quick look (under a minute or two)
    .venv/bin/python -m bench.run --size reference    # 200k users, ~10M events, 730 days (15 to 40 min)

It creates its own databases (on an embedded PostgreSQL 18 it starts, or on --server), generates the
demo data with the project's generator plus one large users x days view of its own
(bench/user_day_activity.sql), and measures, for every view:
- the floor: the view's query alone (EXPLAIN ANALYZE, rows discarded in the server) and a plain read of
  the source rows inside the view's window (the cheapest possible pass over what the view must read);
- a plain REFRESH, REFRESH ... CONCURRENTLY, build-and-swap (analytics_views/swap.py), and the asset's
  materialization in process (strategy `auto`, as the jobs run it);
- readers' latency (median, p99, max) of a query on the view while each kind of refresh runs;
- plain refreshes on two fresh copies of the database, one with twice the history before every window, by turns;
and for each job, the wall time of a run submitted through the webserver and launched by the daemon
(Dagster's default settings against the project's), against the old service's way (one connection,
views refreshed one after another), and the peak memory of the Dagster processes.

It prints a table, writes bench/results/<size>.json (.txt, .md) and docs/benchmark-<size>.png, drops its databases
and stops every server and process it started.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from analytics_views.postgres.database import libpq_url, with_database
from analytics_views.postgres.embedded import embedded_server
from analytics_views.operations.migrate import migrate
from analytics_views.postgres.refresh import SKIPPED, RefreshSettings, refresh_view
from analytics_views.operations.seed import seed
from analytics_views.sql_files.views import ViewDefinition, load_views, parse_view_file

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = PROJECT_ROOT / "docs"
BENCH_VIEW = parse_view_file(BENCH_DIR / "user_day_activity.sql")

SIZES = {
    "small": {"users": 5_000, "days": 730, "repeats": 5, "job_repeats": 2},
    "reference": {"users": 200_000, "days": 730, "repeats": 5, "job_repeats": 6},
}

# Window bounds, exactly as the views write them.
TODAY = "((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'"
DAYS_AGO = "((now() AT TIME ZONE 'UTC')::date - {n})::timestamp AT TIME ZONE 'UTC'"
WEEK = "date_trunc('week', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
WEEKS_AGO = "(date_trunc('week', now() AT TIME ZONE 'UTC') - interval '{n} weeks') AT TIME ZONE 'UTC'"
# One plain read of each source's rows inside a window, through the same indexes the views use.
READS = {
    "events": "SELECT count(e.user_id) FROM events AS e WHERE e.occurred_at >= {start} AND e.occurred_at < {end}",
    "users": "SELECT count(u.campaign_id) FROM users AS u WHERE u.signed_up_at >= {start} AND u.signed_up_at < {end}",
    "payments": "SELECT sum(p.amount) FROM payments AS p WHERE p.paid_at >= {start} AND p.paid_at < {end}",
    "campaign_spend": (
        "SELECT sum(cs.amount) FROM campaign_spend AS cs"
        " WHERE cs.spend_date >= ({start})::date AND cs.spend_date < ({end})::date"
    ),
}
D90 = (DAYS_AGO.format(n=90), TODAY)
WINDOW_READS = {
    "daily_aggregations": {"events": D90, "users": D90, "payments": D90},
    "cohort_aggregations": {"users": D90, "events": D90, "payments": D90},
    "campaign_aggregations": {"users": D90, "campaign_spend": D90, "payments": D90},
    "weekly_aggregations": {
        "events": (WEEKS_AGO.format(n=53), WEEK),
        "users": (WEEKS_AGO.format(n=52), WEEK),
        "payments": (WEEKS_AGO.format(n=52), WEEK),
    },
    BENCH_VIEW.name: {"events": (DAYS_AGO.format(n=365), TODAY)},
}

# Rows a view must read beyond its windows: campaign_aggregations attributes each payment of its window to the
# payer's campaign, which no payment row carries, so it also reads those payers in users. The floor plus this
# lookup (one sorted pass over users_payer_campaign_idx) is reported beside the floor, for that view only.
LOOKUP_READS = {
    "campaign_aggregations": (
        "SELECT count(u.campaign_id) FROM users AS u WHERE u.user_id = ANY(ARRAY("
        "SELECT DISTINCT p.user_id FROM payments AS p WHERE p.paid_at >= {start} AND p.paid_at < {end}))",
        D90,
    ),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


DOUBLING_REPEATS = 9  # pairs of runs, one on each copy of the database (measure_doubling)
# Short actions are repeated until they have run this long in all, so that one stall of the shared machine
# does not move their median (at most MAX_REPEATS times).
MIN_TOTAL_S = 3.0
MAX_REPEATS = 41


def enough(times: list[float], repeats: int) -> bool:
    return len(times) >= MAX_REPEATS or (len(times) >= repeats and sum(times) >= MIN_TOTAL_S)


def median_time(action: Callable[[], object], repeats: int) -> float:
    """The median of at least `repeats` runs, more for short actions (MIN_TOTAL_S)."""
    times: list[float] = []
    while not enough(times, repeats):
        times.append(timed(action))
    return statistics.median(times)


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def refresh_sql(view: str, concurrently: bool = False) -> sql.Composed:
    """REFRESH MATERIALIZED VIEW [CONCURRENTLY] <view>, as the old service and PostgreSQL alone run it."""
    return sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(sql.SQL("CONCURRENTLY " if concurrently else ""), ident(view))


# --- databases --------------------------------------------------------------------------------------


@contextmanager
def bench_server(server: str | None, work_dir: Path) -> Iterator[str]:
    if server:
        yield server
        return
    with embedded_server(work_dir / "pgdata") as url:
        yield url


@contextmanager
def bench_database(server_url: str, label: str, copy_of: str | None = None) -> Iterator[str]:
    """A new database on the server, or a file copy of the (idle) database at URL copy_of; dropped on exit."""
    name = f"av_bench_{label}_{uuid.uuid4().hex[:8]}"
    create = sql.SQL("CREATE DATABASE {}").format(ident(name))
    if copy_of:
        template = conninfo_to_dict(copy_of)["dbname"]
        create += sql.SQL(" TEMPLATE {} STRATEGY FILE_COPY").format(ident(template))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(name)))


def server_facts(conn: psycopg.Connection) -> dict:
    settings = ("server_version", "shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit")
    return {name: conn.execute(sql.SQL("SHOW {}").format(ident(name))).fetchone()[0] for name in settings}


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        table: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(table))).fetchone()[0]
        for table in ("users", "events", "payments", "campaign_spend")
    }


def create_bench_view(conn: psycopg.Connection) -> None:
    conn.execute(BENCH_VIEW.sql)


def double_history(conn: psycopg.Connection, days: int) -> None:
    """Copy every source row `days` days further back (new user ids): twice the history, the same windows."""
    shift = f"{days} days"
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # skip FK triggers: ids are consistent
        offset = conn.execute("SELECT max(user_id) FROM users").fetchone()[0]
        conn.execute(
            "INSERT INTO users (user_id, signed_up_at, campaign_id, country, plan)"
            " SELECT user_id + %s, signed_up_at - %s::interval, campaign_id, country, plan FROM users",
            [offset, shift],
        )
        conn.execute(
            "INSERT INTO events (user_id, event_type, occurred_at)"
            " SELECT user_id + %s, event_type, occurred_at - %s::interval FROM events ORDER BY occurred_at",
            [offset, shift],
        )
        conn.execute(
            "INSERT INTO payments (user_id, amount, paid_at)"
            " SELECT user_id + %s, amount, paid_at - %s::interval FROM payments ORDER BY paid_at",
            [offset, shift],
        )
        conn.execute(
            "INSERT INTO campaign_spend (campaign_id, spend_date, amount)"
            " SELECT campaign_id, spend_date - %s, amount FROM campaign_spend",
            [days],
        )
    conn.execute("VACUUM ANALYZE users, events, payments, campaign_spend")


def run(conn: psycopg.Connection, statement) -> None:
    """Execute a statement and fetch whatever rows it returns."""
    cursor = conn.execute(statement)
    if cursor.description:
        cursor.fetchall()


def alternated(first: psycopg.Connection, second: psycopg.Connection, statement, repeats: int) -> tuple[float, float]:
    """Medians of the statement run on two databases by turns (first-second, then second-first, and so on), so
    that the machine's load and whatever the previous run left warm favour neither."""
    times: tuple[list[float], list[float]] = ([], [])
    while not enough(times[0], repeats):
        pair = list(zip((first, second), times))
        for conn, spent in pair if len(times[0]) % 2 == 0 else reversed(pair):
            spent.append(timed(lambda: run(conn, statement)))
    return statistics.median(times[0]), statistics.median(times[1])


def measure_doubling(server_url: str, url: str, views: list[ViewDefinition], days: int) -> tuple[dict, dict]:
    """Each view's plain refresh and window read on two copies of the database, one of them with twice the history
    before every window, the two run by turns; plus the blocks each query touches (not noisy). Both are fresh
    copies, vacuumed and analyzed, so that nothing the other measurements left behind favours either."""
    results = {}
    with ExitStack() as stack:
        same_url, doubled_url = (
            stack.enter_context(bench_database(server_url, label, copy_of=url)) for label in ("same", "doubled")
        )
        with psycopg.connect(doubled_url, autocommit=True) as conn:
            double_history(conn, days)  # ends with VACUUM ANALYZE
            counts = table_counts(conn)
        before = stack.enter_context(psycopg.connect(same_url, autocommit=True))
        after = stack.enter_context(psycopg.connect(doubled_url, autocommit=True))
        before.execute("VACUUM ANALYZE")
        for view in views:
            log(f"measuring {view.name} on both databases by turns")
            plain_before, plain = alternated(before, after, refresh_sql(view.name), DOUBLING_REPEATS)
            read_before, read = alternated(before, after, window_read_sql(view.name), DOUBLING_REPEATS)
            results[view.name] = {
                "plain_before_s": round(plain_before, 4),
                "plain_s": round(plain, 4),
                "window_read_before_s": round(read_before, 4),
                "window_read_s": round(read, 4),
                "plain_change_pct": round(100 * (plain / plain_before - 1), 1),
                "window_read_change_pct": round(100 * (read / read_before - 1), 1),
                # Not noisy: the 8 kB blocks the view's query touches (shared hits + reads).
                "query_blocks_before": blocks_touched(before, view_query(before, view.name)),
                "query_blocks": blocks_touched(after, view_query(after, view.name)),
            }
    return counts, results


# --- readers ----------------------------------------------------------------------------------------


@dataclass
class Readers:
    """A reader querying the view back to back (10 ms apart) on its own connection; latencies in seconds."""

    url: str
    view: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = sql.SQL("SELECT * FROM {} ORDER BY 1 DESC LIMIT 10").format(ident(self.view))
        with psycopg.connect(self.url, autocommit=True, application_name="analytics-views bench reader") as conn:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    conn.execute(query).fetchall()
                except psycopg.Error as error:
                    self.errors.append(str(error).splitlines()[0])
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.01)

    def __enter__(self) -> "Readers":
        self._thread.start()
        time.sleep(0.2)  # a few reads before the refresh starts
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return {
            "queries": len(ordered),
            "median_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2),
            "errors": self.errors[:3],
        }


# --- per view ---------------------------------------------------------------------------------------


def window_read_sql(view: str, with_lookups: bool = False) -> sql.Composed:
    reads = [READS[table].format(start=start, end=end) for table, (start, end) in WINDOW_READS[view].items()]
    if with_lookups:
        lookup, (start, end) = LOOKUP_READS[view]
        reads.append(lookup.format(start=start, end=end))
    return sql.SQL("SELECT ") + sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(read)) for read in reads)


def blocks_touched(conn: psycopg.Connection, query: str) -> int:
    """The 8 kB blocks a query touches (shared buffer hits and reads), from EXPLAIN (ANALYZE, BUFFERS)."""
    explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) {}").format(sql.SQL(query))
    plan = conn.execute(explain).fetchone()[0][0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def view_query(conn: psycopg.Connection, view: str) -> str:
    return conn.execute("SELECT pg_get_viewdef(%s::regclass)", [view]).fetchone()[0].rstrip().rstrip(";")


def materialize_asset(url: str, view: ViewDefinition, instance=None) -> tuple[float, dict]:
    """One in-process materialization; a fresh instance (no last fingerprint, so never a skip) unless given."""
    import dagster as dg

    from analytics_views.orchestration.assets import view_asset
    from analytics_views.orchestration.resources import AnalyticsDatabase

    with ExitStack() as stack:
        instance = instance or stack.enter_context(dg.DagsterInstance.ephemeral())
        started = time.perf_counter()
        result = dg.materialize(
            [view_asset(view)], resources={"analytics_db": AnalyticsDatabase(url=url)}, instance=instance
        )
        wall = time.perf_counter() - started
    [event] = result.asset_materializations_for_node(view.name)
    metadata = {key: value.value for key, value in event.metadata.items()}
    return wall, {"mode": metadata["refresh_mode"], "refresh_s": metadata["refresh_duration_s"]}


def measure_refreshes(url: str, conn: psycopg.Connection, view: ViewDefinition, repeats: int) -> dict:
    query = sql.SQL("EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF) {}").format(sql.SQL(view_query(conn, view.name)))
    plain = refresh_sql(view.name)
    concurrent = refresh_sql(view.name, concurrently=True)
    actions = {
        "plain": lambda: conn.execute(plain),
        "concurrent": lambda: conn.execute(concurrent),
        "swap": lambda: refresh_view(conn, view.name, strategy="swap"),
    }
    times = {
        "query": median_time(lambda: conn.execute(query).fetchall(), repeats),
        "window_read": median_time(lambda: conn.execute(window_read_sql(view.name)).fetchall(), repeats),
    }
    if view.name in LOOKUP_READS:
        with_lookups = window_read_sql(view.name, with_lookups=True)
        times["window_read_and_lookups"] = median_time(lambda: conn.execute(with_lookups).fetchall(), repeats)
    readers = {}
    for kind, action in actions.items():
        times[kind] = median_time(action, repeats)
        with Readers(url, view.name) as reading:
            action()
        readers[kind] = reading.summary()
    with Readers(url, view.name) as reading:
        time.sleep(0.5)
    readers["none"] = reading.summary()
    return {"times_s": {k: round(v, 4) for k, v in times.items()}, "readers": readers}


def measure_assets(url: str, views: list[ViewDefinition], repeats: int) -> dict:
    """Each view's asset against its raw REFRESH ... CONCURRENTLY, alternated so that both meet the same load."""
    materialize_asset(url, views[0])  # warm up: imports and Dagster's first-run costs
    results = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for view in views:
            concurrent = refresh_sql(view.name, concurrently=True)
            raw, runs = [], []
            while not enough(raw, repeats):
                raw.append(timed(lambda: conn.execute(concurrent)))
                runs.append(materialize_asset(url, view))
            wall, raw_median = statistics.median(wall for wall, _ in runs), statistics.median(raw)
            results[view.name] = {
                "wall_s": round(wall, 4),
                "refresh_s": round(statistics.median(meta["refresh_s"] for _, meta in runs), 4),
                "mode": runs[-1][1]["mode"],
                "concurrent_alongside_s": round(raw_median, 4),  # the raw refresh, alternated with the asset
                "overhead_s": round(wall - raw_median, 4),
                "allowed_overhead_s": round(0.05 * raw_median + 0.3, 4),  # the target: at most 5% + 0.3 s
            }
    return results


def measure_skips(url: str, views: list[ViewDefinition]) -> dict:
    """Each view's asset when no source changed since its last refresh (a skip), then after a write to its
    sources outside every window (the rows stay the same, but a change is a change: it refreshes)."""
    import dagster as dg

    results = {}
    with dg.DagsterInstance.ephemeral() as instance:
        for view in views:
            materialize_asset(url, view, instance)  # the last refresh, which records the fingerprint
        unchanged = {view.name: materialize_asset(url, view, instance) for view in views}
        written = ("events", "payments")  # between them, a source of every view
        counts = "SELECT sum(n_tup_ins) FROM pg_stat_all_tables WHERE relname = ANY(%s)"
        with psycopg.connect(url, autocommit=True) as conn:
            before = conn.execute(counts, [list(written)]).fetchone()[0]
            conn.execute(
                "INSERT INTO events (user_id, event_type, occurred_at)"
                " SELECT user_id, 'bench_write', now() - interval '800 days' FROM users LIMIT 1"
            )
            conn.execute(
                "INSERT INTO payments (user_id, amount, paid_at)"
                " SELECT user_id, 1, now() - interval '800 days' FROM users LIMIT 1"
            )
        with psycopg.connect(url, autocommit=True) as conn:  # the writer's counts are reported when it ends
            while conn.execute(counts, [list(written)]).fetchone()[0] < before + len(written):
                time.sleep(0.05)
        changed = {view.name: materialize_asset(url, view, instance) for view in views}
    for view in views:
        (skip_wall, skip), (change_wall, change) = unchanged[view.name], changed[view.name]
        results[view.name] = {
            "unchanged": {"wall_s": round(skip_wall, 4), "mode": skip["mode"]},
            "after_a_source_write": {"wall_s": round(change_wall, 4), "mode": change["mode"]},
        }
    return results


# --- jobs through the daemon ------------------------------------------------------------------------

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


# --- report -----------------------------------------------------------------------------------------


def ratio(value: float, floor: float) -> float:
    return round(value / floor, 2) if floor > 0 else float("nan")


def report(results: dict) -> str:
    lines = [
        f"size {results['size']}: {results['counts']}; PostgreSQL {results['server']['server_version']}, "
        f"{results['machine']['cpus']} cores, load average {results['machine'].get('load_average', '?')} at the start",
        "",
        "view                   rows     query  window  plain  concur  swap   asset  | x window: plain concur swap asset"
        " | readers p99/max ms: plain, concurrent, swap | 2x history plain",
    ]
    skipped_lines = ["", "asset materialization when no source changed since the last refresh, then after a write:"]
    for name, view in results["views"].items():
        t = view["times_s"]
        floor = t["window_read"]
        asset = results["assets"][name]
        if name in results.get("skips", {}):
            skip = results["skips"][name]
            skipped_lines.append(
                f"{name:22s} unchanged: {skip['unchanged']['mode']} in {skip['unchanged']['wall_s']:.3f} s;"
                f" after a source write: {skip['after_a_source_write']['mode']}"
                f" in {skip['after_a_source_write']['wall_s']:.3f} s (concurrent refresh alone {t['concurrent']:.3f} s)"
            )
        r = view["readers"]
        doubled = results.get("doubled_history", {}).get(name, {})
        lines.append(
            f"{name:22s} {view['rows']:>8} {t['query']:6.3f} {floor:6.3f} {t['plain']:6.3f} {t['concurrent']:6.3f} "
            f"{t['swap']:6.3f} {asset['wall_s']:6.3f} | {ratio(t['plain'], floor):6} {ratio(t['concurrent'], floor):6} "
            f"{ratio(t['swap'], floor):5} {ratio(asset['wall_s'], floor):5} | "
            + ", ".join(f"{r[k]['p99_ms']:.0f}/{r[k]['max_ms']:.0f}" for k in ("plain", "concurrent", "swap"))
            + (f" | {doubled.get('plain_change_pct', float('nan')):+.1f}%" if doubled else "")
            + (f", blocks {doubled['query_blocks_before']} -> {doubled['query_blocks']}" if "query_blocks" in doubled else "")
        )
    for name, view in results["views"].items():
        t = view["times_s"]
        if "window_read_and_lookups" in t:
            lines.append(
                f"{name:22s} window read and the lookups it cannot avoid {t['window_read_and_lookups']:.3f} s:"
                f" CONCURRENTLY {ratio(t['concurrent'], t['window_read_and_lookups'])}x that"
            )
    lines += ["", "asset materialization in process against REFRESH CONCURRENTLY, the two alternated (medians):"]
    for name, asset in results["assets"].items():
        lines.append(
            f"{name:22s} asset {asset['wall_s']:.3f} s ({asset['mode']}), CONCURRENTLY {asset['concurrent_alongside_s']:.3f} s:"
            f" overhead {asset['overhead_s']:+.3f} s, allowed {asset['allowed_overhead_s']:.3f} s (5% + 0.3 s)"
        )
    if len(skipped_lines) > 2:
        lines += skipped_lines
    jobs = results.get("jobs")
    if jobs:
        lines += ["", "job wall times (submit -> SUCCESS, median):"]
        for job, old in jobs["old_way"].items():
            lines.append(f"  {job}: old way (one connection, one view after another) {old:.3f} s")
            for label, variant in jobs["variants"].items():
                j = variant["jobs"][job]
                lines.append(
                    f"    {label:60s} {j['wall_s']:6.2f} s, launch cost {j['launch_cost_s']:.2f} s;"
                    f" pair by pair {j['beyond_launch_s']:+.2f} s over it,"
                    f" slowest view {j['slowest_view_s']:.3f} s:"
                    f" {j['over_target_s']:+.2f} s over the target (all views {j['sum_of_views_s']:.3f} s;"
                    f" queued {j['submit_to_worker_start_s']:.2f} s)"
                )
        lines.append(f"  memory (sum of RSS of webserver, daemon and children, MB): {jobs['memory_mb']}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The figures as Markdown tables, for docs/benchmarks.md."""
    out = [
        "| view | rows | window read (floor) | query alone | plain REFRESH | CONCURRENTLY | build-and-swap "
        "| asset (mode) | x floor: plain / concurrent / swap / asset | readers p99 / max ms: none, plain, "
        "concurrent, swap | 2x history: plain, window read |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for name, view in results["views"].items():
        t, r, asset = view["times_s"], view["readers"], results["assets"][name]
        floor = t["window_read"]
        doubled = results.get("doubled_history", {}).get(name)
        out.append(
            f"| `{name}` | {view['rows']:,} | {floor:.3f} s | {t['query']:.3f} s | {t['plain']:.3f} s "
            f"| {t['concurrent']:.3f} s | {t['swap']:.3f} s | {asset['wall_s']:.3f} s ({asset['mode']}) "
            f"| {ratio(t['plain'], floor)} / {ratio(t['concurrent'], floor)} / {ratio(t['swap'], floor)} "
            f"/ {ratio(asset['wall_s'], floor)} | "
            + ", ".join(f"{r[k]['p99_ms']:.0f} / {r[k]['max_ms']:.0f}" for k in ("none", "plain", "concurrent", "swap"))
            + (f" | {doubled['plain_change_pct']:+.0f}%, {doubled['window_read_change_pct']:+.0f}% |" if doubled else " | |")
        )
    lookups = {name: v["times_s"] for name, v in results["views"].items() if "window_read_and_lookups" in v["times_s"]}
    if lookups:
        out += ["", "| view | window read | window read and the lookups it cannot avoid | CONCURRENTLY | x each |",
                "|---|---:|---:|---:|---|"]
        out += [
            f"| `{name}` | {t['window_read']:.3f} s | {t['window_read_and_lookups']:.3f} s | {t['concurrent']:.3f} s "
            f"| {ratio(t['concurrent'], t['window_read'])} / {ratio(t['concurrent'], t['window_read_and_lookups'])} |"
            for name, t in lookups.items()
        ]
    out += [
        "",
        "| view | asset (in process) | CONCURRENTLY, alternated with it | overhead | allowed (5% + 0.3 s) |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| `{name}` | {a['wall_s']:.3f} s ({a['mode']}) | {a['concurrent_alongside_s']:.3f} s "
        f"| {a['overhead_s']:+.3f} s | {a['allowed_overhead_s']:.3f} s |"
        for name, a in results["assets"].items()
    ]
    jobs = results.get("jobs")
    if jobs:
        out += [
            "",
            "| job | way | runs | wall (submit -> SUCCESS) | launch cost (run with nothing to refresh) "
            "| run - launch cost, pair by pair | slowest view | over the target (pair by pair) | all views "
            "| queued (until the run worker starts) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for job, old in jobs["old_way"].items():
            out.append(f"| `{job}` | old way: one connection, views one after another | | {old:.2f} s | | | | | | |")
            for label, variant in jobs["variants"].items():
                j = variant["jobs"][job]
                out.append(
                    f"| `{job}` | {label} | {len(j['runs'])} | {j['wall_s']:.2f} s | {j['launch_cost_s']:.2f} s "
                    f"| {j['beyond_launch_s']:.2f} s | {j['slowest_view_s']:.2f} s | {j['over_target_s']:+.2f} s "
                    f"| {j['sum_of_views_s']:.2f} s | {j['submit_to_worker_start_s']:.2f} s |"
                )
        out += ["", "| Dagster processes (sum of RSS, MB) | idle | peak during runs |", "|---|---:|---:|"]
        out += [f"| {label} | {m['idle']} | {m['peak']} |" for label, m in jobs["memory_mb"].items()]
    return "\n".join(out)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["views"])
    kinds = [("window_read", "window read (floor)"), ("query", "query alone"), ("plain", "REFRESH"),
             ("concurrent", "REFRESH CONCURRENTLY"), ("swap", "build-and-swap"), ("asset", "asset (auto)")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(kinds)
    for i, (key, label) in enumerate(kinds):
        values = [
            results["assets"][n]["wall_s"] if key == "asset" else results["views"][n]["times_s"][key] for n in names
        ]
        left.bar([x + i * width for x in range(len(names))], values, width, label=label)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    left.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=8)
    left.set_ylabel("seconds (median)")
    left.set_title(f"Refresh of each view, {results['size']} size")
    left.legend(fontsize=8)
    jobs = results.get("jobs")
    if jobs:
        labels, walls = [], []
        for job, old in jobs["old_way"].items():
            labels.append(f"{job}\nold way")
            walls.append(old)
            for label, variant in jobs["variants"].items():
                labels.append(f"{job}\n{label}")
                walls.append(variant["jobs"][job]["wall_s"])
        right.barh(range(len(labels)), walls)
        right.set_yticks(range(len(labels)))
        right.set_yticklabels(labels, fontsize=6)
        right.invert_yaxis()
        right.set_xlabel("seconds, submit -> SUCCESS (median)")
        right.set_title("Job runs launched by the daemon")
    fig.suptitle(f"PostgreSQL {results['server']['server_version']}, {results['machine']['cpus']} cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--server", help="a PostgreSQL URL whose role may CREATE DATABASE (default: embedded 18)")
    parser.add_argument("--skip-jobs", action="store_true", help="do not start Dagster's services")
    parser.add_argument("--skip-doubling", action="store_true", help="do not measure twice the history")
    parser.add_argument("--job-repeats", type=int, help="runs per job and variant (default: by size)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    results: dict = {
        "size": args.size,
        "parameters": size,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": round(os.getloadavg()[0], 2),  # other work on the machine when the run began
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    views = [*load_views(), BENCH_VIEW]
    with tempfile.TemporaryDirectory(prefix="av-bench-") as tmp, bench_server(args.server, Path(tmp)) as server_url:
        work_dir = Path(tmp)
        with bench_database(server_url, args.size) as url:
            with psycopg.connect(url, autocommit=True) as conn:
                # Plain and concurrent refreshes get the memory our refreshes get, so that they compare alike.
                if RefreshSettings().work_mem_mb:
                    conn.execute("SELECT set_config('work_mem', %s, false)", [f"{RefreshSettings().work_mem_mb}MB"])
                results["server"] = server_facts(conn)
                log(f"generating {size['users']} users over {size['days']} days")
                results["seed_s"] = round(
                    timed(lambda: (migrate(url), seed(url, users=size["users"], days=size["days"]))), 1
                )
                create_bench_view(conn)
                results["counts"] = table_counts(conn)
                log(f"data: {results['counts']} in {results['seed_s']} s; populating the views")
                for view in views:
                    conn.execute(refresh_sql(view.name))
                conn.execute("VACUUM ANALYZE")
                results["views"] = {}
                for view in views:
                    log(f"measuring {view.name}")
                    results["views"][view.name] = measure_refreshes(url, conn, view, size["repeats"])
                    results["views"][view.name]["rows"] = conn.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(ident(view.name))
                    ).fetchone()[0]
                log("materializing each view's asset in process")
                results["assets"] = measure_assets(url, views, size["repeats"])
                log("materializing each view's asset with its sources unchanged, then after a source write")
                results["skips"] = measure_skips(url, views)
                if not args.skip_jobs:
                    results["jobs"] = measure_jobs(url, server_url, work_dir, args.job_repeats or size["job_repeats"])
            if not args.skip_doubling:  # the database is idle now, as copying it requires
                log("copying the database, doubling the history before every window in the copy")
                results["counts_doubled"], results["doubled_history"] = measure_doubling(
                    server_url, url, views, size["days"]
                )
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = report(results)
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.size}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS_DIR / f"{args.size}.txt").write_text(text + "\n")
    (RESULTS_DIR / f"{args.size}.md").write_text(markdown(results) + "\n")
    DOCS_DIR.mkdir(exist_ok=True)
    chart(results, DOCS_DIR / f"benchmark-{args.size}.png")
    log(f"wrote bench/results/{args.size}.{{json,txt,md}} and docs/benchmark-{args.size}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
