"""Connections to the analytics database, and what the PostgreSQL catalog says about a view."""

import os
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

import psycopg
from psycopg import sql

from analytics_views.errors import AnalyticsViewsError

APPLICATION_NAME = "analytics-views"

_SCHEME = re.compile(r"^(postgres(?:ql)?)(\+\w+)?://")
_ENCODE_HINT = "percent-encode the user name and password, e.g. urllib.parse.quote(password, safe='')"
# What a host, port and database look like: only these are ever quoted back from a URL that does not parse.
_PLAIN_TAIL = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*)(?::(?P<port>\d+))?(?:/(?P<dbname>[\w.$-]*))?(?:\?.*)?$")


@dataclass(frozen=True)
class ParsedUrl:
    """A PostgreSQL URL read the way libpq reads it, and the forms other clients need."""

    variable: str
    libpq: str  # postgresql://..., SQLAlchemy's +driver removed; otherwise as given
    params: dict[str, str]  # what libpq reads from it (user, password, host, port, dbname, options, ...)

    @property
    def host(self) -> str:
        return self.params.get("host") or "localhost"

    @property
    def port(self) -> str:
        return self.params.get("port") or "5432"

    @property
    def dbname(self) -> str:
        return self.params.get("dbname") or self.params.get("user") or ""

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def password(self) -> str | None:
        return self.params.get("password")

    def target(self) -> str:
        """host:port/dbname, for messages: never the user's password."""
        if self.host.startswith("/"):
            return f"{self.dbname} on the socket in {self.host}"
        return f"{self.host}:{self.port}/{self.dbname}"

    def sqlalchemy(self, driver: str) -> str:
        """The URL for SQLAlchemy with `driver` named: SQLAlchemy reads it as libpq does (checked by parse_url)."""
        return f"postgresql+{driver}://" + self.libpq.split("://", 1)[1]

    def with_database(self, dbname: str) -> str:
        """The same server URL pointing at another database."""
        rest = self.libpq.split("://", 1)[1]
        at = rest.find("@") + 1  # 0 without credentials
        authority_end = min((i for i in (rest.find("/", at), rest.find("?", at)) if i >= 0), default=len(rest))
        query = rest[authority_end:].partition("?")[2]
        return f"postgresql://{rest[:authority_end]}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


def _unparsable(variable: str, rest: str, problem: str) -> AnalyticsViewsError:
    """One line naming the problem and what of the URL can safely be told: host, port, database."""
    head, at, tail = rest.rpartition("@")
    plain = _PLAIN_TAIL.match(tail) if at and "=" not in head else None  # a query's '@' could precede anything
    told = []
    if plain:
        told += [f"host {plain['host']}"] if plain["host"] else []
        told += [f"port {plain['port']}"] if plain["port"] else []
        told += [f"database {plain['dbname']}"] if plain["dbname"] else []
    where = f" ({', '.join(told)})" if told else ""
    return AnalyticsViewsError(f"{variable}{where} {problem}: {_ENCODE_HINT}, in postgresql://user:password@host:5432/dbname")


def parse_url(url: str, variable: str = "DATABASE_URL") -> ParsedUrl:
    """The one reader of database URLs: a URL that libpq and SQLAlchemy would read differently, or that
    does not parse, is a one-line error quoting nothing of it but host, port and database."""
    url = url.strip()
    scheme = _SCHEME.match(url)
    if not scheme:
        raise AnalyticsViewsError(f"{variable} is not a PostgreSQL URL: use postgresql://user:password@host:5432/dbname")
    rest = url[scheme.end() :]
    # libpq ends the credentials at the first '@' before any '/', SQLAlchemy at the last '@': an unencoded
    # '@' or '/' in a password makes them disagree, and libpq would take a piece of it for a host or port.
    if rest.count("@") > 1 or ("@" in rest and "/" in rest[: rest.index("@")]):
        raise _unparsable(variable, rest, "has an @ or / that is not percent-encoded")
    libpq = "postgresql://" + rest
    try:
        params = psycopg.conninfo.conninfo_to_dict(libpq)
    except psycopg.ProgrammingError:
        raise _unparsable(variable, rest, "is not a valid PostgreSQL URL") from None  # psycopg quotes the URL
    port = params.get("port")
    if port and not all(part.isdigit() for part in str(port).split(",")):
        if "@" not in rest:  # without credentials, user:password@ may have been mistaken for host:port
            raise _unparsable(variable, rest, "has a port that is not a number")
        raise AnalyticsViewsError(f"{variable} has port {port!r}, which is not a number: fix the URL's :PORT part")
    return ParsedUrl(variable=variable, libpq=libpq, params={k: str(v) for k, v in params.items()})


def libpq_url(url: str) -> str:
    """The URL as libpq reads it: SQLAlchemy's `postgresql+driver://` forms are accepted too."""
    return parse_url(url).libpq


def describe_target(url: str) -> str:
    """host:port/dbname of a URL or of a connection's dsn (key=value, no password), for messages."""
    if "://" in url:
        try:
            return parse_url(url).target()
        except AnalyticsViewsError:
            return "<unparsable URL>"
    return ParsedUrl("dsn", "", {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(url).items()}).target()


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    return parse_url(url).with_database(dbname)


def database_url_from_env(variable: str = "DATABASE_URL") -> str:
    url = os.environ.get(variable, "").strip()
    if not url:
        raise AnalyticsViewsError(
            f"{variable} is not set: export {variable}=postgresql://user@host:5432/dbname "
            "(or run `analytics-views dev`, which starts an embedded server)"
        )
    return url


