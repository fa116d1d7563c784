"""The refresh jobs and the cron schedules the daemon runs them on (the old node-cron timetable).

A job holds its cadence's managed views; within it a view is refreshed after every view it reads (asset
deps order the steps). A view reading a view of the other cadence reads that view's latest contents: the
daily run (03:00) comes before Monday's weekly run (04:00), so a weekly view sees that morning's daily
data, and a daily view sees a weekly view's new week from Tuesday.
"""

import dagster as dg

from analytics_views.discovery import managed_views
from analytics_views.managed import ManagedConfig, load_config
from analytics_views.views import ViewDefinition

REFRESH_TIMES = {"daily": "0 3 * * *", "weekly": "0 4 * * 1"}  # UTC

# Each view is its own step, and a job's steps run one after another in the run's own process
# (in_process). Dagster runs steps in parallel only in processes of their own (multiprocess: there is no
# thread executor), and each such process costs seconds to start and connect to the instance, where our
# views refresh in a fraction of a second (bench/, docs/benchmarks.md): the daily job's three views take
# less time one after another than a single step process takes to start. For views that take longer than
# that, a run may ask for parallel steps in its run config: PARALLEL_EXECUTOR forks them from a server
# that has already imported Dagster, its PostgreSQL storage and this package (forkserver, preloaded).
SERIAL_EXECUTOR = {"in_process": {}}
PARALLEL_EXECUTOR = {
    "multiprocess": {
        "start_method": {
            "forkserver": {
                "preload_modules": [
                    "analytics_views.definitions",
                    "analytics_views.dagster_storage",
                    "dagster_postgres",
                ]
            }
        },
        "max_concurrent": 8,  # the refreshes run in PostgreSQL, not on the local cores
    }
}


def executor_config(parallel: bool = False) -> dict:
    return {"execution": {"config": PARALLEL_EXECUTOR if parallel else SERIAL_EXECUTOR}}


def refresh_job(cadence: str, views: tuple[ViewDefinition, ...]):
    keys = [dg.AssetKey(list(view.asset_key_path)) for view in views if view.cadence == cadence]
    return dg.define_asset_job(
        name=f"{cadence}_refresh_job",
        selection=dg.AssetSelection.assets(*keys),
        description=f"Refreshes the {cadence} materialized views, each in its own step.",
        tags={"cadence": cadence},
        config=executor_config(),
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


def build_jobs(config: ManagedConfig | None = None) -> dict:
    views = managed_views(config or load_config()).views
    return {cadence: refresh_job(cadence, views) for cadence in REFRESH_TIMES}


def build_schedules(jobs: dict) -> list[dg.ScheduleDefinition]:
    return [refresh_schedule(job, cadence) for cadence, job in jobs.items()]
