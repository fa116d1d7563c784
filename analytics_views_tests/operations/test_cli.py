"""The `analytics-views` command as a user runs it: real processes, real databases, exit codes and messages."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg
import psutil
import pytest

from analytics_views.postgres.refresh import ADVISORY_LOCK_NAMESPACE
from analytics_views.operations.launcher import LAUNCHED_BY_TAG
from analytics_views.operations.services import prepare_dagster_home
from analytics_views_tests.postgres.test_reliability import held, in_thread, wait_for_activity

COMMAND = str(Path(sys.executable).parent / "analytics-views")
VIEWS = ["campaign_aggregations", "cohort_aggregations", "daily_aggregations", "weekly_aggregations"]


def run(*args: str, env: dict[str, str] | None = None, **overrides: str | None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    for name, value in overrides.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run([COMMAND, *args], env=environment, capture_output=True, text=True, timeout=300)


def left_behind(dagster_home: dict[str, str], grace_s: float = 10) -> list[str]:
    """Dagster processes still running for this instance `grace_s` after the command ended: the code servers and
    run workers `refresh` launched must end with its runs (a terminated worker's log-capturing `tail` children
    take a moment to follow it, longer on a loaded machine)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                cmdline = " ".join(process.info["cmdline"] or [])
                ours = "dagster" in cmdline or "analytics_views.operations.launcher" in cmdline
                if ours and process.environ().get("DAGSTER_HOME") == dagster_home["DAGSTER_HOME"]:
                    left.append(cmdline[:120])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("subcommand", ["migrate", "seed", "refresh", "stats", "dev"])
