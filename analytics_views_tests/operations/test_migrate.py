from dataclasses import replace

import psycopg
import pytest

from analytics_views.errors import AnalyticsViewsError
from analytics_views.operations.migrate import LEDGER, migrate
from analytics_views.paths import MIGRATIONS_DIR
from analytics_views.sql_files.views import load_views

CATALOG_FINGERPRINT = """
SELECT c.relname, c.relkind, c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public'
ORDER BY c.relname
"""


def test_migrations_apply_twice_without_change(empty_db):
    first = migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        before = conn.execute(CATALOG_FINGERPRINT).fetchall()
    second = migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        after = conn.execute(CATALOG_FINGERPRINT).fetchall()

    expected = [f"migrations/{path.name}" for path in sorted(MIGRATIONS_DIR.glob("*.sql"))] + [
        f"views/{view.path.name}" for view in load_views()
    ]
    assert first == expected
    assert second == []
    assert after == before  # same objects, same OIDs: nothing was dropped or recreated


def test_migrate_records_every_file_it_applied(empty_db):
    applied = migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        recorded = [row[0] for row in conn.execute(f"SELECT name FROM {LEDGER} ORDER BY name")]
    assert recorded == sorted(applied)


def test_views_are_created_unpopulated_with_their_unique_index(migrated_db):
    with psycopg.connect(migrated_db) as conn:
        rows = dict(conn.execute("SELECT matviewname, ispopulated FROM pg_matviews").fetchall())
        indexed = {row[0] for row in conn.execute("SELECT tablename FROM pg_indexes WHERE indexdef LIKE 'CREATE UNIQUE%'")}
    names = {view.name for view in load_views()}
    assert rows == {name: False for name in names}
    assert names <= indexed


def test_changed_applied_migration_is_refused(empty_db, tmp_path, monkeypatch):
    migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        conn.execute(f"UPDATE {LEDGER} SET checksum = 'edited' WHERE name LIKE 'migrations/%'")
    with pytest.raises(AnalyticsViewsError, match="changed after it was applied"):
        migrate(empty_db)


def test_changed_view_file_recreates_that_view(migrated_db):
    view = load_views()[0]
    with psycopg.connect(migrated_db) as conn:
        conn.execute(f"UPDATE {LEDGER} SET checksum = 'old' WHERE name = %s", [f"views/{view.path.name}"])
        old_oid = conn.execute("SELECT %s::regclass::oid", [view.name]).fetchone()[0]
    assert f"views/{view.path.name}" in migrate(migrated_db)
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT %s::regclass::oid", [view.name]).fetchone()[0] != old_oid


def test_header_and_column_comments_reach_the_database_in_the_same_words(migrated_db):
    with psycopg.connect(migrated_db) as conn:
        for view in load_views():
            described = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", [view.name]).fetchone()[0]
            assert described == view.description
            assert described.startswith(view.summary) and f"Cadence: {view.cadence}" in described
            columns = conn.execute(
                "SELECT attname, col_description(attrelid, attnum) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
                [view.name],
            ).fetchall()
            assert columns == [(column.name, column.description) for column in view.columns]
        arpdau = conn.execute("SELECT col_description('daily_aggregations'::regclass, 7)").fetchone()[0]
    assert arpdau == "Average revenue per daily active user, revenue / active_users; NULL when nobody was active."


def test_a_quote_in_the_header_is_written_as_a_literal(migrated_db, monkeypatch):
    view = load_views()[0]
    tricky = replace(view, description="It's a view'); DROP TABLE users; --")
    monkeypatch.setattr("analytics_views.operations.migrate.load_views", lambda: (tricky, *load_views()[1:]))
    with psycopg.connect(migrated_db) as conn:
        conn.execute(f"UPDATE {LEDGER} SET checksum = 'old' WHERE name = %s", [f"views/{view.path.name}"])
    migrate(migrated_db)
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", [view.name]).fetchone()[0] == (
            tricky.description
        )
        assert conn.execute("SELECT to_regclass('users')").fetchone()[0] == "users"
