"""Faults, overlaps and timeouts: a view keeps its last good contents, readers are never blocked, and every
failure says which view and what to do. Each test provokes the fault on a real PostgreSQL server."""

import threading
import time
from contextlib import contextmanager

import dagster as dg
import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.definitions import defs
from analytics_views.operations.services import prepare_dagster_home
from analytics_views.postgres.refresh import ADVISORY_LOCK_NAMESPACE, RefreshError, RefreshSettings, RefreshSkipped, refresh_view

QUICK = RefreshSettings(lock_timeout_s=0.5, statement_timeout_s=60)
# pg_locks covers the whole server, where other tests run at the same time: count this database's only.
ADVISORY_LOCKS_HERE = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


@pytest.fixture
def slow_view(refreshed_db) -> str:
    """A populated test view whose refresh sleeps for `analytics_test.sleep` seconds when that is set."""
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute(
            """
            CREATE MATERIALIZED VIEW slow_view AS
            SELECT n AS id, n * 10 AS value
            FROM generate_series(1, 3) AS n,
                 LATERAL (SELECT pg_sleep(coalesce(current_setting('analytics_test.sleep', true), '0')::float8 / 3)) AS s
            """
        )
        conn.execute("CREATE UNIQUE INDEX slow_view_key ON slow_view (id)")
    return refreshed_db


