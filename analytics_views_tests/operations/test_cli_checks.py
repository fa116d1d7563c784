"""`refresh` tells what failed: an ERROR check or data test failing in its run is named on the view's line, with
its failing rows and the fix, and the exit code is 1; a failing WARN check is listed and the exit code stays 0;
`stats` shows each view's failing checks (issue 25, item 2)."""

import json
import shutil
import subprocess

import pytest

from analytics_views.paths import SQL_DIR
from analytics_views_tests.operations.test_cli import dagster_home, run  # noqa: F401 - a fixture


@pytest.fixture
def sql_copy(tmp_path):
    """The project's SQL folder with data tests of its own, and a defs.yaml managing it."""
    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    defs = tmp_path / "defs.yaml"
    defs.write_text(f"type: analytics_views.MaterializedViewsComponent\nattributes:\n  sql_folder: {folder}\n")
    return folder, defs


def add_test(folder, name: str, severity: str) -> None:
    (folder / "tests" / "daily_aggregations" / f"{name}.sql").write_text(
        f"-- Every day is a failing row, on purpose.\n-- Severity: {severity}\nSELECT day FROM daily_aggregations\n"
    )


def test_a_failing_error_data_test_is_named_and_makes_refresh_exit_1(seeded_db, dagster_home, sql_copy):
    folder, defs = sql_copy
    add_test(folder, "every_day_fails", "error")
    result = run("refresh", "daily_aggregations", env={**dagster_home, "ANALYTICS_VIEWS_DEFS": str(defs)}, DATABASE_URL=seeded_db)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("daily_aggregations: refreshed (")
    assert "; ERROR check every_day_fails failed: 90 failing rows. Every day is a failing row, on purpose." in line
    assert "fix the view's SQL or its sources' rows, then refresh" in line
    stats = json.loads(run("stats", "--json", env={**dagster_home, "ANALYTICS_VIEWS_DEFS": str(defs)}, DATABASE_URL=seeded_db).stdout)
    [daily] = [row for row in stats if row["view"] == "daily_aggregations"]
    assert [check.split(" failed:")[0] for check in daily["failing_checks"]] == ["ERROR check every_day_fails"]


def test_a_failing_warn_data_test_is_listed_and_refresh_exits_0(seeded_db, dagster_home, sql_copy):
    folder, defs = sql_copy
    add_test(folder, "every_day_warns", "warn")
    result = run("refresh", "daily_aggregations", env={**dagster_home, "ANALYTICS_VIEWS_DEFS": str(defs)}, DATABASE_URL=seeded_db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "; WARN check every_day_warns failed: 90 failing rows." in result.stdout


def test_views_under_keys_a_translator_changed_are_refreshed_and_reported_by_their_names(seeded_db, dagster_home, sql_copy, tmp_path):
    """A team's translator_class prefixes every view's key: the command (and the code server and run it starts)
    still selects, refreshes and reports the views by name, under their new keys."""
    _, defs = sql_copy
    (tmp_path / "team_keys.py").write_text(
        "from analytics_views.orchestration.translator import ViewTranslator\n\n\n"
        "class TeamKeys(ViewTranslator):\n"
        "    def get_asset_key(self, view):\n"
        "        return super().get_asset_key(view).with_prefix('team')\n"
    )
    defs.write_text(defs.read_text() + "  translator_class: team_keys.TeamKeys\n")
    env = {**dagster_home, "ANALYTICS_VIEWS_DEFS": str(defs), "PYTHONPATH": str(tmp_path)}

    result = run("refresh", "daily_aggregations", "weekly_aggregations", env=env, DATABASE_URL=seeded_db)

    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line.split(":")[0] for line in result.stdout.splitlines()) == ["daily_aggregations", "weekly_aggregations"]
    stats = json.loads(run("stats", "--json", env=env, DATABASE_URL=seeded_db).stdout)
    refreshed = sorted(row["view"] for row in stats if row["last_refreshed"])
    assert refreshed == ["daily_aggregations", "weekly_aggregations"]
