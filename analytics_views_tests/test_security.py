"""Least privilege and secrets, on real servers: a refresher role that cannot write, and passwords that
never reach output, logs, run records or metadata."""

import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from analytics_views.embedded import embedded_server
from analytics_views.migrate import migrate
from analytics_views.refresh import CONCURRENT, refresh_view
from analytics_views.seed import seed
from analytics_views.services import prepare_dagster_home
from analytics_views.paths import SQL_DIR
from analytics_views.views import view_names
from analytics_views_tests.conftest import server_directory
from analytics_views_tests.test_cli import assert_one_line_error, run

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
            assert refresh_view(conn, view).mode == CONCURRENT
        for statement in (
            "INSERT INTO users (user_id, signed_up_at, country, plan) VALUES (-1, now(), 'XX', 'free')",
            "UPDATE payments SET amount = amount * 2",
            "DELETE FROM events",
            "TRUNCATE campaigns CASCADE",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_refresher_role_sql_can_run_twice(refresher, seeded_db):
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        role = admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'av_refresher_%' AND NOT rolcanlogin").fetchone()[0]
        admin.execute("SELECT set_config('analytics_views.refresher_role', %s, false)", [role])
        admin.execute(REFRESHER_SQL.read_text())
    with psycopg.connect(refresher, autocommit=True) as conn:
        assert refresh_view(conn, "daily_aggregations").mode == CONCURRENT


# --- secrets ----------------------------------------------------------------------------------------------


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
        yield lambda database, password=PASSWORD: f"postgresql://analyst:{password}@/{database}?host={host}"


def test_a_wrong_password_is_one_line_without_either_password(password_server):
    result = run("stats", DATABASE_URL=password_server("analytics", "wrong-Pw-123"))
    assert_one_line_error(result, 'password authentication failed for user "analyst"', "check DATABASE_URL")
    assert "wrong-Pw-123" not in result.stderr and PASSWORD not in result.stderr


def test_passwords_never_reach_output_logs_runs_or_metadata(password_server, tmp_path):
    analytics, dagster_storage = password_server("analytics"), password_server("dagster")
    migrate(analytics)
    seed(analytics, users=200)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    env = {"DATABASE_URL": analytics, "DAGSTER_POSTGRES_URL": dagster_storage, "DAGSTER_HOME": str(home)}

    outputs = [run("refresh", "--all", **env), run("stats", "--json", **env)]
    with psycopg.connect(analytics, autocommit=True) as conn:
        conn.execute("DROP INDEX weekly_aggregations_key")  # a failure path too
    outputs.append(run("refresh", "--weekly", **env))

    assert [result.returncode for result in outputs] == [0, 0, 1]
    for result in outputs:
        assert PASSWORD not in result.stdout + result.stderr
    # Everything Dagster stored in PostgreSQL: runs, their config and tags, every event and its metadata.
    with psycopg.connect(dagster_storage) as conn:
        for table in ("runs", "event_logs", "asset_keys", "run_tags", "snapshots"):
            dump = conn.execute(sql.SQL("SELECT coalesce(string_agg(t::text, ''), '') FROM {} AS t").format(sql.Identifier(table))).fetchone()[0]
            assert PASSWORD not in dump, table
        assert conn.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'").fetchone()[0] == 4
    # And every file Dagster wrote (compute logs, run storage files).
    for path in Path(home).rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PASSWORD.encode() not in path.read_bytes(), path
