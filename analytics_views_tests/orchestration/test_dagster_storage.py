"""Dagster's storage from the project's dagster.yaml: dagster-postgres's own, on psycopg2 and on a pool of
connections in every process, and a URL that would select another driver refused in one line before Dagster
loads it."""

import time

import dagster as dg
import psycopg
import pytest

from analytics_views.errors import AnalyticsViewsError
from analytics_views.operations.services import DAGSTER_YAML, prepare_dagster_home
from analytics_views.orchestration.dagster_storage import (
    PING_AFTER_IDLE_S,
    check_storage,
    check_storage_url,
    storage_driver,
    storage_url,
)
from analytics_views.postgres.database import libpq_url

@dg.op
def noop() -> None:
    pass


@dg.job
def noop_job():
    noop()


FIX = "dagster-postgres needs psycopg2: start it with postgresql:// or postgresql+psycopg2://"


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg2"])
def test_a_plain_or_psycopg2_url_runs_the_storage_on_psycopg2(scheme):
    url = f"{scheme}://u:p%40ss@h:5/d"
    assert storage_driver(url) == "psycopg2"
    check_storage_url(url)  # accepted


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ("postgresql+psycopg", f"DAGSTER_POSTGRES_URL starts with postgresql+psycopg://, which selects SQLAlchemy's psycopg driver; {FIX}"),
        ("postgresql+asyncpg", f"DAGSTER_POSTGRES_URL starts with postgresql+asyncpg://, which selects SQLAlchemy's asyncpg driver; {FIX}"),
        ("postgres", f"DAGSTER_POSTGRES_URL starts with postgres://, which SQLAlchemy cannot load; {FIX}"),
        ("postgresql+nosuchdriver", f"DAGSTER_POSTGRES_URL starts with postgresql+nosuchdriver://, which SQLAlchemy cannot load; {FIX}"),
    ],
)
def test_a_url_selecting_another_driver_is_one_line_naming_the_fix(scheme, message):
    with pytest.raises(AnalyticsViewsError) as raised:
        check_storage_url(f"{scheme}://analyst:Secret99x@db.example.com:5432/dagster")
    assert str(raised.value) == message


def test_check_storage_refuses_another_driver_before_connecting(tmp_path):
    home = prepare_dagster_home(tmp_path / "dagster_home")
    url = "postgresql+psycopg://analyst:Secret99x@no-such-host.invalid:5432/dagster"  # never reached
    with pytest.raises(AnalyticsViewsError, match=r"^DAGSTER_POSTGRES_URL starts with postgresql\+psycopg://"):
        check_storage(home, {"DAGSTER_POSTGRES_URL": url})


def test_dagster_yaml_names_the_pooled_postgres_storage_by_its_variable():
    assert storage_url(DAGSTER_YAML, {"DAGSTER_POSTGRES_URL": "postgresql://u@h/d"}) == ("DAGSTER_POSTGRES_URL", "postgresql://u@h/d")
    assert storage_url(DAGSTER_YAML, {}) is None  # Dagster itself then names the missing variable


def test_instance_from_dagster_yaml_stores_runs_in_postgres_with_psycopg2(empty_db, tmp_path, monkeypatch):
    # A plain postgresql:// URL is what SQLAlchemy 2.1 would hand to psycopg 3, breaking the event log.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    home = prepare_dagster_home(tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_ref().storage_data.class_name == "PooledPostgresStorage"  # what run workers load too
        connections = {
            type(instance.run_storage).__name__: instance.run_storage.connect,
            type(instance.event_log_storage).__name__: instance.event_log_storage.index_connection,
            type(instance.schedule_storage).__name__: instance.schedule_storage.connect,
        }
        drivers = {}
        for name, connection in connections.items():
            with connection() as conn:
                drivers[name] = conn.dialect.driver
        assert drivers == {
            "PostgresRunStorage": "psycopg2",
            "PooledPostgresEventLogStorage": "psycopg2",
            "PostgresScheduleStorage": "psycopg2",
        }
        # And it really writes there: a run's events (each one NOTIFYs) are stored and read back from PostgreSQL.
        result = noop_job.execute_in_process(instance=instance)
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        stored = [entry.dagster_event.event_type for entry in instance.all_logs(result.run_id) if entry.is_dagster_event]
        assert stored.count(dg.DagsterEventType.STEP_SUCCESS) == 1 and stored[-1] == dg.DagsterEventType.RUN_SUCCESS


def test_a_socket_directory_in_the_host_is_refused_naming_the_form_that_works():
    with pytest.raises(AnalyticsViewsError) as raised:
        check_storage_url("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/db")
    assert str(raised.value) == (
        "DAGSTER_POSTGRES_URL names a Unix socket directory in its host (%2Fvar%2Frun%2Fpostgresql), which SQLAlchemy, "
        "and so dagster-postgres, reads as a host name: write it as postgresql://USER@/DATABASE?host=/var/run/postgresql"
    )
    check_storage_url("postgresql://postgres@/db?host=/var/run/postgresql")  # the form that works


def _sessions(url: str) -> int:
    """Connections ever opened to url's database (pg_stat_database.sessions), this one's included."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def _storage_backends(conn: psycopg.Connection) -> list[int]:
    return [pid for (pid,) in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )]


def test_runs_write_their_events_over_a_few_held_connections_not_one_per_query(empty_db, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    home = prepare_dagster_home(tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        noop_job.execute_in_process(instance=instance)  # tables created, pools filled
        before = _sessions(empty_db)
        for _ in range(5):
            result = noop_job.execute_in_process(instance=instance)
            assert result.success
        opened = _sessions(empty_db) - before - 1  # the count's own connection
        events = sum(len(instance.all_logs(run.run_id)) for run in instance.get_runs(limit=5))
    # dagster-postgres alone opens one for every query: more than the runs' events (50 here).
    assert events >= 50 and opened <= 3


def test_a_held_storage_connection_the_server_dropped_is_replaced_before_use(empty_db, tmp_path, monkeypatch):
    """A restart of the storage server (here: its backends terminated) costs no failed write."""
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", libpq_url(empty_db))
    home = prepare_dagster_home(tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        noop_job.execute_in_process(instance=instance)
        with psycopg.connect(empty_db, autocommit=True) as conn:
            held = _storage_backends(conn)
            assert held  # the pools keep their connections between queries
            conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [held])
        time.sleep(PING_AFTER_IDLE_S)  # a restart takes longer; a connection used a moment ago is not pinged
        result = noop_job.execute_in_process(instance=instance)
        assert result.success and instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
