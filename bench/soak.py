"""Soak: refresh every view in a loop for N minutes while readers query them; report what leaked or hurt.

    .venv/bin/python bench/soak.py --minutes 5            # embedded PostgreSQL, seeded demo data
    DATABASE_URL=postgresql://... .venv/bin/python bench/soak.py --minutes 30

Reports refreshes done, reader queries and errors, the largest reader latency, server connections before
and after (a leak shows as growth) and this process's memory before and after. Not a test: it prints
figures, which docs/soak.md records.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analytics_views.postgres.database import connect, with_database  # noqa: E402
from analytics_views.postgres.embedded import embedded_server  # noqa: E402
from analytics_views.operations.migrate import migrate  # noqa: E402
from analytics_views.postgres.refresh import refresh_view  # noqa: E402
from analytics_views.operations.seed import seed  # noqa: E402
from analytics_views.sql_files.views import view_names  # noqa: E402


def server_connections(url: str) -> int:
    with connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]


class ReaderStats:
    """Queries, errors, maximum latency and a bounded random sample of latencies (for the median): memory
    stays flat however long the soak runs."""

    def __init__(self, sample_size: int = 10_000):
        self.count, self.maximum, self.sample, self.sample_size = 0, 0.0, [], sample_size
        self.error_count, self.first_errors = 0, []
        self.random = random.Random(0)
        self.lock = threading.Lock()

    def add_error(self, message: str) -> None:
        with self.lock:
            self.error_count += 1
            if len(self.first_errors) < 3:
                self.first_errors.append(message)

    def add(self, seconds: float) -> None:
        with self.lock:
            self.count += 1
            self.maximum = max(self.maximum, seconds)
            if len(self.sample) < self.sample_size:
                self.sample.append(seconds)
            elif (slot := self.random.randrange(self.count)) < self.sample_size:
                self.sample[slot] = seconds


def reader(url: str, views: list[str], stop: threading.Event, stats: ReaderStats) -> None:
    with connect(url, autocommit=True, application_name="analytics-views soak reader") as conn:
        while not stop.is_set():
            for view in views:
                started = time.perf_counter()
                try:
                    conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1 LIMIT 100").format(sql.Identifier(view))).fetchall()
                except psycopg.Error as error:
                    stats.add_error(f"{view}: {error}")
                stats.add(time.perf_counter() - started)


def soak(url: str, minutes: float, readers: int) -> dict:
    views = list(view_names())
    process = psutil.Process()
    with connect(url, autocommit=True) as conn:  # populated first, as after deployment
        for view in views:
            refresh_view(conn, view)
    connections_before, rss_before = server_connections(url), process.memory_info().rss
    stop, stats = threading.Event(), ReaderStats()
    threads = [threading.Thread(target=reader, args=(url, views, stop, stats)) for _ in range(readers)]
    for thread in threads:
        thread.start()
    refreshes, started = 0, time.monotonic()
    deadline, warm_at, rss_warm = started + minutes * 60, started + minutes * 6, None  # warm after 10%
    while time.monotonic() < deadline:
        if rss_warm is None and time.monotonic() >= warm_at:
            rss_warm = process.memory_info().rss
        for view in views:  # a new connection each time, as each Dagster step opens its own
            with connect(url, autocommit=True, application_name=f"analytics-views {view} soak") as conn:
                refresh_view(conn, view)
            refreshes += 1
    stop.set()
    for thread in threads:
        thread.join()
    return {
        "minutes": minutes,
        "views": len(views),
        "refreshes": refreshes,
        "reader_threads": readers,
        "reader_queries": stats.count,
        "reader_errors": stats.error_count,
        "first_errors": stats.first_errors,
        "reader_latency_median_ms": round(statistics.median(stats.sample) * 1000, 2),
        "reader_latency_max_ms": round(stats.maximum * 1000, 2),
        "server_connections_before": connections_before,
        "server_connections_after": server_connections(url),
        "rss_mb_before": round(rss_before / 2**20, 1),
        "rss_mb_after_warm_up": round((rss_warm or rss_before) / 2**20, 1),
        "rss_mb_after": round(process.memory_info().rss / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--users", type=int, default=5000, help="demo users when the embedded server is used")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("DATABASE_URL")
        if not url:
            server = stack.enter_context(embedded_server(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "pg"))
            with connect(server, autocommit=True) as conn:
                conn.execute("CREATE DATABASE soak")
            url = with_database(server, "soak")
            migrate(url)
            seed(url, users=args.users)
        print(json.dumps(soak(url, args.minutes, args.readers), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