def contents(url: str, view: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT * FROM {view} ORDER BY 1").fetchall()


@contextmanager
def held(url: str, statement: str, params=()):
    """Run `statement` in an open transaction on another connection until the block ends."""
    with psycopg.connect(url) as conn:
        conn.execute(statement, params)
        yield conn
        conn.rollback()


def wait_for_activity(url: str, condition: str, timeout_s: float = 30) -> dict:
    """The first pg_stat_activity row of the URL's database matching `condition`, waiting for it to appear (other
    tests run on the same server at the same time)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as conn:
        conn.row_factory = psycopg.rows.dict_row
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid, application_name, query, wait_event_type FROM pg_stat_activity"
                f" WHERE datname = current_database() AND ({condition})"
            ).fetchone()
            if row:
                return row
            time.sleep(0.05)
    raise AssertionError(f"no activity where {condition}")


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def daily_refresh_job() -> dg.JobDefinition:
    return defs.resolve_job_def("daily_refresh_job")


def run_daily_job(instance: dg.DagsterInstance, url: str, **kwargs) -> tuple[bool, list[dg.DagsterEvent]]:
    """A daily_refresh_job run on the database at `url` with the job's own executor, as the daemon's runs
    execute. `instance` must persist its runs (dg.instance_for_test). The URL goes in the run config."""
    run_config = {"resources": {"analytics_db": {"config": {"url": url}}}}
    with dg.execute_job(dg.reconstructable(daily_refresh_job), instance=instance, run_config=run_config, **kwargs) as result:
        return result.success, result.all_events


def refresh_in_new_connection(url: str, view: str, settings: RefreshSettings = QUICK, sleep_s: float | None = None):
    with psycopg.connect(url, autocommit=True, application_name=f"analytics-views {view} test") as conn:
        if sleep_s is not None:
            conn.execute("SELECT set_config('analytics_test.sleep', %s, false)", [str(sleep_s)])
        return refresh_view(conn, view, settings)


# --- overlapping refreshes -------------------------------------------------------------------------------


def test_a_second_refresh_of_the_same_view_is_skipped_after_lock_timeout_naming_the_first(refreshed_db):
    # Another refresh (in Dagster, the CLI or psql) holds the view's advisory lock.
    with held(
        refreshed_db, "SELECT pg_advisory_xact_lock(%s, hashtext('daily_aggregations'))", [ADVISORY_LOCK_NAMESPACE]
    ):
        with pytest.raises(RefreshSkipped, match=r"skipped daily_aggregations: another refresh of it is running \(pid \d+"):
            refresh_in_new_connection(refreshed_db, "daily_aggregations")
        # Other views are not held up by it.
        assert refresh_in_new_connection(refreshed_db, "weekly_aggregations").mode == RefreshMode.CONCURRENT


def test_two_simultaneous_refreshes_of_one_view_run_one_after_the_other(slow_view):
    waiting = RefreshSettings(lock_timeout_s=30, statement_timeout_s=60)
    first, first_outcome = in_thread(refresh_in_new_connection, slow_view, "slow_view", waiting, 1.5)
    wait_for_activity(slow_view, "query LIKE 'REFRESH MATERIALIZED VIEW CONCURRENTLY%slow_view%'")
    second, second_outcome = in_thread(refresh_in_new_connection, slow_view, "slow_view", waiting, 0)
    # The second waits on the view's advisory lock instead of running beside the first.
    waiter = wait_for_activity(slow_view, "query LIKE '%pg_advisory_xact_lock%' AND wait_event_type = 'Lock'")
    assert waiter["application_name"] == "analytics-views slow_view test"
    first.join(30)
    second.join(30)
    assert first_outcome["result"].mode == second_outcome["result"].mode == RefreshMode.CONCURRENT


def test_the_advisory_lock_is_released_when_a_refresh_fails(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("DROP INDEX daily_aggregations_key")
        with pytest.raises(RefreshError, match="no unique index"):
            refresh_view(conn, "daily_aggregations", QUICK)
        locks = conn.execute(
            ADVISORY_LOCKS_HERE,
            [ADVISORY_LOCK_NAMESPACE],
        ).fetchone()[0]
        assert locks == 0


def test_each_cadences_step_is_its_own_pool_limited_to_one_run_at_a_time(empty_db, tmp_path, monkeypatch):
    # Within and across steps, one refresh of a view at a time is the view's advisory lock (tests above).
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", empty_db)
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(tmp_path / "home"))) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
    for cadence in ("daily", "weekly"):
        job = defs.resolve_job_def(f"{cadence}_refresh_job")
        pools = {node.name: node.definition.pool for node in job.graph.nodes}
        assert pools == {f"refresh_{cadence}_views": f"refresh_{cadence}_views"}


# --- timeouts, cancellation and retries -------------------------------------------------------------------


def test_lock_timeout_is_transient_and_set_locally(refreshed_db):
    with held(refreshed_db, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"):
        with psycopg.connect(refreshed_db, autocommit=True) as conn:
            with pytest.raises(RefreshError, match="interrupted") as raised:
                refresh_view(conn, "daily_aggregations", QUICK)
            assert raised.value.transient
            # SET LOCAL semantics: nothing leaks into the session after the refresh's transaction.
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"


def test_statement_timeout_is_permanent_and_names_the_setting(slow_view):
    with pytest.raises(RefreshError, match="statement_timeout") as raised:
        refresh_in_new_connection(slow_view, "slow_view", RefreshSettings(lock_timeout_s=5, statement_timeout_s=0.3), 3)
    assert not raised.value.transient
    assert contents(slow_view, "slow_view") == [(1, 10), (2, 20), (3, 30)]


@contextmanager
def daily_refresh_waiting_on_a_lock(url: str):
    """A daily_aggregations materialization in a thread, its REFRESH blocked by a lock on `users`; yields
    the refresh's pg_stat_activity row and the run's outcome, and releases the lock when the block ends."""
    with held(url, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE") as blocker, dg.instance_for_test() as instance:
        thread, outcome = in_thread(run_daily_job, instance, url, asset_selection=[dg.AssetKey("daily_aggregations")])
        yield wait_for_activity(url, "query LIKE 'REFRESH%daily_aggregations%'"), outcome
        blocker.rollback()  # the refresh, or its retry, can now go through
        thread.join(120)
        [run] = instance.get_runs()
        outcome["retries"] = [e.user_message for e in instance.all_logs(run.run_id) if "; retry " in e.user_message]


def test_a_refresh_is_labelled_for_the_dba(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    with daily_refresh_waiting_on_a_lock(refreshed_db) as (activity, _):
        pass
    assert activity["application_name"].startswith("analytics-views daily_aggregations run ")


def test_a_refresh_killed_half_way_keeps_the_old_contents_and_the_retry_succeeds(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    before = contents(refreshed_db, "daily_aggregations")
    with daily_refresh_waiting_on_a_lock(refreshed_db) as (victim, outcome):
        with psycopg.connect(refreshed_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [victim["pid"]])
            # Readable throughout, with its previous contents.
            assert admin.execute("SELECT * FROM daily_aggregations ORDER BY 1").fetchall() == before
    success, events = outcome["result"]
    assert success
    # The step retried the view on a new connection, once.
    assert len(outcome["retries"]) == 1 and "retry 1 of 3" in outcome["retries"][0]
    assert contents(refreshed_db, "daily_aggregations") == before  # same data, refreshed again


def test_a_missing_view_fails_at_once_naming_the_fix(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW campaign_aggregations")
    result = defs.resolve_job_def("daily_refresh_job").execute_in_process(raise_on_error=False)
    [failure] = [event for event in result.all_events if event.is_step_failure]
    not_refreshed = failure.step_failure_data.user_failure_data.metadata["analytics_views/not_refreshed"].value
    assert list(not_refreshed) == ["campaign_aggregations"]
    assert "does not exist: run `analytics-views migrate`" in not_refreshed["campaign_aggregations"]
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == {"daily_aggregations", "cohort_aggregations"}
    assert "attempts" not in not_refreshed["campaign_aggregations"]  # failed at once, not retried


def test_statement_timeout_from_run_config_fails_the_step_at_once(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    with held(refreshed_db, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"):
        result = defs.resolve_job_def("daily_refresh_job").execute_in_process(
            asset_selection=[dg.AssetKey("daily_aggregations")],
            run_config={"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "statement_timeout_s": 0.2}}}},
            raise_on_error=False,
        )
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "refresh of daily_aggregations was cancelled" in failure.step_failure_data.error.message
    assert "raise statement_timeout_s" in failure.step_failure_data.error.message
    assert "attempts" not in failure.step_failure_data.error.message  # failed at once, not retried


# --- nothing lost -----------------------------------------------------------------------------------------


def test_duplicate_rows_keep_the_old_data_and_say_which_view_and_why(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("CREATE MATERIALIZED VIEW campaign_names AS SELECT name, channel FROM campaigns")
        conn.execute("CREATE UNIQUE INDEX campaign_names_key ON campaign_names (name)")
        before = contents(refreshed_db, "campaign_names")
        conn.execute("INSERT INTO campaigns (campaign_id, name, channel, started_on) SELECT 9999, name, channel, started_on FROM campaigns LIMIT 1")
        with pytest.raises(RefreshError) as raised:
            refresh_view(conn, "campaign_names", QUICK)
    message = str(raised.value)
    assert message.startswith("refresh of campaign_names failed and it keeps its previous contents: its new data has duplicate rows")
    assert not raised.value.transient
    assert contents(refreshed_db, "campaign_names") == before


def test_readers_are_not_blocked_while_a_concurrent_refresh_runs(slow_view):
    before = contents(slow_view, "slow_view")
    thread, outcome = in_thread(refresh_in_new_connection, slow_view, "slow_view", RefreshSettings(5, 60), 3)
    wait_for_activity(slow_view, "query LIKE 'REFRESH MATERIALIZED VIEW CONCURRENTLY%slow_view%'")
    with psycopg.connect(slow_view, autocommit=True) as reader:
        # Blocked readers would fail here: any wait for a lock longer than 100 ms raises LockNotAvailable.
        reader.execute("SET lock_timeout = '100ms'")
        assert reader.execute("SELECT * FROM slow_view ORDER BY 1").fetchall() == before
        still_running = reader.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'REFRESH MATERIALIZED VIEW CONCURRENTLY%slow_view%'"
        ).fetchone()[0]
    thread.join(30)
    assert still_running == 1  # the read happened during the refresh
    assert outcome["result"].mode == RefreshMode.CONCURRENT


def test_a_read_replica_is_refused_with_a_clear_message(refreshed_db):
    # A server in recovery cannot be faked without a replica; pg_is_in_recovery() is what refresh_view asks,
    # so shadow it in a schema searched first and check the message.
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA replica_shadow")
        conn.execute(
            "CREATE FUNCTION replica_shadow.pg_is_in_recovery() RETURNS boolean LANGUAGE sql AS 'SELECT true'"
        )
        conn.execute("SET search_path = replica_shadow, pg_catalog, public")
        with pytest.raises(RefreshError, match="read replica.*point DATABASE_URL at the primary"):
            refresh_view(conn, "daily_aggregations", QUICK)


def test_a_view_name_carrying_sql_is_quoted_not_executed(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        with pytest.raises(RefreshError, match="daily_aggregations; drop table users"):
            refresh_view(conn, "daily_aggregations; drop table users", QUICK)
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] > 0
