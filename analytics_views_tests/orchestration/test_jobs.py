import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from analytics_views.definitions import defs
from analytics_views.paths import PROJECT_ROOT


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


def test_jobs_run_their_steps_in_threads_and_a_run_may_choose_dagsters_executors(monkeypatch):
    from dagster._core.system_config.objects import ResolvedRunConfig

    from analytics_views.orchestration.jobs import executor_config

    monkeypatch.setenv("DATABASE_URL", "postgresql://unused@localhost/unused")  # resolved, never connected
    for job in ("daily_refresh_job", "weekly_refresh_job", "__ASSET_JOB"):  # the last: materialized by hand
        resolved = ResolvedRunConfig.build(defs.resolve_job_def(job), {}).execution.execution_engine_config
        assert resolved["threads"]["max_concurrent"] >= len(job_views("daily_refresh_job"))
    for kind in ("in_process", "multiprocess"):
        resolved = ResolvedRunConfig.build(defs.resolve_job_def("daily_refresh_job"), executor_config(kind))
        assert set(resolved.execution.execution_engine_config) == {kind}
