"""`refresh` never waits for good on an instance that would queue its runs with no daemon to start them: one
line naming the fix and a non-zero exit within seconds (issue 25: a DAGSTER_HOME without dagster.yaml hung)."""

import time

import psycopg
import yaml

from analytics_views.paths import PROJECT_ROOT
from analytics_views_tests.operations.test_cli import assert_one_line_error, run


def test_a_dagster_home_without_dagster_yaml_is_refused_at_once(seeded_db, tmp_path):
    started = time.monotonic()
    result = run("refresh", "--weekly", DAGSTER_HOME=str(tmp_path), DATABASE_URL=seeded_db)
    assert_one_line_error(result, f"DAGSTER_HOME ({tmp_path}) holds no dagster.yaml", "deploy/dagster.yaml")
    assert time.monotonic() - started < 60


def test_a_queued_run_coordinator_without_a_daemon_is_refused_at_once(seeded_db, empty_db, tmp_path):
    settings = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())
    settings["run_coordinator"] = {"module": "dagster", "class": "QueuedRunCoordinator"}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    started = time.monotonic()
    result = run(
        "refresh", "--weekly", DAGSTER_HOME=str(tmp_path), DATABASE_URL=seeded_db, DAGSTER_POSTGRES_URL=empty_db
    )
    assert_one_line_error(result, "queues runs (QueuedRunCoordinator) and no Dagster daemon", "dagster-daemon run")
    assert time.monotonic() - started < 60


def test_stats_creates_no_dagster_tables_in_a_database_that_holds_none(seeded_db, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())
    # DAGSTER_POSTGRES_URL mistakenly names the analytics database itself.
    result = run("stats", "--json", DAGSTER_HOME=str(home), DATABASE_URL=seeded_db, DAGSTER_POSTGRES_URL=seeded_db)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(seeded_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename IN ('runs', 'event_logs')").fetchone()[0] == 0
