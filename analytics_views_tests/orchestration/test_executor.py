"""The jobs' executor: a run's steps in threads of its process, each as soon as it may run (executor.py).

These runs use the job's own executor, as a run the daemon launches does (dg.execute_job), not
execute_in_process, which always runs the steps one after another.
"""

import time

import dagster as dg
import psycopg

from analytics_views.postgres.refresh import ADVISORY_LOCK_NAMESPACE
from analytics_views_tests.postgres.test_reliability import held, in_thread, run_daily_job, wait_for_activity


def materialized(instance: dg.DagsterInstance, view: str) -> bool:
    return instance.get_latest_materialization_event(dg.AssetKey(view)) is not None


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_independent_views_refresh_while_another_waits(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    # The first step in key order: run one after another, the other two would wait behind it.
    first = "campaign_aggregations"
    with dg.DagsterInstance.ephemeral() as instance:
        lock = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
        with held(refreshed_db, lock, [ADVISORY_LOCK_NAMESPACE, first]) as blocker:
            thread, outcome = in_thread(run_daily_job, instance)
            wait_for_activity(refreshed_db, f"application_name LIKE 'analytics-views {first} run %' AND wait_event_type = 'Lock'")
            wait_until(lambda: materialized(instance, "cohort_aggregations") and materialized(instance, "daily_aggregations"))
            assert not materialized(instance, first)
            blocker.rollback()
            thread.join(120)
        success, _ = outcome["result"]
        assert success and materialized(instance, first)


def test_a_failing_view_leaves_the_others_refreshed(refreshed_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", refreshed_db)
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW cohort_aggregations")
    with dg.DagsterInstance.ephemeral() as instance:
        success, events = run_daily_job(instance)
        failures = {event.step_key for event in events if event.is_step_failure}
        assert not success and failures == {"cohort_aggregations"}
        assert materialized(instance, "campaign_aggregations") and materialized(instance, "daily_aggregations")
