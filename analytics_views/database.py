"""Connections to the analytics database, and what the PostgreSQL catalog says about a view."""

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from analytics_views.errors import AnalyticsViewsError

APPLICATION_NAME = "analytics-views"

_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+\w+://")


def libpq_url(url: str) -> str:
    """The URL as libpq reads it: SQLAlchemy's `postgresql+driver://` forms are accepted too."""
    return _DRIVER_SUFFIX.sub(r"\1://", url.strip())


def describe_target(url: str) -> str:
    """host:port/dbname of a URL, for messages: never the user's password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(libpq_url(url))
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    host = params.get("host") or "localhost"
    dbname = params.get("dbname") or params.get("user") or ""
    if host.startswith("/"):
        return f"{dbname} on the socket in {host}"
    return f"{host}:{params.get('port') or '5432'}/{dbname}"


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(path="/" + dbname))


def database_url_from_env(variable: str = "DATABASE_URL") -> str:
    url = os.environ.get(variable, "").strip()
    if not url:
        raise AnalyticsViewsError(
            f"{variable} is not set: export {variable}=postgresql://user@host:5432/dbname "
            "(or run `analytics-views dev`, which starts an embedded server)"
        )
    return url


def redact(text: str, url: str) -> str:
    """text with the URL's password replaced, for messages that might quote it."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(libpq_url(url)).get("password")
    except psycopg.ProgrammingError:
        password = urlsplit(url).password if "://" in url else None
    return text.replace(password, "***") if password else text


def connect(url: str, *, application_name: str = APPLICATION_NAME, **kwargs) -> psycopg.Connection:
    """A connection labelled for DBAs, with a clear one-line error when the server can't be reached."""
    url = libpq_url(url)
    if not url.startswith(("postgresql://", "postgres://")):
        raise AnalyticsViewsError(
            "DATABASE_URL is not a PostgreSQL URL: use postgresql://user:password@host:5432/dbname"
        )
    try:
        port = psycopg.conninfo.conninfo_to_dict(url).get("port")
        if port and not all(part.isdigit() for part in str(port).split(",")):
            raise AnalyticsViewsError(f"DATABASE_URL has port {port!r}, which is not a number: fix the URL's :PORT part")
        return psycopg.connect(url, application_name=application_name[:63], connect_timeout=10, **kwargs)
    except psycopg.ProgrammingError as error:
        raise AnalyticsViewsError(
            "DATABASE_URL is not a valid PostgreSQL URL: use postgresql://user:password@host:5432/dbname"
        ) from error
    except psycopg.OperationalError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = redact(lines[-1].removeprefix("FATAL:").strip() if lines else type(error).__name__, url)
        raise AnalyticsViewsError(
            f"cannot connect to the analytics database at {describe_target(url)} ({reason}): "
            "check DATABASE_URL and that the server is running"
        ) from error


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str | None


@dataclass(frozen=True)
class ViewState:
    name: str
    exists: bool
    populated: bool
    unique_index: str | None  # an index REFRESH ... CONCURRENTLY can use
    size_bytes: int
    size_pretty: str


# What PostgreSQL's is_usable_unique_index() accepts for REFRESH ... CONCURRENTLY: a valid, immediate,
# unique btree index with no WHERE clause whose keys are all plain columns (attnum > 0).
_USABLE_UNIQUE_INDEX = """
SELECT i.indexrelid::regclass::text
FROM pg_index AS i
JOIN pg_class AS ic ON ic.oid = i.indexrelid
JOIN pg_am AS am ON am.oid = ic.relam
WHERE i.indrelid = %(view)s::regclass
  AND i.indisunique AND i.indimmediate AND i.indisvalid
  AND am.amname = 'btree'
  AND i.indpred IS NULL
  AND i.indexprs IS NULL
  AND i.indnkeyatts > 0
  AND 0 <> ALL ((i.indkey::int2[])[0:i.indnkeyatts - 1])
ORDER BY ic.relname
LIMIT 1
"""


def relation_text(conn: psycopg.Connection, relation: str, schema: str | None = None) -> str:
    """The relation as regclass input: the bare name (found on search_path), or "schema"."name" quoted."""
    return relation if schema is None else sql.Identifier(schema, relation).as_string(conn)


def view_state(conn: psycopg.Connection, view: str, schema: str | None = None) -> ViewState:
    """The view's catalog state; `schema` None means the one search_path finds (the project's views)."""
    rel = relation_text(conn, view, schema)
    row = conn.execute(
        """
        SELECT to_regclass(%(rel)s) IS NOT NULL,
               coalesce((SELECT ispopulated FROM pg_matviews
                         WHERE schemaname = coalesce(%(schema)s, current_schema()) AND matviewname = %(view)s), false),
               coalesce(pg_total_relation_size(to_regclass(%(rel)s)), 0)
        """,
        {"view": view, "schema": schema, "rel": rel},
    ).fetchone()
    exists, populated, size_bytes = row
    index = conn.execute(_USABLE_UNIQUE_INDEX, {"view": rel}).fetchone() if exists else None
    return ViewState(
        name=view,
        exists=exists,
        populated=populated,
        unique_index=index[0] if index else None,
        size_bytes=size_bytes,
        size_pretty=conn.execute("SELECT pg_size_pretty(%s::bigint)", [size_bytes]).fetchone()[0],
    )


def row_count(conn: psycopg.Connection, view: str, schema: str | None = None) -> int:
    name = sql.Identifier(view) if schema is None else sql.Identifier(schema, view)
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()[0]


def columns(conn: psycopg.Connection, relation: str, schema: str | None = None) -> list[Column]:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), col_description(a.attrelid, a.attnum)
        FROM pg_attribute AS a
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        [relation_text(conn, relation, schema)],
    ).fetchall()
    return [Column(*row) for row in rows]


def qualified_name(conn: psycopg.Connection, relation: str, schema: str | None = None) -> str:
    """database.schema.relation, the form Dagster's `dagster/table_name` expects."""
    database, current = conn.execute("SELECT current_database(), current_schema()").fetchone()
    return ".".join((database, schema or current, relation))
