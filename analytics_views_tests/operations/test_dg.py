"""`dg` from the project root, as a newcomer runs it: no database, no DAGSTER_HOME, only `[tool.dg]`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analytics_views.paths import PROJECT_ROOT

DG = str(Path(sys.executable).parent / "dg")


@pytest.fixture
def run_dg(tmp_path):
    """Runs `dg ARGS` in the project root with no database URL and no DAGSTER_HOME (so Dagster uses a
    temporary instance), and a HOME of its own for what dg writes there (telemetry)."""
    unset = {"DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME", "VIRTUAL_ENV"}
    env = {name: value for name, value in os.environ.items() if name not in unset} | {"HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DG, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)

    return run


def test_dg_check_defs_passes_from_the_project_root_without_a_database(run_dg):
    result = run_dg("check", "defs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully." in result.stdout
    assert "warning" not in result.stderr.lower(), result.stderr  # no venv-mismatch or instance warnings


def test_dg_list_defs_lists_the_views_jobs_and_schedules_workspace_yaml_loads(run_dg):
    result = run_dg("list", "defs", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert sorted(asset["asset_key"] for asset in listed["assets"]) == [
        "campaign_aggregations", "campaign_spend", "campaigns", "cohort_aggregations", "daily_aggregations",
        "events", "payments", "users", "weekly_aggregations",
    ]
    assert sorted(job["name"] for job in listed["jobs"]) == [
        "daily_refresh_job", "definition_checks_job", "observe_sources_job", "weekly_refresh_job"
    ]
    assert sorted(schedule["name"] for schedule in listed["schedules"]) == ["daily_refresh_schedule", "weekly_refresh_schedule"]
    assert [resource["name"] for resource in listed["resources"]] == ["analytics_db"]
