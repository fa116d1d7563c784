"""`analytics-views migrate`: apply sql/migrations/ once each and keep sql/views/ current.

Every file applied is recorded in `analytics_views_migrations` with its checksum. A migration file is
applied once, in name order; a view file is (re)created whenever its checksum changes, together with every
view that reads it, and its header comment becomes the view's `COMMENT ON MATERIALIZED VIEW` (the file's
own `COMMENT ON COLUMN` statements describe its columns). The whole run is one transaction under an
advisory lock: all of it or none of it.
"""

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from analytics_views.postgres.database import connect
from analytics_views.errors import AnalyticsViewsError
from analytics_views.postgres.ownership import refuse_foreign_objects
from analytics_views.paths import MIGRATIONS_DIR, defs_yaml_in_use
from analytics_views.sql_files.views import load_views

LEDGER = "analytics_views_migrations"
_LOCK_KEY = "analytics_views.migrate"  # the advisory lock's key: unchanged when the module moved


@dataclass(frozen=True)
class MigrationFile:
    name: str  # path under sql/, e.g. "migrations/001_source_tables.sql"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _applied(conn: psycopg.Connection) -> dict[str, str]:
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(LEDGER))
    )
    return dict(conn.execute(sql.SQL("SELECT name, checksum FROM {}").format(sql.Identifier(LEDGER))))


def _record(conn: psycopg.Connection, file: MigrationFile) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (name, checksum) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()"
        ).format(sql.Identifier(LEDGER)),
        [file.name, file.checksum],
    )


def _execute(conn: psycopg.Connection, file: MigrationFile) -> None:
    try:
        with conn.transaction():
            conn.execute(file.sql)
    except psycopg.errors.DuplicateTable as error:
        raise AnalyticsViewsError(
            f"sql/{file.name}: {error.diag.message_primary} and was not created by analytics-views; "
            "point DATABASE_URL at another database or drop that object"
        ) from error
    except psycopg.Error as error:
        raise AnalyticsViewsError(
            f"sql/{file.name} failed: {error.diag.message_primary or error}; nothing was changed"
        ) from error


def migrate(url: str) -> list[str]:
    """Apply what is new or changed; returns the files applied (empty when already current)."""
    migrations = [
        MigrationFile(f"migrations/{path.name}", path.read_text()) for path in sorted(MIGRATIONS_DIR.glob("*.sql"))
    ]
    views = load_views()
    view_files = {view.name: MigrationFile(f"views/{view.path.name}", view.sql) for view in views}
    done: list[str] = []
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        applied = _applied(conn)
        # Never clobber: a relation a pending file creates must not exist already (made by someone else).
        pending = [f for f in (*migrations, *view_files.values()) if f.name not in applied]
        refuse_foreign_objects(conn, pending, defs_yaml_in_use())
        for file in migrations:
            if file.name not in applied:
                _execute(conn, file)
                _record(conn, file)
                done.append(file.name)
            elif applied[file.name] != file.checksum:
                raise AnalyticsViewsError(
                    f"sql/{file.name} changed after it was applied: restore it and add a new migration file"
                )
        # A changed view is recreated, and so is every view that reads it (views are in dependency order).
        stale: set[str] = set()
        for view in views:
            if applied.get(view_files[view.name].name) != view_files[view.name].checksum or stale & set(view.deps):
                stale.add(view.name)
        for view in reversed(views):
            if view.name in stale and view_files[view.name].name in applied:
                conn.execute(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(sql.Identifier(view.name)))
        for view in views:
            if view.name in stale:
                _execute(conn, view_files[view.name])
                # The header comment, the asset's description in Dagster, is also what psql's \dm+ shows.
                conn.execute(
                    sql.SQL("COMMENT ON MATERIALIZED VIEW {} IS {}").format(
                        sql.Identifier(view.name), sql.Literal(view.description)
                    )
                )
                _record(conn, view_files[view.name])
                done.append(view_files[view.name].name)
    return done
