"""The refresh jobs and the cron schedules the daemon runs them on (the old node-cron timetable)."""

import dagster as dg

from analytics_views.views import views_with_cadence

REFRESH_TIMES = {"daily": "0 3 * * *", "weekly": "0 4 * * 1"}  # UTC

# Each view is its own step, and independent views refresh in parallel (one process per step). The steps
# fork from a server that has already imported Dagster and this package (forkserver), instead of each
# starting a fresh interpreter (spawn, Dagster's default): bench/ measures the launch cost of both.
# A run may still pick another executor in its run config (e.g. `in_process`).
EXECUTOR_CONFIG = {"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {}}}}}}


def refresh_job(cadence: str):
    return dg.define_asset_job(
        name=f"{cadence}_refresh_job",
        selection=dg.AssetSelection.assets(*(view.name for view in views_with_cadence(cadence))),
        description=f"Refreshes the {cadence} materialized views, each in its own step.",
        tags={"cadence": cadence},
        config=EXECUTOR_CONFIG,
    )


def refresh_schedule(job, cadence: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{cadence}_refresh_schedule",
        job=job,
        cron_schedule=REFRESH_TIMES[cadence],
        execution_timezone="UTC",
        # Running from the moment the daemon starts, like the cron service it replaces.
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )


refresh_jobs = {cadence: refresh_job(cadence) for cadence in REFRESH_TIMES}
refresh_schedules = [refresh_schedule(job, cadence) for cadence, job in refresh_jobs.items()]