def test_every_subcommand_has_help(subcommand):
    result = run(subcommand, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: analytics-views {subcommand}")


def test_migrate_then_migrate_again_says_up_to_date(empty_db):
    first = run("migrate", DATABASE_URL=empty_db)
    second = run("migrate", DATABASE_URL=empty_db)
    assert first.returncode == 0 and "applied sql/migrations/001_source_tables.sql" in first.stdout
    assert second.returncode == 0 and second.stdout.strip() == "database is up to date"


def test_seed_fills_the_source_tables(migrated_db):
    result = run("seed", "--users", "200", "--seed", "3", DATABASE_URL=migrated_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeded 200 users, ")
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 200


@pytest.fixture
def dagster_home(empty_db, tmp_path) -> dict[str, str]:
    """A persistent Dagster instance on PostgreSQL storage, as in production."""
    return {"DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "dagster_home")), "DAGSTER_POSTGRES_URL": empty_db}


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (["--all"], VIEWS),
        (["--daily"], ["campaign_aggregations", "cohort_aggregations", "daily_aggregations"]),
        (["--weekly"], ["weekly_aggregations"]),
        (["daily_aggregations", "weekly_aggregations"], ["daily_aggregations", "weekly_aggregations"]),
    ],
)
def test_refresh_runs_through_dagster_and_is_recorded_in_the_instance(seeded_db, dagster_home, selection, expected, monkeypatch):
    result = run("refresh", *selection, env=dagster_home, DATABASE_URL=seeded_db)

    assert result.returncode == 0, result.stderr
    refreshed = sorted(line.split(":")[0] for line in result.stdout.splitlines() if ": refreshed (" in line)
    assert refreshed == expected
    for name, value in dagster_home.items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.get() as instance:
        for view in expected:
            assert instance.get_latest_materialization_event(dg.AssetKey(view)) is not None
        runs = instance.get_runs()
        assert runs and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        # Real runs, launched through the code location as the daemon launches them: the Overview timeline
        # shows them and "Re-execute" runs the same job, and they say who launched them.
        assert all(run.remote_job_origin.location_name == "analytics_views" for run in runs)
        assert all(run.tags[LAUNCHED_BY_TAG] == "analytics-views refresh" for run in runs)
        assert len(runs) == len({instance.get_run_by_id(r.run_id).job_name for r in runs})  # one run per cadence
    assert left_behind(dagster_home) == []


def test_refresh_without_a_persistent_instance_is_one_line_naming_the_fix(seeded_db, tmp_path):
    result = run("refresh", "daily_aggregations", DATABASE_URL=seeded_db, DAGSTER_HOME=None, ANALYTICS_VIEWS_DEV_DIR=str(tmp_path))
    assert_one_line_error(result, "DAGSTER_HOME is not set", "start `analytics-views dev`", "export DAGSTER_HOME")
    with psycopg.connect(seeded_db) as conn:  # nothing was refreshed behind the error
        assert conn.execute("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'daily_aggregations'").fetchone()[0] is False


def test_stats_reports_rows_size_state_index_and_last_refresh(seeded_db, dagster_home):
    before = json.loads(run("stats", "--json", env=dagster_home, DATABASE_URL=seeded_db).stdout)
    run("refresh", "--daily", env=dagster_home, DATABASE_URL=seeded_db)
    after = run("stats", "--json", env=dagster_home, DATABASE_URL=seeded_db)
    table = run("stats", env=dagster_home, DATABASE_URL=seeded_db)

    assert after.returncode == 0 and table.returncode == 0
    assert [row["view"] for row in before] == [row["view"] for row in json.loads(after.stdout)]
    stats = {row["view"]: row for row in json.loads(after.stdout)}
    assert all(row["populated"] is False and row["rows"] is None and row["last_refreshed"] is None for row in before)
    with psycopg.connect(seeded_db) as conn:
        assert stats["daily_aggregations"]["rows"] == conn.execute("SELECT count(*) FROM daily_aggregations").fetchone()[0]
    assert stats["daily_aggregations"]["populated"] is True
    assert stats["daily_aggregations"]["unique_index_usable"] is True
    assert stats["daily_aggregations"]["last_refreshed"] is not None
    assert stats["weekly_aggregations"]["populated"] is False
    assert stats["weekly_aggregations"]["size_bytes"] > 0
    assert stats["daily_aggregations"]["last_refresh_mode"] == "plain (first population)"
    assert stats["weekly_aggregations"]["last_refresh_mode"] is None
    header = ["view", "rows", "size", "populated", "unique", "index", "last", "refreshed", "failing", "checks", "how", "why"]
    assert table.stdout.splitlines()[0].split() == header


def test_a_failed_refresh_exits_non_zero_naming_the_view_and_the_fix(seeded_db, dagster_home):
    assert run("refresh", "--daily", env=dagster_home, DATABASE_URL=seeded_db).returncode == 0
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        conn.execute("DROP INDEX daily_aggregations_key")
    result = run("refresh", "--daily", env=dagster_home, DATABASE_URL=seeded_db)
    assert result.returncode == 1
    assert "daily_aggregations: FAILED (daily_aggregations has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY" in result.stdout
    # One line per view, and nothing else: no Dagster log or stack trace (46 lines for this view before).
    assert len(result.stdout.splitlines()) == 3 and result.stderr == ""
    # Its sources did not change in between, and the run's other connections are its own (write_quiescence.py).
    assert "cohort_aggregations: skipped (" in result.stdout, run("stats", env=dagster_home, DATABASE_URL=seeded_db).stdout


def test_refresh_skips_unchanged_views_unless_forced(seeded_db, dagster_home):
    first = run("refresh", "--weekly", env=dagster_home, DATABASE_URL=seeded_db)
    again = run("refresh", "--weekly", env=dagster_home, DATABASE_URL=seeded_db)
    forced = run("refresh", "--weekly", "--force", env=dagster_home, DATABASE_URL=seeded_db)
    assert [r.returncode for r in (first, again, forced)] == [0, 0, 0]
    assert "weekly_aggregations: refreshed (" in first.stdout and "plain (first population)" in first.stdout
    assert "weekly_aggregations: skipped (52 rows, " in again.stdout and "proven unchanged since its last refresh" in again.stdout
    assert "weekly_aggregations: refreshed (" in forced.stdout and "concurrent in" in forced.stdout


@pytest.mark.parametrize("args", [["migrate"], ["seed"], ["refresh", "--all"], ["stats"]])
def test_missing_database_url_is_one_line_naming_the_fix(args):
    assert_one_line_error(run(*args, DATABASE_URL=None), "DATABASE_URL is not set", "export DATABASE_URL=")


@pytest.mark.parametrize("args", [["migrate"], ["stats"], ["refresh", "--weekly"]])
def test_unreachable_database_is_one_line_naming_the_fix(args):
    result = run(*args, DATABASE_URL="postgresql://analyst:s3cret-pw@127.0.0.1:9/analytics")
    assert_one_line_error(result, "cannot connect to the analytics database at 127.0.0.1:9/analytics", "check DATABASE_URL")
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_unknown_view_is_one_line_listing_the_views(seeded_db):
    result = run("refresh", "daily_aggregations", "dayly_aggregations", DATABASE_URL=seeded_db)
    assert_one_line_error(result, "unknown view 'dayly_aggregations'", "daily_aggregations")


def test_a_mistake_found_after_the_launcher_started_leaves_no_process_behind(seeded_db, dagster_home):
    # The launcher starts first (launcher.py) and loads the code location while the command checks its arguments.
    result = run("refresh", "dayly_aggregations", DATABASE_URL=seeded_db, **dagster_home)
    assert_one_line_error(result, "unknown view 'dayly_aggregations'")
    assert left_behind(dagster_home, grace_s=2) == []


def test_stats_on_a_database_never_migrated_says_to_migrate(empty_db):
    assert_one_line_error(run("stats", DATABASE_URL=empty_db), "run `analytics-views migrate`")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "DATABASE_URL is not a PostgreSQL URL: use postgresql://"),
        ("postgresq://analyst:s3cret-pw@db/analytics", "DATABASE_URL is not a PostgreSQL URL"),
        ("postgresql://analyst:s3cret-pw@db:54x2/analytics", "DATABASE_URL has port '54x2', which is not a number"),
        ("postgresql://analyst:s3cret-pw@db.invalid/analytics", "cannot connect to the analytics database at db.invalid:5432"),
    ],
)
def test_malformed_database_url_is_one_line_without_the_password(url, expected):
    result = run("stats", DATABASE_URL=url)
    assert_one_line_error(result, expected)
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_sql_injection_in_a_view_name_is_an_unknown_view_and_changes_nothing(seeded_db):
    result = run("refresh", "daily_aggregations; drop table users", DATABASE_URL=seeded_db)
    assert_one_line_error(result, "unknown view 'daily_aggregations; drop table users'")
    with psycopg.connect(seeded_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] > 0


