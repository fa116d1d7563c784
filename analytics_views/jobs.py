"""The refresh jobs and the cron schedules the daemon runs them on (the old node-cron timetable).

A job holds its cadence's managed views; within it a view is refreshed after every view it reads (asset
deps order the steps). A view reading a view of the other cadence reads that view's latest contents: the
daily run (03:00) comes before Monday's weekly run (04:00), so a weekly view sees that morning's daily
data, and a daily view sees a weekly view's new week from Tuesday.
"""

import dagster as dg

from analytics_views.discovery import managed_views
from analytics_views.executor import refresh_executor
from analytics_views.managed import ManagedConfig, load_config
from analytics_views.views import ViewDefinition

REFRESH_TIMES = {"daily": "0 3 * * *", "weekly": "0 4 * * 1"}  # UTC

# Each view is its own step, and the steps of a run refresh at the same time in threads of the run's own
# process (executor.py), each once the views it reads are refreshed. Dagster's own executors run steps
# either one after another in process, or in processes of their own, each of which costs seconds to start
# where a refresh waits on PostgreSQL (bench/, docs/benchmarks.md). A run may still choose Dagster's
# `in_process` or `multiprocess` in its run config (executor_config).
EXECUTORS = {
    "threads": {"threads": {}},
    "in_process": {"in_process": {}},
    "multiprocess": {"multiprocess": {}},
}


def executor_config(kind: str = "threads") -> dict:
    return {"execution": {"config": EXECUTORS[kind]}}


def refresh_job(cadence: str, views: tuple[ViewDefinition, ...]):
    keys = [dg.AssetKey(list(view.asset_key_path)) for view in views if view.cadence == cadence]
    return dg.define_asset_job(
        name=f"{cadence}_refresh_job",
        selection=dg.AssetSelection.assets(*keys),
        description=f"Refreshes the {cadence} materialized views, each in its own step.",
        tags={"cadence": cadence},
        executor_def=refresh_executor,
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
