"""The refresh jobs and the cron schedules the daemon runs them on, one of each configured cadence.

A job holds its cadence's managed views, refreshed by one step (assets.views_asset); within it a view is
refreshed after every view it reads in the run. A view reading a view of another cadence reads that view's latest contents: with the
default cadences the daily run (03:00 UTC) comes before Monday's weekly run (04:00), so a weekly view sees
that morning's daily data, and a daily view sees a weekly view's new week from Tuesday. A cadence without
views gets no job and no schedule: Dagster accepts an empty job, but its schedule would record a run that
does nothing at every tick.
"""

from collections.abc import Mapping

import dagster as dg

from analytics_views.orchestration import definition_checks
from analytics_views.orchestration.cadences import check_cadence
from analytics_views.sql_files.managed import Cadence, ManagedConfig
from analytics_views.sql_files.views import ViewDefinition

# A cadence's views are one step (assets.views_asset) that refreshes them over a pool of connections in
# threads, as dagster-dbt runs dbt's threads in one step: a run is one step in the run worker's own process,
# which has already loaded the definitions, so its cost does not grow with the number of views. A step per
# view, each in a process of its own, cost seconds per view (docs/benchmarks.md); Dagster has no thread-based
# executor (dagster-io/dagster#4041). Every run the daemon or the UI launches uses it (a view materialized by
# hand too, and the definition checks).
REFRESH_EXECUTOR = dg.in_process_executor


def refresh_job(cadence: Cadence, views: Mapping[dg.AssetKey, ViewDefinition]):
    """The cadence's job: its views (each by its asset key) with the checks that follow each refresh."""
    on_it = {key: view for key, view in views.items() if view.cadence == cadence.name}
    return dg.define_asset_job(
        name=cadence.job_name,
        # With the checks that follow each refresh (unique_index, data tests), not the definition checks:
        # those have a job of their own (definition_checks.py).
        selection=dg.AssetSelection.assets(*on_it) - dg.AssetSelection.checks(*definition_checks.check_keys(on_it)),
        description=f"Refreshes the {cadence.name} materialized views ({when(cadence)}) "
        "in one step, each once the views it reads are done.",
        tags={"cadence": cadence.name},
        executor_def=REFRESH_EXECUTOR,
    )


def when(cadence: Cadence) -> str:
    parts = [f"{cadence.cron}, {cadence.timezone}"] if cadence.cron else []
    if cadence.target_lag is not None:
        parts.append(f"within {cadence.target_lag} of a change")
    return "; ".join(parts)


def refresh_schedule(job, cadence: Cadence) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=cadence.schedule_name,
        job=job,
        cron_schedule=cadence.cron,
        execution_timezone=cadence.timezone,
        # Running from the moment the daemon starts, like the cron service it replaces.
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )


def build_jobs(config: ManagedConfig, views: Mapping[dg.AssetKey, ViewDefinition]) -> dict:
    """Each cadence that has views (each by its asset key), with its job; every configured cadence is checked,
    used or not."""
    for cadence in config.cadences:
        check_cadence(cadence)
    return {
        cadence: refresh_job(cadence, views)
        for cadence in config.cadences
        if any(view.cadence == cadence.name for view in views.values())
    }


def build_schedules(jobs: dict) -> list[dg.ScheduleDefinition]:
    """A schedule per cadence with a cron; a cadence with a target lag alone has none (automation_sensor)."""
    return [refresh_schedule(job, cadence) for cadence, job in jobs.items() if cadence.cron is not None]


AUTOMATION_SENSOR = "target_lag_automation"
AUTOMATION_INTERVAL_S = 30


def automation_sensor(config: ManagedConfig, views: Mapping[dg.AssetKey, ViewDefinition]) -> list[dg.AutomationConditionSensorDefinition]:
    """Dagster's declarative automation for the views (each by its asset key) of the cadences with a target
    lag, running from the daemon's start (Dagster's default automation sensor starts stopped); none without such views."""
    lagged = {cadence.name for cadence in config.cadences if cadence.target_lag is not None}
    keys = [key for key, view in views.items() if view.cadence in lagged]
    if not keys:
        return []
    return [
        dg.AutomationConditionSensorDefinition(
            AUTOMATION_SENSOR,
            target=dg.AssetSelection.assets(*keys),
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=AUTOMATION_INTERVAL_S,
            description="Requests the refresh of the views of cadences with a target_lag once what they read "
            "changed (each view's automation condition says why it was or was not requested).",
        )
    ]