def test_refresh_on_a_database_never_migrated_says_to_migrate(empty_db):
    assert_one_line_error(run("refresh", "--all", DATABASE_URL=empty_db), "was never migrated: run `analytics-views migrate`")


@pytest.mark.parametrize(
    ("yaml_text", "environment", "expected"),
    [
        (None, {"DAGSTER_POSTGRES_URL": None}, "it reads DAGSTER_POSTGRES_URL, which is not set: export DAGSTER_POSTGRES_URL="),
        ("storage:\n  custom: [oops\n", {}, "it is not valid YAML at line 2, column 11"),
        ("storage:\n  postgres:\n    postgres_url: 42\n    bogus_setting: true\n", {}, "cannot load the Dagster instance"),
    ],
)
def test_a_broken_dagster_yaml_is_one_line_naming_the_file(seeded_db, tmp_path, yaml_text, environment, expected):
    home = prepare_dagster_home(tmp_path / "dagster_home")
    if yaml_text is not None:
        (home / "dagster.yaml").unlink()
        (home / "dagster.yaml").write_text(yaml_text)
    result = run("refresh", "--weekly", DATABASE_URL=seeded_db, DAGSTER_HOME=str(home), **environment)
    assert_one_line_error(result, "$DAGSTER_HOME/dagster.yaml", expected)
    with psycopg.connect(seeded_db) as conn:  # nothing ran
        assert conn.execute("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'weekly_aggregations'").fetchone()[0] is False


# --- failures, blocked views and signals ------------------------------------------------------------------


def blocked_refresh_env(seeded_db: str, dagster_home: dict[str, str], monkeypatch) -> None:
    for name, value in {**dagster_home, "DATABASE_URL": seeded_db}.items():
        monkeypatch.setenv(name, value)


