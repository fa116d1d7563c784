"""Least privilege and secrets, on real servers: a refresher role that cannot write, and passwords that
never reach output, logs, run records or metadata."""

import os
import re
import uuid
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import psycopg
import pytest
from dagster_graphql import DagsterGraphQLClient
from psycopg import sql

from analytics_views.postgres.modes import RefreshMode
from analytics_views.operations.launcher import LAUNCHED_BY_TAG
from analytics_views.postgres.embedded import embedded_server
from analytics_views.operations.migrate import migrate
from analytics_views.postgres.refresh import refresh_view
from analytics_views.operations.seed import seed
from analytics_views.definitions import defs
from analytics_views.operations.services import dagster_services, prepare_dagster_home
from analytics_views.paths import SQL_DIR
from analytics_views.sql_files.views import view_names
from analytics_views_tests.conftest import free_port, server_directory
from analytics_views_tests.operations.test_cli import assert_one_line_error, run
from analytics_views_tests.operations.test_end_to_end import wait_for_run
from analytics_views_tests.postgres.test_urls import assert_no_piece

REFRESHER_SQL = SQL_DIR / "roles" / "refresher.sql"
PASSWORD = "Pw-7f3a-never-shown"


# --- least privilege --------------------------------------------------------------------------------------


@pytest.fixture
def refresher(seeded_db):
    """A login role granted the refresher role by sql/roles/refresher.sql; dropped afterwards."""
    role = f"av_refresher_{uuid.uuid4().hex[:8]}"
    login = f"{role}_login"
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        for view in view_names():  # populated by the owner, as after deployment
            refresh_view(admin, view)
        admin.execute("SELECT set_config('analytics_views.refresher_role', %s, false)", [role])
        admin.execute(REFRESHER_SQL.read_text())
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(login), sql.Identifier(role)))
    yield psycopg.conninfo.make_conninfo(seeded_db, user=login)
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        for name in (login, role):
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_refresher_role_refreshes_every_view_and_cannot_write_source_tables(refresher):
    with psycopg.connect(refresher, autocommit=True) as conn:
        for view in view_names():
            assert refresh_view(conn, view).mode == RefreshMode.CONCURRENT
        for statement in (
            "INSERT INTO users (user_id, signed_up_at, country, plan) VALUES (-1, now(), 'XX', 'free')",
            "UPDATE payments SET amount = amount * 2",
            "DELETE FROM events",
            "TRUNCATE campaigns CASCADE",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_refresher_role_sees_other_roles_sessions_so_a_skip_can_be_proven(refresher, seeded_db):
    with psycopg.connect(refresher, autocommit=True) as conn, psycopg.connect(seeded_db, autocommit=True) as admin:
        first = refresh_view(conn, "daily_aggregations")
        admin.execute("SELECT 1")
        second = refresh_view(conn, "daily_aggregations", skip_if_unchanged_since=first.sources_fingerprint)
        admin_pid = admin.info.backend_pid
    # The superuser's session is seen, idle for a moment, not hidden (pg_read_all_stats).
    assert re.search(rf"client backend pid {admin_pid} went idle \d+ s ago", second.note), second.note


def test_the_refresher_role_sql_can_run_twice(refresher, seeded_db):
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        role = admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'av_refresher_%' AND NOT rolcanlogin").fetchone()[0]
        admin.execute("SELECT set_config('analytics_views.refresher_role', %s, false)", [role])
        admin.execute(REFRESHER_SQL.read_text())
    with psycopg.connect(refresher, autocommit=True) as conn:
        assert refresh_view(conn, "daily_aggregations").mode == RefreshMode.CONCURRENT


# --- secrets ----------------------------------------------------------------------------------------------

# Every character that means something in a URL (percent-encoded in the URLs below), and 4-character runs
# that ordinary text never holds.
PASSWORD = "Qz@9:vK/w%Xj#Rt?5m"
WRONG_PASSWORD = "Wr@ng:Pw/7%Yq#Lk?3"


@pytest.fixture(scope="module")
def password_server():
    """An embedded server where role `analyst` must give its password (scram-sha-256)."""
    with server_directory() as folder, embedded_server(folder / "postgres") as admin_url:
        data_dir = folder / "postgres"
        hba = data_dir / "pg_hba.conf"
        hba.write_text("local all analyst scram-sha-256\n" + hba.read_text())
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE analyst LOGIN PASSWORD {}").format(sql.Literal(PASSWORD)))
            admin.execute("SELECT pg_reload_conf()")
            for database in ("analytics", "dagster"):
                admin.execute(sql.SQL("CREATE DATABASE {} OWNER analyst").format(sql.Identifier(database)))
        host = psycopg.conninfo.conninfo_to_dict(admin_url)["host"]
        yield lambda database, password=PASSWORD: f"postgresql://analyst:{quote(password, safe='')}@/{database}?host={host}"


def test_a_wrong_password_is_one_line_without_either_password(password_server):
    result = run("stats", DATABASE_URL=password_server("analytics", WRONG_PASSWORD))
    assert_one_line_error(
        result, 'password authentication failed for user "analyst"', "check DATABASE_URL's user and password"
    )
    assert_no_piece(result.stdout + result.stderr, PASSWORD)
    assert_no_piece(result.stdout + result.stderr, WRONG_PASSWORD)


def storage_dump(url: str) -> tuple[str, int]:
    """Everything Dagster stored in PostgreSQL (runs with their config and tags, every event and its
    metadata), and the number of materializations."""
    with psycopg.connect(url) as conn:
        dump = "".join(
            conn.execute(sql.SQL("SELECT coalesce(string_agg(t::text, ''), '') FROM {} AS t").format(sql.Identifier(table))).fetchone()[0]
            for table in ("runs", "event_logs", "asset_keys", "run_tags", "snapshots", "jobs", "job_ticks")
        )
        materialized = conn.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'").fetchone()[0]
    return dump, materialized


def test_passwords_never_reach_output_logs_runs_or_metadata(password_server, tmp_path, monkeypatch):
    analytics, dagster_storage = password_server("analytics"), password_server("dagster")
    migrate(analytics)
    seed(analytics, users=200)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    env = {"DATABASE_URL": analytics, "DAGSTER_POSTGRES_URL": dagster_storage, "DAGSTER_HOME": str(home)}

    outputs = [run("refresh", "--all", **env), run("stats", "--json", **env)]
    # A run launched through the webserver, as a schedule's would be: its worker, logs and compute logs.
    port, logs = free_port(), tmp_path / "logs"
    with dagster_services(env={**os.environ, **env}, port=port, log_dir=logs):
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_id = client.submit_job_execution("daily_refresh_job", repository_location_name="analytics_views")
        assert wait_for_run(client, run_id) == dg.DagsterRunStatus.SUCCESS
    with psycopg.connect(analytics, autocommit=True) as conn:
        conn.execute("DROP INDEX weekly_aggregations_key")  # a failure path too
    outputs.append(run("refresh", "--weekly", **env))

    assert [result.returncode for result in outputs] == [0, 0, 1]
    for result in outputs:
        assert_no_piece(result.stdout + result.stderr, PASSWORD)
    for name in ("webserver", "daemon"):
        assert_no_piece((logs / f"{name}.log").read_text(), PASSWORD)
    dump, materialized = storage_dump(dagster_storage)
    assert materialized == 4 + 3  # the CLI's four views, the webserver run's three daily ones
    assert_no_piece(dump, PASSWORD)
    # The resource reads DATABASE_URL when the run starts: run config names the variable, never its value.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_storage)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        cli_runs = [r for r in instance.get_runs() if r.tags.get(LAUNCHED_BY_TAG) == "analytics-views refresh"]
        assert [r.run_config["resources"]["analytics_db"]["config"]["url"] for r in cli_runs] == [{"env": "DATABASE_URL"}] * 3  # --all: daily and weekly; --weekly
    # And every file Dagster wrote (compute logs, run storage files).
    files = [path for path in Path(home).rglob("*") if path.is_file() and not path.is_symlink()]
    assert any("compute_logs" in str(path) for path in files)
    for path in files:
        assert_no_piece(path.read_bytes().decode(errors="replace"), PASSWORD)


@pytest.mark.parametrize(
    "login",
    ["wrong password", "unencoded password"],
)
def test_a_run_whose_login_fails_fails_at_once_without_any_piece_of_the_password(password_server, monkeypatch, login):
    if login == "wrong password":
        url, expected = password_server("analytics", WRONG_PASSWORD), 'password authentication failed for user "analyst"'
    else:
        url = password_server("analytics").replace(quote(PASSWORD, safe=""), WRONG_PASSWORD)
        expected = "DATABASE_URL (database analytics) has an @ or / that is not percent-encoded"
    monkeypatch.setenv("DATABASE_URL", url)
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_refresh_job").execute_in_process(instance=instance, raise_on_error=False)
        records = repr(instance.all_logs(result.run_id))
    [failure] = [event for event in result.all_events if event.is_step_failure]
    not_refreshed = failure.step_failure_data.user_failure_data.metadata["analytics_views/not_refreshed"].value
    assert set(not_refreshed) == {"daily_aggregations", "cohort_aggregations", "campaign_aggregations"}
    assert all(expected in reason and "attempts" not in reason for reason in not_refreshed.values())  # not retried
    assert failure.step_failure_data.error.cause is None
    assert_no_piece(records, WRONG_PASSWORD)


CANNOT_CONNECT = "cannot connect to Dagster's storage database at "


@pytest.mark.parametrize("command", [["refresh", "--weekly"], ["stats"]])
@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("wrong password", (CANNOT_CONNECT, 'password authentication failed for user "analyst"', "check DAGSTER_POSTGRES_URL's user and password")),
        ("missing database", (CANNOT_CONNECT, 'database "no_such_db" does not exist', "check DAGSTER_POSTGRES_URL's database name")),
        ("unknown host", (CANNOT_CONNECT, "(unknown host 'no-such-host.invalid')", "check DAGSTER_POSTGRES_URL's host name")),
        ("nothing listening", (CANNOT_CONNECT, "Connection refused", "check DAGSTER_POSTGRES_URL's host and port")),
        ("unencoded password", ("DAGSTER_POSTGRES_URL (host 127.0.0.1, port 5432, database dagster) has an @ or /",)),
        ("psycopg 3 driver", ("DAGSTER_POSTGRES_URL starts with postgresql+psycopg://, which selects SQLAlchemy's psycopg driver", "start it with postgresql://")),
    ],
)
def test_a_wrong_storage_url_is_one_line_naming_what_failed_and_the_fix(
    password_server, seeded_db, tmp_path, command, storage, expected
):
    url = {
        "wrong password": password_server("dagster", WRONG_PASSWORD),
        "missing database": password_server("no_such_db"),
        "unknown host": f"postgresql://analyst:{quote(PASSWORD, safe='')}@no-such-host.invalid:5432/dagster",
        "nothing listening": f"postgresql://analyst:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/dagster",
        "unencoded password": f"postgresql://analyst:{PASSWORD}@127.0.0.1:5432/dagster",
        "psycopg 3 driver": password_server("dagster").replace("postgresql://", "postgresql+psycopg://"),
    }[storage]
    home = prepare_dagster_home(tmp_path / "dagster_home")
    result = run(*command, DATABASE_URL=seeded_db, DAGSTER_POSTGRES_URL=url, DAGSTER_HOME=str(home))
    assert_one_line_error(result, *expected)
    assert "Retrying" not in result.stdout + result.stderr
    assert_no_piece(result.stdout + result.stderr, PASSWORD)
    assert_no_piece(result.stdout + result.stderr, WRONG_PASSWORD)
    with psycopg.connect(seeded_db) as conn:  # nothing ran
        assert conn.execute("SELECT count(*) FROM pg_matviews WHERE ispopulated").fetchone()[0] == 0
