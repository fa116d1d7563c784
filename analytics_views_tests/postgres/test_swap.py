"""Build-and-swap refreshes (swap.py) against a real database: contents, indexes, grants, fallback, readers."""

import threading
import time

import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres.database import view_state
from analytics_views.postgres.refresh import RefreshError, RefreshSettings, refresh_view

# A view over a tiny table whose query sleeps once (an InitPlan), so its build is slow enough to watch.
SLOW_VIEW = """
CREATE TABLE source_numbers (n int PRIMARY KEY);
INSERT INTO source_numbers VALUES (1), (2), (3);
CREATE MATERIALIZED VIEW slow_numbers AS
SELECT s.n, s.n * 10 AS tenfold FROM source_numbers AS s WHERE (SELECT pg_sleep(%s)) IS NOT NULL
WITH NO DATA;
CREATE UNIQUE INDEX slow_numbers_key ON slow_numbers (n);
CREATE INDEX slow_numbers_tenfold ON slow_numbers (tenfold DESC);
COMMENT ON MATERIALIZED VIEW slow_numbers IS 'Numbers, slowly.';
COMMENT ON COLUMN slow_numbers.tenfold IS 'Ten times n.';
COMMENT ON INDEX slow_numbers_key IS 'The key CONCURRENTLY needs.';
GRANT SELECT ON slow_numbers TO PUBLIC;
"""


def slow_view(url: str, pause_s: float) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(SLOW_VIEW.replace("%s", str(pause_s)))
    refresh_view(conn, "slow_numbers")  # first population: plain
    return conn


def numbers(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT n, tenfold FROM slow_numbers ORDER BY n").fetchall()


def catalog_facts(conn: psycopg.Connection) -> dict:
    return {
        "indexes": conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'slow_numbers' ORDER BY 1"
        ).fetchall(),
        "comments": conn.execute(
            """
            SELECT obj_description('slow_numbers'::regclass, 'pg_class'),
                   col_description('slow_numbers'::regclass, 2),
                   obj_description('slow_numbers_key'::regclass, 'pg_class')
            """
        ).fetchone(),
        "owner_and_acl": conn.execute(
            "SELECT relowner::regrole::text, relacl::text FROM pg_class WHERE oid = 'slow_numbers'::regclass"
        ).fetchone(),
    }


def test_swap_refresh_replaces_contents_and_keeps_indexes_comments_owner_and_grants(seeded_db):
    with slow_view(seeded_db, 0) as conn:
        before = catalog_facts(conn)
        conn.execute("INSERT INTO source_numbers VALUES (4)")
        conn.execute("DELETE FROM source_numbers WHERE n = 1")

        outcome = refresh_view(conn, "slow_numbers", strategy="swap")

        # The only note: the view's pg_sleep() is volatile, so it is never skipped (nothing about the swap).
        assert outcome.mode == RefreshMode.SWAP and outcome.note.startswith("never skipped: it calls the volatile function pg_sleep")
        assert numbers(conn) == [(2, 20), (3, 30), (4, 40)]
        assert catalog_facts(conn) == before
        assert view_state(conn, "slow_numbers").unique_index == "slow_numbers_key"
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE '%%__swap'").fetchone()[0] == 0
        # The swapped view is an ordinary populated view: CONCURRENTLY works on it next time.
        assert refresh_view(conn, "slow_numbers", strategy="concurrent").mode == RefreshMode.CONCURRENT


def test_swap_refresh_of_a_project_view_gives_the_rows_of_a_plain_refresh(seeded_db):
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW daily_aggregations")
        plain = conn.execute("SELECT * FROM daily_aggregations ORDER BY day").fetchall()
        assert refresh_view(conn, "daily_aggregations", strategy="swap").mode == RefreshMode.SWAP
        assert conn.execute("SELECT * FROM daily_aggregations ORDER BY day").fetchall() == plain


def test_swap_falls_back_to_concurrently_when_a_view_depends_on_it(seeded_db):
    with slow_view(seeded_db, 0) as conn:
        conn.execute("CREATE VIEW big_numbers AS SELECT n FROM slow_numbers WHERE n > 1")
        oid = conn.execute("SELECT 'slow_numbers'::regclass::oid").fetchone()[0]
        conn.execute("INSERT INTO source_numbers VALUES (4)")

        outcome = refresh_view(conn, "slow_numbers", strategy="swap")

        assert outcome.mode == RefreshMode.CONCURRENT
        assert "build-and-swap does not apply" in outcome.note and "big_numbers" in outcome.note
        assert conn.execute("SELECT 'slow_numbers'::regclass::oid").fetchone()[0] == oid  # same relation
        assert conn.execute("SELECT n FROM big_numbers ORDER BY n").fetchall() == [(2,), (3,), (4,)]


