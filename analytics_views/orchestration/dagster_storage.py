"""Dagster's run, event-log and schedule storage: dagster-postgres's storage, configured in dagster.yaml
(`storage: custom:` naming PooledPostgresStorage below, or dagster-postgres's own `storage: postgres:`), with
its URL checked once before Dagster loads it.

dagster-postgres is written for psycopg2: its event log sends `NOTIFY run_events, %(notify_id)s`, which
psycopg 3 rejects (`syntax error at or near "$1"`) on every event (dagster-io/dagster#33958). SQLAlchemy 2.1
maps a plain `postgresql://` URL to psycopg 3, so pyproject.toml keeps SQLAlchemy below 2.1, where it still
means psycopg2; a URL naming another driver is refused here in one line.
"""

import os
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

import yaml
from dagster_postgres import DagsterPostgresStorage, PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.pool import QueuePool

from analytics_views.errors import AnalyticsViewsError
from analytics_views.postgres.database import connect, parse_url

STORAGE_VARIABLE = "DAGSTER_POSTGRES_URL"
STORAGE_DRIVER = "psycopg2"
STORAGE_CHECK_TIMEOUT_S = 5
# The pool each process keeps (dagster-postgres's webserver pool: one connection held, more opened while busy).
POOL_RECYCLE_S = 3600  # dagster-webserver's --db-pool-recycle default
POOL_MAX_OVERFLOW = 20  # dagster-webserver's --db-pool-max-overflow default
NO_STATEMENT_TIMEOUT = 0  # as dagster-postgres's unpooled connections (the webserver sets 15 s for its reads)
PING_AFTER_IDLE_S = 1.0
_RETURNED_AT = "analytics_views_returned_at"  # in SQLAlchemy's per-connection info dict


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    """dagster-postgres's event log, asking the catalog once per process whether a table it found exists.

    Upstream asks on every asset and check event (dagster-io/dagster#34058), and on a second connection while
    the event's transaction holds the first: on a pool of one held connection, that second one was opened and
    closed again for every event (a connection a view per run, the run worker's largest single cost at 500
    views). A table that exists stays: only a table found is remembered.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tables_found: set[str] = set()

    def has_table(self, table_name: str) -> bool:
        if table_name in self._tables_found:
            return True
        found = super().has_table(table_name)
        if found:
            self._tables_found.add(table_name)
        return found


class PooledPostgresStorage(DagsterPostgresStorage):
    """dagster-postgres's storage on a pool of connections in every process that loads the instance (the CLI,
    the daemon, the run worker), not only in the webserver.

    Outside the webserver dagster-postgres opens a new connection for every query (NullPool): every event a run
    writes cost a connection, about 10 a view per run (docs/benchmarks.md, *Scale*). dagster.yaml has no pool
    setting (dagster-io/dagster#33935, open pull request #33936; dagster-io/dagster#20325), so this class asks
    each storage for the pool the webserver gives itself, through the storages' public `optimize_for_webserver`,
    and keeps its event log from opening a second connection per event (PooledPostgresEventLogStorage).
    Configured in dagster.yaml as `storage: custom: {module: analytics_views.orchestration.dagster_storage,
    class: PooledPostgresStorage, config: <the postgres: block's settings>}`.
    """

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data=None, token_provider=None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._pooled_event_log = PooledPostgresEventLogStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        for part in (self.run_storage, self._pooled_event_log, self.schedule_storage):
            part.optimize_for_webserver(
                statement_timeout=NO_STATEMENT_TIMEOUT, pool_recycle=POOL_RECYCLE_S, max_overflow=POOL_MAX_OVERFLOW
            )

    @property
    def event_log_storage(self) -> PostgresEventLogStorage:
        return self._pooled_event_log

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(
            pg_url_from_config(config_value),
            config_value.get("should_autocreate_tables", True),
            inst_data,
            get_token_provider_from_config(config_value),
        )


@event.listens_for(QueuePool, "checkin")
def _note_return(dbapi_connection, connection_record) -> None:
    connection_record.info[_RETURNED_AT] = time.monotonic()


@event.listens_for(QueuePool, "checkout")
def _ping_pooled_connection(dbapi_connection, connection_record, connection_proxy) -> None:
    """A held connection the storage server dropped (a restart) is replaced before use, as a new connection
    would have been: SQLAlchemy's pessimistic disconnect handling (the engine's pool_pre_ping, which
    optimize_for_webserver does not set), for a connection idle for over PING_AFTER_IDLE_S (one used a moment
    ago is alive, and a run writes its events back to back)."""
    if time.monotonic() - connection_record.info.get(_RETURNED_AT, 0.0) < PING_AFTER_IDLE_S:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as error:  # psycopg2's OperationalError/InterfaceError: the connection is gone
        raise DisconnectionError(str(error)) from error


def storage_driver(url: str) -> str | None:
    """The SQLAlchemy driver dagster-postgres's engines will use for url; None when SQLAlchemy has no dialect
    for its scheme (`postgres://`, a driver that does not exist)."""
    try:
        return make_url(url.strip()).get_dialect().driver
    except (ArgumentError, NoSuchModuleError):
        return None


def _sqlalchemy_host(url: str) -> str | None:
    try:
        return make_url(url.strip()).host
    except ArgumentError:
        return None


def check_storage_url(url: str, variable: str = STORAGE_VARIABLE) -> None:
    """A URL that does not parse, or that would run Dagster's storage on another driver than psycopg2, is
    one line naming the fix (quoting nothing of the URL but its scheme, host, port and database)."""
    parse_url(url, variable)
    host = _sqlalchemy_host(url)
    if host and "%2f" in host.lower():
        # libpq decodes a percent-encoded socket directory in the host; SQLAlchemy keeps it as a host name.
        raise AnalyticsViewsError(
            f"{variable} names a Unix socket directory in its host ({host}), which SQLAlchemy, and so "
            f"dagster-postgres, reads as a host name: write it as postgresql://USER@/DATABASE?host={unquote(host)}"
        )
    driver = storage_driver(url)
    if driver == STORAGE_DRIVER:
        return
    scheme = url.strip().split("://", 1)[0]
    forms = ("postgresql://", f"postgresql+{STORAGE_DRIVER}://")
    fixes = [form for form in forms if storage_driver(form) == STORAGE_DRIVER]  # plain only below SQLAlchemy 2.1
    selects = f"which selects SQLAlchemy's {driver} driver" if driver else "which SQLAlchemy cannot load"
    raise AnalyticsViewsError(
        f"{variable} starts with {scheme}://, {selects}; dagster-postgres needs {STORAGE_DRIVER}: "
        f"start it with {' or '.join(fixes)}"
    )


def storage_url(dagster_yaml: Path, environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(variable, URL) of the PostgreSQL storage that dagster.yaml configures (`storage: postgres:
    postgres_url: env: VARIABLE`, or the same under `storage: custom: config:`), when that variable is set;
    None otherwise (Dagster then reports what is missing)."""
    if not dagster_yaml.is_file():
        return None
    storage = (yaml.safe_load(dagster_yaml.read_text()) or {}).get("storage") or {}
    if not isinstance(storage, dict):
        return None
    custom = storage.get("custom")
    config = custom.get("config") if isinstance(custom, dict) else storage.get("postgres")
    source = config.get("postgres_url") if isinstance(config, dict) else None
    variable = source.get("env") if isinstance(source, dict) else None
    if not isinstance(variable, str) or not environ.get(variable, "").strip():
        return None
    return variable, environ[variable]


def check_storage(dagster_home: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> None:
    """Check the storage URL's form and connect once to Dagster's storage database: a wrong URL is one line
    naming what failed (driver, auth, host, database) and the fix, instead of the page of retries
    dagster-postgres logs before it gives up."""
    found = storage_url(Path(dagster_home) / "dagster.yaml", environ)
    if found is None:
        return
    variable, url = found
    check_storage_url(url, variable)
    with connect(
        url,
        variable=variable,
        purpose="Dagster's storage database",
        connect_timeout=STORAGE_CHECK_TIMEOUT_S,
        application_name="analytics-views storage check",
    ):
        pass
