import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg

from analytics_views.definitions import defs
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.refresh import ADVISORY_LOCK_NAMESPACE
from analytics_views_tests.postgres.test_reliability import held, in_thread, run_daily_job, wait_for_activity


def job_views(name: str) -> set[str]:
    job = defs.resolve_job_def(name)
    return {key.to_user_string() for key in job.asset_layer.executable_asset_keys}


def test_jobs_select_their_cadence_views():
    assert job_views("daily_refresh_job") == {"daily_aggregations", "cohort_aggregations", "campaign_aggregations"}
    assert job_views("weekly_refresh_job") == {"weekly_aggregations"}


def test_schedules_carry_the_old_cron_timetable_in_utc_and_start_running():
    schedules = {schedule.name: schedule for schedule in defs.schedules}
    daily, weekly = schedules["daily_refresh_schedule"], schedules["weekly_refresh_schedule"]
    assert (daily.cron_schedule, daily.execution_timezone, daily.job_name) == ("0 3 * * *", "UTC", "daily_refresh_job")
    assert (weekly.cron_schedule, weekly.execution_timezone, weekly.job_name) == ("0 4 * * 1", "UTC", "weekly_refresh_job")
    assert daily.default_status == weekly.default_status == dg.DefaultScheduleStatus.RUNNING


def test_definitions_validate():
    dg.Definitions.validate_loadable(defs)


def test_dagster_definitions_validate_passes_without_the_analytics_database(empty_db):
    # The definitions load from files alone; only Dagster's own storage (dagster.yaml) needs a server.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        env={**env, "DAGSTER_POSTGRES_URL": empty_db},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation successful" in result.stdout + result.stderr


def test_every_run_refreshes_a_cadences_views_in_one_step_in_the_run_workers_process():
    from analytics_views.orchestration.jobs import REFRESH_EXECUTOR

    assert REFRESH_EXECUTOR is dg.in_process_executor
    for job, step in (("daily_refresh_job", "refresh_daily_views"), ("weekly_refresh_job", "refresh_weekly_views")):
        assert defs.resolve_job_def(job).executor_def is REFRESH_EXECUTOR
        assert [node.name for node in defs.resolve_job_def(job).graph.nodes] == [step]
    # A view materialized by hand in the UI runs in Dagster's implicit asset job.
    assert defs.resolve_implicit_global_asset_job_def().executor_def is REFRESH_EXECUTOR


def test_refresh_jobs_hold_the_checks_that_follow_a_refresh_and_not_the_definition_checks():
    checks = {
        key.to_user_string()
        for key in defs.resolve_job_def("daily_refresh_job").asset_layer.asset_graph.asset_check_keys
    }
    assert checks == {
        "daily_aggregations:unique_index",
        "daily_aggregations:revenue_matches_payments",
        "daily_aggregations:window_has_every_day",
        "cohort_aggregations:unique_index",
        "cohort_aggregations:retained_within_cohort",
        "campaign_aggregations:unique_index",
        "campaign_aggregations:spend_matches_campaign_spend",
    }


# A run's steps run with the job's own executor, as a run the daemon launches does (dg.execute_job), not
# execute_in_process, which always runs the steps one after another.


def materialized(instance: dg.DagsterInstance, view: str) -> bool:
    return instance.get_latest_materialization_event(dg.AssetKey(view)) is not None


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_independent_views_refresh_while_another_waits(refreshed_db):
    # The first step in key order: run one after another, the other two would wait behind it.
    first = "campaign_aggregations"
    with dg.instance_for_test() as instance:
        lock = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
        with held(refreshed_db, lock, [ADVISORY_LOCK_NAMESPACE, first]) as blocker:
            thread, outcome = in_thread(run_daily_job, instance, refreshed_db)
            wait_for_activity(refreshed_db, f"application_name LIKE 'analytics-views {first} run %' AND wait_event_type = 'Lock'")
            wait_until(lambda: materialized(instance, "cohort_aggregations") and materialized(instance, "daily_aggregations"))
            assert not materialized(instance, first)
            blocker.rollback()
            thread.join(120)
        success, _ = outcome["result"]
        assert success and materialized(instance, first)


def test_a_failing_view_leaves_the_others_refreshed(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW cohort_aggregations")
    with dg.instance_for_test() as instance:
        success, events = run_daily_job(instance, refreshed_db)
        [failure] = [event for event in events if event.is_step_failure]
        assert not success and failure.step_key == "refresh_daily_views"
        not_refreshed = failure.step_failure_data.user_failure_data.metadata["analytics_views/not_refreshed"].value
        assert list(not_refreshed) == ["cohort_aggregations"]
        assert materialized(instance, "campaign_aggregations") and materialized(instance, "daily_aggregations")