def test_swap_falls_back_when_a_column_has_its_own_grant(seeded_db):
    with slow_view(seeded_db, 0) as conn:
        conn.execute("GRANT SELECT (n) ON slow_numbers TO PUBLIC")
        outcome = refresh_view(conn, "slow_numbers", strategy="swap")
        assert outcome.mode == RefreshMode.CONCURRENT
        assert "column privileges" in outcome.note


def test_auto_strategy_keeps_concurrently_for_small_views(seeded_db):
    with slow_view(seeded_db, 0) as conn:
        assert refresh_view(conn, "slow_numbers").mode == RefreshMode.CONCURRENT


def test_readers_get_the_old_rows_at_once_while_the_swap_builds(seeded_db):
    with slow_view(seeded_db, 2) as conn:
        conn.execute("INSERT INTO source_numbers VALUES (4)")
        outcomes = []

        def refresh_in_background():
            with psycopg.connect(seeded_db, autocommit=True) as refresher_conn:
                outcomes.append(refresh_view(refresher_conn, "slow_numbers", strategy="swap"))

        refresher = threading.Thread(target=refresh_in_background)
        refresher.start()
        with psycopg.connect(seeded_db, autocommit=True) as reader:
            # Wait until the build is under way (its query sleeps), then read with a short lock_timeout:
            # a reader blocked by the refresh would fail with LockNotAvailable instead of waiting.
            while not reader.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE query LIKE 'REFRESH MATERIALIZED VIEW%%__swap%%'"
                " AND state = 'active')"
            ).fetchone()[0]:
                assert refresher.is_alive()
            reader.execute("SET lock_timeout = '200ms'")
            assert numbers(reader) == [(1, 10), (2, 20), (3, 30)]
        refresher.join()
        assert outcomes[0].mode == RefreshMode.SWAP
        assert numbers(conn) == [(1, 10), (2, 20), (3, 30), (4, 40)]


def test_a_long_reader_makes_the_swap_fall_back_to_concurrently_once(seeded_db):
    with slow_view(seeded_db, 0) as conn, psycopg.connect(seeded_db, application_name="long report") as reader:
        conn.execute("INSERT INTO source_numbers VALUES (4)")
        assert numbers(reader) == [(1, 10), (2, 20), (3, 30)]  # its transaction holds the view until it ends
        started = time.monotonic()
        outcome = refresh_view(conn, "slow_numbers", RefreshSettings(lock_timeout_s=1), strategy="swap")
        assert (outcome.mode, outcome.note) == (
            RefreshMode.CONCURRENT,
            f"build-and-swap does not apply: a session held the view for over 1 s (pid {reader.info.backend_pid} "
            "(long report)), so its swap could not take the view's lock; refreshed CONCURRENTLY, which readers do "
            "not block; never skipped: it calls the volatile function pg_sleep(double precision), whose result may "
            "change any time",
        )
        assert time.monotonic() - started < 10  # one build and one wait, not a rebuild per retry
        assert numbers(conn) == [(1, 10), (2, 20), (3, 30), (4, 40)]
        reader.rollback()


def test_unknown_strategy_is_refused(seeded_db):
    with slow_view(seeded_db, 0) as conn, pytest.raises(ValueError, match="sideways"):
        refresh_view(conn, "slow_numbers", strategy="sideways")


def test_a_reader_whose_snapshot_predates_the_swap_reads_rows_during_and_after_it(seeded_db):
    with slow_view(seeded_db, 1) as conn:
        conn.execute("INSERT INTO source_numbers VALUES (4)")
        during, after = (psycopg.connect(seeded_db) for _ in range(2))
        for reader in (during, after):  # REPEATABLE READ, each with its snapshot taken before the swap begins
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            assert reader.execute("SELECT count(*) FROM source_numbers").fetchone()[0] == 4
        outcomes = []
        refresher = threading.Thread(
            target=lambda: outcomes.append(refresh_view(psycopg.connect(seeded_db, autocommit=True), "slow_numbers", strategy="swap"))
        )
        refresher.start()
        while not conn.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE query LIKE 'REFRESH MATERIALIZED VIEW%%__swap%%'"
            " AND state = 'active')"
        ).fetchone()[0]:
            assert refresher.is_alive()
        assert numbers(during) == [(1, 10), (2, 20), (3, 30)]  # the old rows while the new ones are built
        during.commit()  # its lock on the old view would hold the swap back
        refresher.join()

        assert outcomes[0].mode == RefreshMode.SWAP
        # As after a plain REFRESH: the new rows are frozen, visible to a snapshot older than them.
        assert numbers(after) == [(1, 10), (2, 20), (3, 30), (4, 40)]
        after.commit()
        for reader in (during, after):
            reader.close()


