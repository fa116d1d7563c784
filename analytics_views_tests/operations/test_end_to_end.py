"""The service as it runs in production: webserver and daemon on PostgreSQL storage, a run via GraphQL."""

import os
import re
import signal
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from dagster_graphql import DagsterGraphQLClient

from analytics_views.postgres.refresh import ADVISORY_LOCK_NAMESPACE, refresh_view
from analytics_views.operations.services import DAGSTER_YAML, dagster_services
from analytics_views.orchestration.view_checks import STATIC_CHECKS
from analytics_views.paths import SQL_DIR
from analytics_views_tests.conftest import DEPLOYMENT_PASSWORD, free_port
from analytics_views_tests.orchestration.test_component import write_defs_yaml
from analytics_views_tests.orchestration.test_notifications import mailbox, receiver  # noqa: F401 - fixtures
from analytics_views_tests.postgres.test_reliability import ADVISORY_LOCKS_HERE, contents, wait_for_activity

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


# The daemon's run monitoring every second, and slots of ended runs freed a second after (production: 15 and 15).
TEST_MONITORING = {"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1}


@pytest.fixture
def services(dagster_env, tmp_path):
    home = Path(dagster_env["DAGSTER_HOME"])
    settings = yaml.safe_load(DAGSTER_YAML.read_text())
    settings["run_monitoring"].update(TEST_MONITORING)
    (home / "dagster.yaml").unlink()
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
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
    # Every check that follows a refresh passes on every daily view: the unique index and the data tests. The
    # SQL checks follow the views' definitions, in a job of their own (definition_checks.py).
    assert {view for view, _ in checks} == DAILY_VIEWS
    assert {name for _, name in checks} >= {"unique_index", "revenue_matches_payments"}
    assert not {name for _, name in checks} & set(STATIC_CHECKS)
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
        refreshing = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'REFRESH%daily_aggregations%' AND state = 'active'"
        )
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


def daily_run(client: DagsterGraphQLClient, **resource_config) -> str:
    config = {"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, **resource_config}}}}
    return client.submit_job_execution(
        "daily_refresh_job",
        repository_location_name="analytics_views",
        asset_selection=["daily_aggregations"],
        run_config=config if resource_config else None,
    )


def events_of(run_id: str, event_type: dg.DagsterEventType) -> list:
    with dg.DagsterInstance.get() as instance:
        return instance.all_logs(run_id, of_type=event_type)


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} after {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_killed_run_worker_releases_its_view_within_the_stated_time(services, seeded_db):
    client, _ = services
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        refresh_view(conn, "daily_aggregations")
    before = contents(seeded_db, "daily_aggregations")
    with psycopg.connect(seeded_db) as blocker, psycopg.connect(seeded_db, autocommit=True) as watcher:
        blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # the refresh waits here, in mid-run
        run_id = daily_run(client)
        application = f"analytics-views daily_aggregations run {run_id[:8]}"
        wait_for_activity(seeded_db, f"application_name = '{application}' AND wait_event_type = 'Lock'", timeout_s=120)
        [started] = [e for e in events_of(run_id, dg.DagsterEventType.ENGINE_EVENT) if "Started process for run" in e.message]
        os.kill(int(re.search(r"pid: (\d+)", started.message)[1]), signal.SIGKILL)

        assert wait_for_run(client, run_id, timeout_s=30) == dg.DagsterRunStatus.FAILURE
        # Its backend and the view's advisory lock go, though the lock it waited on is still held.
        ours = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            ADVISORY_LOCKS_HERE,
        )
        wait_until(
            lambda: watcher.execute(ours[0], [application]).fetchone()[0] == 0
            and watcher.execute(ours[1], [ADVISORY_LOCK_NAMESPACE]).fetchone()[0] == 0,
            timeout_s=10,
            what="the killed run's backend or advisory lock remained",
        )
        blocker.rollback()
    with dg.DagsterInstance.get() as instance:

        def slot_freed() -> bool:
            info = instance.event_log_storage.get_concurrency_info("refresh_daily_views")
            return all(slot.run_id != run_id for slot in info.claimed_slots)

        # Freed within poll_interval_seconds + free_slots_after_run_end_seconds of the run's end, plus a margin.
        wait_until(slot_freed, timeout_s=sum(TEST_MONITORING.values()) + 5, what="the killed run's slot was not freed")

    assert wait_for_run(client, daily_run(client), timeout_s=60) == dg.DagsterRunStatus.SUCCESS
    assert contents(seeded_db, "daily_aggregations") == before


