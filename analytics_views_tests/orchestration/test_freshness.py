"""A view is late once its last refresh is older than its window: 26 hours daily, 7 days 2 hours weekly.

The states are computed by Dagster's own FreshnessDaemon iteration (what `dagster-daemon run` does every
30 s), on materializations recorded at a frozen past instant and evaluated at frozen later instants.
"""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.freshness import FreshnessDaemon

from analytics_views.orchestration.cadences import freshness_window
from analytics_views.definitions import defs
from analytics_views.sql_files.managed import DEFAULT_CADENCES

REFRESHED_AT = datetime(2026, 3, 2, 3, 0, tzinfo=timezone.utc)  # a Monday, 03:00 UTC
DAILY, WEEKLY = "daily_aggregations", "weekly_aggregations"


@pytest.fixture
def workspace():
    with dg.instance_for_test() as instance:
        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name="analytics_views.definitions", attribute="defs"),
            location_name="analytics_views",
        )
        with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as context:
            yield instance, context


def refreshed(instance: dg.DagsterInstance, view: str, at: datetime) -> None:
    with freeze_time(at):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=view, metadata={"dagster/row_count": 90}))


def daemon_states(instance: dg.DagsterInstance, context, at: datetime) -> dict[str, FreshnessState]:
    """One FreshnessDaemon iteration at `at`, and the states it recorded for the two views."""
    with freeze_time(at):
        list(FreshnessDaemon().run_iteration(context))
    records = instance.get_freshness_state_records([dg.AssetKey(DAILY), dg.AssetKey(WEEKLY)])
    return {key.to_user_string(): record.freshness_state for key, record in records.items()}


def test_windows_are_the_period_plus_2_hours_on_every_view():
    assert freshness_window(DEFAULT_CADENCES["daily"]) == timedelta(hours=26)
    assert freshness_window(DEFAULT_CADENCES["weekly"]) == timedelta(days=7, hours=2)
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert specs[DAILY].freshness_policy.fail_window.to_timedelta() == timedelta(hours=26)
    assert specs["cohort_aggregations"].freshness_policy.fail_window.to_timedelta() == timedelta(hours=26)
    assert specs["campaign_aggregations"].freshness_policy.fail_window.to_timedelta() == timedelta(hours=26)
    assert specs[WEEKLY].freshness_policy.fail_window.to_timedelta() == timedelta(days=7, hours=2)
    assert specs["events"].freshness_policy is None  # the application writes source tables continuously


def test_daily_view_turns_late_after_26_hours_and_weekly_after_7_days_2_hours(workspace):
    instance, context = workspace
    assert daemon_states(instance, context, REFRESHED_AT) == {
        DAILY: FreshnessState.UNKNOWN,  # never refreshed: nothing to judge yet
        WEEKLY: FreshnessState.UNKNOWN,
    }

    refreshed(instance, DAILY, REFRESHED_AT)
    refreshed(instance, WEEKLY, REFRESHED_AT)

    assert daemon_states(instance, context, REFRESHED_AT + timedelta(hours=25, minutes=59)) == {
        DAILY: FreshnessState.PASS,
        WEEKLY: FreshnessState.PASS,
    }
    assert daemon_states(instance, context, REFRESHED_AT + timedelta(hours=26, minutes=1)) == {
        DAILY: FreshnessState.FAIL,  # the 03:00 refresh did not happen: late
        WEEKLY: FreshnessState.PASS,
    }
    assert daemon_states(instance, context, REFRESHED_AT + timedelta(days=7, hours=1, minutes=59)) == {
        DAILY: FreshnessState.FAIL,
        WEEKLY: FreshnessState.PASS,  # next Monday's refresh may still come
    }
    assert daemon_states(instance, context, REFRESHED_AT + timedelta(days=7, hours=2, minutes=1)) == {
        DAILY: FreshnessState.FAIL,
        WEEKLY: FreshnessState.FAIL,
    }

    refreshed(instance, DAILY, REFRESHED_AT + timedelta(days=8, hours=1))
    assert daemon_states(instance, context, REFRESHED_AT + timedelta(days=8, hours=2))[DAILY] == FreshnessState.PASS