def test_swap_rebuilds_a_view_over_a_schema_only_the_connections_search_path_names(seeded_db):
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA sales; CREATE SCHEMA ledger")
        conn.execute("SET search_path = sales, ledger")
        conn.execute("CREATE TABLE ledger.orders (n int PRIMARY KEY); INSERT INTO orders VALUES (1), (2)")
        conn.execute("CREATE FUNCTION ledger.doubled(n int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT n * 2'")
        conn.execute("CREATE MATERIALIZED VIEW order_numbers AS SELECT n, doubled(n) AS twice FROM orders")
        conn.execute("CREATE UNIQUE INDEX order_numbers_key ON order_numbers (twice)")
        conn.execute("INSERT INTO orders VALUES (3)")

        outcome = refresh_view(conn, "order_numbers", strategy="swap")

        assert (outcome.mode, outcome.note) == (RefreshMode.SWAP, "")
        assert conn.execute("SELECT twice FROM order_numbers ORDER BY 1").fetchall() == [(2,), (4,), (6,)]
        assert conn.execute("SHOW search_path").fetchone()[0] == "sales, ledger"  # the caller's, restored


def test_swap_runs_the_query_under_the_search_path_refresh_uses(seeded_db):
    """PostgreSQL 17 and newer run a REFRESH's query with search_path = pg_catalog, pg_temp: a function
    whose body names a table without its schema fails there, and must fail the swap the same way."""
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE counted (n int PRIMARY KEY); INSERT INTO counted VALUES (1), (2)")
        conn.execute("CREATE FUNCTION counted_numbers() RETURNS SETOF int LANGUAGE sql STABLE AS 'SELECT n FROM counted'")
        conn.execute("ALTER FUNCTION counted_numbers() SET search_path = public")  # to populate it once
        conn.execute("CREATE MATERIALIZED VIEW counted_view AS SELECT n FROM counted_numbers() AS n")
        conn.execute("CREATE UNIQUE INDEX counted_view_key ON counted_view (n)")
        conn.execute("ALTER FUNCTION counted_numbers() RESET search_path")
        conn.execute("INSERT INTO counted VALUES (3)")
        restricted = conn.execute("SELECT current_setting('server_version_num')::int >= 170000").fetchone()[0]
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("REFRESH MATERIALIZED VIEW counted_view")
            plain_fails = False
        except psycopg.errors.UndefinedTable:
            plain_fails = True
        assert plain_fails == restricted

        if restricted:
            with pytest.raises(RefreshError, match='relation "counted" does not exist'):
                refresh_view(conn, "counted_view", strategy="swap")
            assert conn.execute("SELECT count(*) FROM counted_view").fetchone()[0] == 2  # its old rows
        else:
            assert refresh_view(conn, "counted_view", strategy="swap").mode == RefreshMode.SWAP
            assert conn.execute("SELECT count(*) FROM counted_view").fetchone()[0] == 3


# Statements that each fit in 2 s, and together do not: the REFRESH runs the query (0.6 s) and builds the
# expression index (3 rows x 0.4 s), then ANALYZE evaluates the expression again (1.2 s).
DEADLINE_VIEW = """
CREATE FUNCTION slow_double(n int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS 'BEGIN PERFORM pg_sleep(0.4); RETURN n * 2; END';
CREATE INDEX slow_numbers_doubled ON slow_numbers ((slow_double(n)));
"""


def test_the_statement_timeout_bounds_the_whole_swap_not_each_statement(seeded_db):
    with slow_view(seeded_db, 0.6) as conn:
        conn.execute(DEADLINE_VIEW)
        conn.execute("UPDATE source_numbers SET n = 5 WHERE n = 3")  # still 3 rows
        with conn.transaction(force_rollback=True):  # the swap's longest statement fits the timeout
            conn.execute("SET LOCAL statement_timeout = '2s'")
            conn.execute("REFRESH MATERIALIZED VIEW slow_numbers")

        started = time.monotonic()
        with pytest.raises(RefreshError, match="statement timeout"):
            refresh_view(conn, "slow_numbers", RefreshSettings(statement_timeout_s=2), strategy="swap")
        elapsed = time.monotonic() - started

        assert elapsed < 2.9  # its statements take 3 s together
        assert numbers(conn) == [(1, 10), (2, 20), (3, 30)]
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"  # the session's own, untouched
        outcome = refresh_view(conn, "slow_numbers", RefreshSettings(statement_timeout_s=30), strategy="swap")
        assert outcome.mode == RefreshMode.SWAP and numbers(conn)[-1] == (5, 50)