def test_a_run_terminated_while_a_view_waits_to_retry_ends_canceled_without_another_attempt(services, seeded_db):
    client, _ = services
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        refresh_view(conn, "daily_aggregations")
    before = contents(seeded_db, "daily_aggregations")
    with psycopg.connect(seeded_db) as blocker:
        blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # every attempt times out at once: transient
        run_id = daily_run(client, lock_timeout_s=0.2)
        # The step retries the view itself; the second retry waits 4 to 8 s (TRANSIENT_RETRY): terminate inside it.
        retries = lambda: retry_lines(run_id, "daily_aggregations")  # noqa: E731
        wait_until(lambda: len(retries()) >= 2, timeout_s=120, what="no second retry")
        assert "retry 2 of 3" in retries()[-1] and client.get_run_status(run_id) == dg.DagsterRunStatus.STARTED
        client.terminate_run(run_id)
        assert wait_for_run(client, run_id, timeout_s=60) == dg.DagsterRunStatus.CANCELED
        blocker.rollback()
    assert len(retry_lines(run_id, "daily_aggregations")) == 2  # terminated before the third attempt began
    assert contents(seeded_db, "daily_aggregations") == before


def retry_lines(run_id: str, view: str) -> list[str]:
    with dg.DagsterInstance.get() as instance:
        return [
            entry.user_message
            for entry in instance.all_logs(run_id)
            if entry.dagster_event is None and entry.user_message.startswith(f"{view}: ") and "; retry " in entry.user_message
        ]


def failures_of(run_id: str) -> list[str]:
    return [event.message for event in events_of(run_id, dg.DagsterEventType.STEP_FAILURE)]


def test_a_failing_scheduled_refresh_sends_one_email_and_one_webhook_notice_from_the_daemon(
    dagster_env, seeded_db, tmp_path, mailbox, receiver
):
    """The whole way: the daemon's schedule launches the run, the run fails, the daemon's sensors tell the SMTP
    server and the webhook started here, once each."""
    from analytics_views_tests.orchestration.test_notifications import DAILY_FIX, SMTP_PASSWORD, SMTP_USER, drop_unique_index

    box, smtp_port = mailbox
    port = free_port()
    defs_yaml = write_defs_yaml(
        tmp_path / "defs" / "defs.yaml",
        f"""
        sql_folder: {SQL_DIR}
        cadences: {{daily: "* * * * *"}}  # a tick every minute, the first within a minute of the daemon's start
        notifications:
          ui_url: http://127.0.0.1:{port}
          email: {{smtp_host: 127.0.0.1, smtp_port: {smtp_port}, security: none, sender: {SMTP_USER},
                   to: [data-team@example.com], password_env: SMTP_PASSWORD}}
          webhook: {{url_env: ALERTS_WEBHOOK}}
        """,
    )
    drop_unique_index(seeded_db, "daily_aggregations")
    env = {
        **dagster_env,
        "ANALYTICS_VIEWS_DEFS": str(defs_yaml),
        "SMTP_PASSWORD": SMTP_PASSWORD,
        "ALERTS_WEBHOOK": f"http://127.0.0.1:{receiver.server_port}/hooks/alerts",
    }
    with dagster_services(env=env, port=port, log_dir=tmp_path / "logs") as processes:
        wait_until(lambda: box.messages and receiver.posted("/hooks/"), 240, "the first notices")
        time.sleep(35)  # one more sensor tick: it must not tell the same run again
    for process in processes:
        assert process.poll() is not None, "a Dagster process outlived the test"

    with dg.DagsterInstance.get() as instance:
        failed = {
            record.dagster_run.run_id: record.dagster_run
            for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        }
    hooks = receiver.posted("/hooks/")
    hook_runs = [hook["run_id"] for hook in hooks]
    email_runs = [re.search(r"/runs/([0-9a-f-]+)", email.get_content())[1] for email in box.messages]
    assert len(set(hook_runs)) == len(hook_runs) and len(set(email_runs)) == len(email_runs)  # once per run
    assert set(hook_runs) <= set(failed) and set(email_runs) <= set(failed)
    first = hooks[0]
    assert failed[first["run_id"]].tags["dagster/schedule_name"] == "daily_refresh_schedule"
    assert first["views"] == ["daily_aggregations"] and DAILY_FIX in first["reasons"][0]["reason"]
    assert first["url"] == f"http://127.0.0.1:{port}/runs/{first['run_id']}"
    assert first["run_id"] in email_runs
    email = box.messages[email_runs.index(first["run_id"])]
    assert email["Subject"].strip() == "analytics-views: daily_refresh_job failed: daily_aggregations"
    assert DAILY_FIX in email.get_content() and "Launched by: schedule daily_refresh_schedule" in email.get_content()