_REDACTED = "***"
_SHORTEST_SECRET_PIECE = 4  # shorter runs of a password are too common in ordinary text to hide


def _password_forms(url: str) -> set[str]:
    """Every form a URL's password could take in text, even when the URL does not parse: as libpq and
    SQLAlchemy would cut it, raw, percent-decoded and percent-encoded."""
    scheme = _SCHEME.match(url.strip())
    rest = url.strip()[scheme.end() :] if scheme else url.strip()
    raw = set(re.findall(r"password=([^&\s]*)", rest))
    if "@" in rest:
        for userinfo in (rest[: rest.find("@")], rest[: rest.rfind("@")]):
            if ":" in userinfo:
                raw.add(userinfo.partition(":")[2])
    try:
        raw.add(psycopg.conninfo.conninfo_to_dict("postgresql://" + rest).get("password") or "")
    except psycopg.ProgrammingError:
        pass
    forms = {form for password in raw for form in (password, unquote(password), quote(unquote(password), safe=""))}
    return {form for form in forms if len(form) >= _SHORTEST_SECRET_PIECE}


def redact(text: str, *urls: str) -> str:
    """text with every run of 4 or more characters taken from a URL's password replaced by ***."""
    windows = {
        form[i : i + _SHORTEST_SECRET_PIECE]
        for url in urls
        for form in _password_forms(url)
        for i in range(len(form) - _SHORTEST_SECRET_PIECE + 1)
    }
    if not windows:
        return text
    hidden = [False] * len(text)
    for i in range(len(text) - _SHORTEST_SECRET_PIECE + 1):
        if text[i : i + _SHORTEST_SECRET_PIECE] in windows:
            hidden[i : i + _SHORTEST_SECRET_PIECE] = [True] * _SHORTEST_SECRET_PIECE
    pieces = re.finditer(r"(1+)|(0+)", "".join("1" if h else "0" for h in hidden))
    return "".join(_REDACTED if piece[1] else text[piece.start() : piece.end()] for piece in pieces)


class ConnectionFailure(AnalyticsViewsError):
    """A server that could not be reached or refused us; `transient` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def _failure(error: psycopg.OperationalError, parsed: ParsedUrl, timeout_s: int) -> tuple[str, str, bool]:
    """(what failed, the fix, transient) for a connection error, from libpq's text (it gives no SQLSTATE)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    failed = next((line.rpartition("failed: ")[2] for line in lines if "failed: " in line), lines[0] if lines else "")
    reason = re.sub(r"^(FATAL|ERROR):\s+", "", failed) or type(error).__name__
    variable = parsed.variable
    if re.search(r"password authentication failed|authentication failed|no pg_hba\.conf entry|role .* does not exist|"
                 r"password is required|no password supplied", text):
        return reason, f"check {variable}'s user and password ({_ENCODE_HINT})", False
    if re.search(r'database ".*" does not exist', text):
        return reason, f"check {variable}'s database name, or create the database on that server", False
    if re.search(r"failed to resolve host|could not translate host name|Name or service not known", text):
        host = parsed.host
        return f"unknown host {host!r}", f"check {variable}'s host name", False
    if "timeout expired" in text or "timed out" in text:
        return f"no answer within {timeout_s} s", f"check {variable}'s host and port, and that the server is running", True
    if "Connection refused" in text or "No such file or directory" in text:
        return reason, f"check {variable}'s host and port, and that the server is running", True
    return reason, f"check {variable} and that the server is running", True


def connect(
    url: str,
    *,
    application_name: str = APPLICATION_NAME,
    variable: str = "DATABASE_URL",
    purpose: str = "the analytics database",
    connect_timeout: int = 10,
    **kwargs,
) -> psycopg.Connection:
    """A connection labelled for DBAs, with a one-line error naming what failed (URL, auth, host, database)."""
    parsed = parse_url(url, variable)
    try:
        return psycopg.connect(
            parsed.libpq, application_name=application_name[:63], connect_timeout=connect_timeout, **kwargs
        )
    except psycopg.OperationalError as error:
        reason, fix, transient = _failure(error, parsed, connect_timeout)
        raise ConnectionFailure(  # no exception chained: its text could quote the server's view of the URL
            redact(f"cannot connect to {purpose} at {parsed.target()} ({reason}): {fix}", url), transient=transient
        ) from None


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
    kind: str = "materialized view"  # what the name is now: a discovered view may have been replaced since

    @property
    def is_materialized_view(self) -> bool:
        return self.kind == "materialized view"


# pg_class.relkind, named as a message names it.
RELATION_KINDS = {
    "r": "table", "p": "partitioned table", "v": "plain view", "m": "materialized view", "f": "foreign table",
    "S": "sequence", "c": "composite type", "i": "index", "I": "partitioned index", "t": "TOAST table",
}


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
               coalesce(pg_total_relation_size(to_regclass(%(rel)s)), 0),
               (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%(rel)s))
        """,
        {"view": view, "schema": schema, "rel": rel},
    ).fetchone()
    exists, populated, size_bytes, relkind = row
    index = conn.execute(_USABLE_UNIQUE_INDEX, {"view": rel}).fetchone() if exists else None
    return ViewState(
        name=view,
        exists=exists,
        populated=populated,
        unique_index=index[0] if index else None,
        size_bytes=size_bytes,
        size_pretty=conn.execute("SELECT pg_size_pretty(%s::bigint)", [size_bytes]).fetchone()[0],
        kind=RELATION_KINDS.get(relkind, f"relation of kind {relkind!r}") if exists else "materialized view",
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
