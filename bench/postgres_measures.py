"""What PostgreSQL alone does: the benchmark's databases, each view's floors and refreshes, readers' latency
during a refresh, and twice the history. No Dagster import (the PostgreSQL layer)."""

import statistics
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from analytics_views.postgres.database import with_database
from analytics_views.postgres.embedded import embedded_server
from analytics_views.postgres.refresh import refresh_view
from analytics_views.sql_files.views import ViewDefinition, parse_view_file
from bench.timing import enough, log, median_time, timed

BENCH_VIEW = parse_view_file(Path(__file__).resolve().parent / "user_day_activity.sql")

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


DOUBLING_REPEATS = 9  # pairs of runs, one on each copy of the database (measure_doubling)


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
