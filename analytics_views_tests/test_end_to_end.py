"""The service as it runs in production: webserver and daemon on PostgreSQL storage, a run via GraphQL."""

import time

import dagster as dg
import psycopg
import pytest
from dagster_graphql import DagsterGraphQLClient

from analytics_views.refresh import refresh_view
from analytics_views.services import dagster_services
from analytics_views.view_checks import STATIC_CHECKS
from analytics_views_tests.conftest import DEPLOYMENT_PASSWORD, free_port

DAILY_VIEWS = {"daily_aggregations", "cohort_aggregations", "campaign_aggregations"}

SCHEDULES_QUERY = """
query {
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes { name location { name } schedules { name scheduleState { status } } }
    }
  }
}
"""


@pytest.fixture
def services(dagster_env, tmp_path):
    port = free_port()
    logs = tmp_path / "logs"
    with dagster_services(env=dagster_env, port=port, log_dir=logs) as processes:
        yield DagsterGraphQLClient("127.0.0.1", port_number=port), logs
    for process in processes:
        assert process.poll() is not None, "a Dagster process outlived the test"


def wait_for_run(client: DagsterGraphQLClient, run_id: str, timeout_s: float = 240) -> dg.DagsterRunStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} still {status} after {timeout_s} s")


def test_daily_job_launched_through_graphql_refreshes_every_daily_view(services):
    client, logs = services
    run_id = client.submit_job_execution("daily_refresh_job", repository_location_name="analytics_views")

    assert wait_for_run(client, run_id) == dg.DagsterRunStatus.SUCCESS

    with dg.DagsterInstance.get() as instance:
        records = instance.get_records_for_run(run_id).records
        materialized = {
            record.event_log_entry.dagster_event.asset_key.to_user_string()
            for record in records
            if record.event_log_entry.dagster_event and record.event_log_entry.dagster_event.is_step_materialization
        }
        checks = {
            (evaluation.asset_key.to_user_string(), evaluation.check_name): evaluation.passed
            for record in records
            if (event := record.event_log_entry.dagster_event) and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
            for evaluation in [event.event_specific_data]
        }
    assert materialized == DAILY_VIEWS
    # Every check of every daily view passes: the unique index, the SQL checks and the data tests.
    assert {view for view, _ in checks} == DAILY_VIEWS
    assert {name for _, name in checks} >= {"unique_index", *STATIC_CHECKS, "revenue_matches_payments"}
    assert [key for key, passed in checks.items() if not passed] == []

    result = client._execute(SCHEDULES_QUERY)  # noqa: SLF001 - the client has no schedule helper
    [repository] = result["repositoriesOrError"]["nodes"]
    assert {s["name"]: s["scheduleState"]["status"] for s in repository["schedules"]} == {
        "daily_refresh_schedule": "RUNNING",
        "weekly_refresh_schedule": "RUNNING",
    }

    time.sleep(2)  # let the daemon's event watcher see the run's last events before reading its log
    for name in ("webserver", "daemon"):
        log = (logs / f"{name}.log").read_text()
        errors = [line for line in log.splitlines() if " - ERROR - " in line or "Traceback" in line]
        assert errors == [], f"{name} log has errors"
        assert DEPLOYMENT_PASSWORD not in log


def test_terminating_a_run_cancels_its_query_in_the_database(services, seeded_db):
    client, _ = services
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        refresh_view(conn, "daily_aggregations")  # populated, so the run's refresh is a CONCURRENTLY one
    with psycopg.connect(seeded_db) as blocker, psycopg.connect(seeded_db, autocommit=True) as watcher:
        blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # the refresh waits here, lock_timeout 30 s
        run_id = client.submit_job_execution(
            "daily_refresh_job", repository_location_name="analytics_views", asset_selection=["daily_aggregations"]
        )
        refreshing = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'REFRESH%daily_aggregations%' AND state = 'active'"
        deadline = time.monotonic() + 120
        while watcher.execute(refreshing).fetchone() is None:
            assert time.monotonic() < deadline, "the run's refresh never started"
            time.sleep(0.2)

        client.terminate_run(run_id)

        # The query goes away while the lock is still held: cancelled, not timed out.
        deadline = time.monotonic() + 15
        while watcher.execute(refreshing).fetchone() is not None:
            assert time.monotonic() < deadline, "the refresh query outlived its terminated run"
            time.sleep(0.2)
        blocker.rollback()
    assert wait_for_run(client, run_id, timeout_s=60) == dg.DagsterRunStatus.CANCELED