@contextmanager
def run_holding_the_daily_slot(seeded_db: str):
    """An in-process run of daily_aggregations, holding its pool slot while its refresh waits for the view's
    advisory lock, which the test holds; yields the run's id."""
    from analytics_views.definitions import defs

    lock = "SELECT pg_advisory_xact_lock(%s, hashtext('daily_aggregations'))"
    with held(seeded_db, lock, [ADVISORY_LOCK_NAMESPACE]) as blocker, dg.DagsterInstance.get() as instance:
        job = defs.resolve_job_def("daily_refresh_job")
        selection = [dg.AssetKey("daily_aggregations")]
        # Its refresh waits for the lock until the test ends, however slowly the command under test starts.
        config = {"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "lock_timeout_s": 600}}}}
        thread, _ = in_thread(
            job.execute_in_process, instance=instance, asset_selection=selection, run_config=config, raise_on_error=False
        )
        activity = wait_for_activity(seeded_db, REFRESH_WAITING_FOR_A_LOCK)
        yield activity["application_name"].rsplit(" ", 1)[1]
        blocker.rollback()
        thread.join(120)


def test_refresh_waits_at_most_the_stated_time_for_a_view_another_run_holds_naming_that_run(
    seeded_db, dagster_home, monkeypatch
):
    blocked_refresh_env(seeded_db, dagster_home, monkeypatch)
    with run_holding_the_daily_slot(seeded_db) as holder:
        views = ["daily_aggregations", "weekly_aggregations"]
        result = run("refresh", *views, "--wait", "2", env=dagster_home, DATABASE_URL=seeded_db)
    assert result.returncode == 1
    [waiting] = result.stderr.splitlines()
    assert waiting.startswith(
        "analytics-views refresh: waiting up to 2 s for pool refresh_daily_views, "
        f"held by run {holder} (daily_refresh_job, STARTED since "
    )
    daily, weekly = result.stdout.splitlines()
    assert daily.startswith(
        f"daily_aggregations: FAILED (not refreshed: its pool refresh_daily_views stayed held by run {holder} "
    )
    assert weekly.startswith("weekly_aggregations: refreshed (")  # not held up by it
    assert left_behind(dagster_home) == []  # the terminated run's code server too


def test_a_slot_left_to_a_run_that_ended_is_freed_and_the_view_refreshed(seeded_db, dagster_home, monkeypatch):
    blocked_refresh_env(seeded_db, dagster_home, monkeypatch)
    assert run("refresh", "daily_aggregations", env=dagster_home, DATABASE_URL=seeded_db).returncode == 0
    with dg.DagsterInstance.get() as instance:
        [ended] = instance.get_runs()
        # What a killed run leaves: a slot still claimed by a run that has ended.
        storage = instance.event_log_storage
        storage.claim_concurrency_slot("refresh_daily_views", ended.run_id, "refresh_daily_views")
    result = run("refresh", "daily_aggregations", "--force", "--wait", "5", env=dagster_home, DATABASE_URL=seeded_db)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "analytics-views refresh: freed pool refresh_daily_views's slot held by run "
        f"{ended.run_id[:8]}, which ended SUCCESS"
    ]
    assert result.stdout.startswith("daily_aggregations: refreshed (")


def refresh_in_background(seeded_db: str, dagster_home: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [COMMAND, "refresh", "daily_aggregations", "--force"],
        env={**os.environ, **dagster_home, "DATABASE_URL": seeded_db},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


REFRESH_WAITING_FOR_A_LOCK = "application_name LIKE 'analytics-views daily_aggregations run %' AND wait_event_type = 'Lock'"


def test_refresh_says_which_session_holds_the_lock_it_waits_for(seeded_db, dagster_home, monkeypatch):
    blocked_refresh_env(seeded_db, dagster_home, monkeypatch)
    assert run("refresh", "daily_aggregations", env=dagster_home, DATABASE_URL=seeded_db).returncode == 0
    with held(seeded_db, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE") as blocker:
        process = refresh_in_background(seeded_db, dagster_home)
        wait_for_activity(seeded_db, REFRESH_WAITING_FOR_A_LOCK, timeout_s=60)
        time.sleep(2)  # the CLI looks every second
        holder = blocker.info.backend_pid
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert stderr.startswith(f"analytics-views refresh: daily_aggregations waits for a lock held by pid {holder} (")
    assert stderr.strip().endswith("at most lock_timeout_s (30 s) per attempt") and len(stderr.splitlines()) == 1
    assert stdout.startswith("daily_aggregations: refreshed (")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_blocked_refresh_at_once_and_cancels_its_run(seeded_db, dagster_home, monkeypatch, signum, code):
    blocked_refresh_env(seeded_db, dagster_home, monkeypatch)
    assert run("refresh", "daily_aggregations", env=dagster_home, DATABASE_URL=seeded_db).returncode == 0
    with held(seeded_db, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"):
        process = refresh_in_background(seeded_db, dagster_home)
        backend = wait_for_activity(seeded_db, REFRESH_WAITING_FOR_A_LOCK, timeout_s=60)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=25)  # before the refresh's lock_timeout (30 s) ends it
        with psycopg.connect(seeded_db, autocommit=True) as conn:
            gone = conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", [backend["pid"]]).fetchone()[0]
    assert process.returncode == code
    *waits, stopped = stderr.splitlines()  # the line saying what it waited for, if it came before the signal
    assert stopped == (
        f"analytics-views refresh: stopped by {signum.name}; its runs were terminated: a refresh in progress was "
        "cancelled, and its view keeps its previous contents"
    )
    assert len(waits) <= 1
    assert stdout == "" and gone
    with dg.DagsterInstance.get() as instance:
        latest = instance.get_runs(limit=1)[0]
        assert latest.status == dg.DagsterRunStatus.CANCELED
        assert instance.event_log_storage.get_concurrency_info("refresh_daily_views").claimed_slots == []
    assert left_behind(dagster_home) == []
