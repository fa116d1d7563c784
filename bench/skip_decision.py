"""What deciding a skip costs (write_quiescence.py), on a quiet database and on a busy one.

    python -m bench.skip_decision [--views 100] [--writers 4] [--server URL]

Builds N small materialized views over one source table (200k rows), refreshes each once, then:
- quiet: no other session works; every view is proven unchanged and skipped. Prints the time per decision
  (all of refresh_view's work for a skip: catalog look-ups and the two looks at pg_stat_activity);
- busy: writer sessions insert rows, one at a time and in batches of 100, into another table of the same
  database (the views' sources do not change): no skip can be proven, so each view is refreshed. Prints the
  time of the proof's two looks alone, the share of views skipped (0 expected) and the writers' throughput
  with and without refreshes running beside them.
No change log is built (see docs/reliability-and-security.md), so no writer pays for one.
"""

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg import sql

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres import write_quiescence
from analytics_views.postgres.database import with_database
from analytics_views.postgres.embedded import embedded_server
from analytics_views.postgres.refresh import refresh_view
from bench.timing import log

SOURCE_ROWS = 200_000


@contextmanager
def bench_database(server: str | None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-skip-") as folder, (
        _given(server) if server else embedded_server(Path(folder) / "pgdata")
    ) as url:
        name = f"bench_skip_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(url, name)
        finally:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def build(conn: psycopg.Connection, views: int) -> list[str]:
    conn.execute("CREATE TABLE src (id bigint PRIMARY KEY, v int NOT NULL)")
    conn.execute("INSERT INTO src SELECT g, g %% 1000 FROM generate_series(1, %s) AS g", [SOURCE_ROWS])
    conn.execute("CREATE TABLE other (id bigserial PRIMARY KEY, v int)")
    names = [f"mv_{i:04d}" for i in range(views)]
    for i, name in enumerate(names):
        conn.execute(
            sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT v % 50 AS k, count(*) AS n FROM src WHERE v % {} = {} GROUP BY 1").format(
                sql.Identifier(name), sql.Literal(max(views, 1)), sql.Literal(i % max(views, 1))
            )
        )
        conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (k)").format(sql.Identifier(name)))
    conn.execute("ANALYZE")
    return names


class Writers:
    """Sessions inserting into `other` until stopped; counts the rows they committed."""

    def __init__(self, url: str, sessions: int, batch: int):
        self.url, self.sessions, self.batch = url, sessions, batch
        self.rows, self.stop, self.threads = 0, threading.Event(), []
        self.lock = threading.Lock()

    def _write(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                conn.execute("INSERT INTO other (v) SELECT g FROM generate_series(1, %s) AS g", [self.batch])
                with self.lock:
                    self.rows += self.batch

    def __enter__(self) -> "Writers":
        self.threads = [threading.Thread(target=self._write) for _ in range(self.sessions)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def throughput(url: str, sessions: int, batch: int, seconds: float, beside=None) -> float:
    """Rows per second the writers commit in `seconds`, with `beside()` running meanwhile when given."""
    with Writers(url, sessions, batch) as writers:
        time.sleep(0.5)
        start_rows, started = writers.rows, time.perf_counter()
        if beside:
            beside()
        remaining = seconds - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return (writers.rows - start_rows) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.skip_decision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=100)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--server", help="a PostgreSQL URL whose role may CREATE DATABASE (default: embedded 18)")
    args = parser.parse_args(argv)
    with bench_database(args.server) as url, psycopg.connect(url, autocommit=True) as conn:
        version = conn.info.server_version
        log(f"building {args.views} views over {SOURCE_ROWS} rows (PostgreSQL {version // 10000})")
        names = build(conn, args.views)
        last = {name: refresh_view(conn, name).sources_fingerprint for name in names}
        time.sleep(write_quiescence.QUIET_AFTER_S + 1)

        quiet = []
        for name in names:
            started = time.perf_counter()
            outcome = refresh_view(conn, name, skip_if_unchanged_since=last[name])
            quiet.append((time.perf_counter() - started, outcome.mode == RefreshMode.SKIPPED))

        looks, busy = [], []
        with Writers(url, args.writers, 1):
            time.sleep(0.5)
            for name in names:
                started = time.perf_counter()
                write_quiescence.look(conn)
                write_quiescence.look(conn)
                looks.append(time.perf_counter() - started)
                started = time.perf_counter()
                outcome = refresh_view(conn, name, skip_if_unchanged_since=last[name])
                busy.append((time.perf_counter() - started, outcome.mode == RefreshMode.SKIPPED))
                last[name] = outcome.sources_fingerprint

        def refresh_all() -> None:
            for name in names:
                refresh_view(conn, name)

        rates = {
            (batch, label): throughput(url, args.writers, batch, 5.0, beside)
            for batch in (1, 100)
            for label, beside in (("alone", None), ("beside refreshes", refresh_all))
        }

    ms = lambda values: f"{statistics.median(values) * 1000:.1f} ms"  # noqa: E731
    print(f"skip decision, PostgreSQL {version // 10000}, {args.views} views, {args.writers} writer sessions")
    print(f"  quiet database: {sum(s for _, s in quiet)}/{len(quiet)} skipped, median {ms([t for t, _ in quiet])} per view "
          f"(p90 {sorted(t for t, _ in quiet)[int(len(quiet) * 0.9) - 1] * 1000:.1f} ms)")
    print(f"  busy database:  {sum(s for _, s in busy)}/{len(busy)} skipped (none can be proven), median "
          f"{ms([t for t, _ in busy])} per view refreshed; the proof's two looks: median {ms(looks)}")
    for (batch, label), rate in rates.items():
        print(f"  writers, {'single-row inserts' if batch == 1 else f'batches of {batch}'} {label}: {rate:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
