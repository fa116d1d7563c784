"""What `migrate` may create: only relations that are ours, never one someone else already made.

Before `migrate` runs anything, every relation a pending SQL file would create (tables, indexes, views,
sequences) is looked up in the schema it would be created in. One that exists but whose file is not in
the ledger was made elsewhere: migrate stops with one line naming it, and nothing is changed.
"""

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import psycopg

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

_COMMENT = re.compile(r"--[^\n]*")
# CREATE [UNIQUE] TABLE|INDEX|[MATERIALIZED] VIEW|SEQUENCE [CONCURRENTLY] name; IF NOT EXISTS never clobbers.
_CREATES = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|MATERIALIZED\s+VIEW|VIEW|SEQUENCE)\s+"
    r"(?!IF\s+NOT\s+EXISTS\b)(?:CONCURRENTLY\s+)?(?!ON\b)(\w+)\b",
    re.IGNORECASE,
)


class SqlFile(Protocol):
    name: str  # path under sql/
    sql: str


def created_relations(text: str) -> list[str]:
    """Names of the relations a SQL file creates, in file order (unquoted names fold to lower case)."""
    return [name.lower() for name in _CREATES.findall(_COMMENT.sub("", text))]


def refuse_foreign_objects(conn: psycopg.Connection, pending: Iterable[SqlFile], defs_yaml: Path) -> None:
    """Stop before anything runs when a file not yet applied would create a relation that already exists;
    the refusal names defs_yaml, the component's defs.yaml in use, as where existing views are managed."""
    creators = {name: file for file in pending for name in created_relations(file.sql)}
    if not creators:
        return
    existing = conn.execute(
        """
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND c.relname = ANY(%s)
        """,
        [list(creators)],
    ).fetchall()
    if existing:
        name = next(name for name in creators if name in {row[0] for row in existing})
        raise AnalyticsViewsError(
            f'relation "{name}" already exists and was not created by analytics-views (sql/{creators[name].name} '
            "would create it): use another schema (search_path in DATABASE_URL's options) or manage the existing "
            f"views instead (a defs.yaml with `schemas:` and no `sql_folder`, like {_shown(defs_yaml)}); nothing was changed"
        )


def _shown(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)
