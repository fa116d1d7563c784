"""A real PostgreSQL server for the tests, and a fresh database for each test.

The server is ANALYTICS_TEST_DATABASE_URL when set (any server where that role may CREATE DATABASE),
otherwise an embedded PostgreSQL started once for the session and stopped at its end.
"""

import os
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from analytics_views.postgres.database import libpq_url, with_database
from analytics_views.postgres.embedded import embedded_server
from analytics_views.operations.migrate import migrate
from analytics_views.postgres.refresh import refresh_view
from analytics_views.operations.seed import seed
from analytics_views.operations.services import prepare_dagster_home

# A test run started as a background job of a script (`nohup ... &`, some CI runners) inherits SIGINT ignored,
# and so would every process it starts, where Dagster points SIGTERM at SIGINT's handler: runs, code servers and
# their log-capturing `tail`s would ignore both. The tests start from what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def server_directory() -> Iterator[Path]:
    """A folder for an embedded server's data, outside pytest's tmp root: the server runs as another
    user, and pytest resets its root to mode 700 whenever a pytest session starts."""
    with tempfile.TemporaryDirectory(prefix="analytics-views-test-") as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a maintenance database on the test server."""
    if url := os.environ.get("ANALYTICS_TEST_DATABASE_URL"):
        yield url
        return
    with server_directory() as folder, embedded_server(folder / "postgres") as url:
        yield url


class DatabaseFactory:
    """Creates uniquely named databases on the test server and drops them all at the end."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.names: list[str] = []

    def _admin(self, statement: sql.Composable) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(statement)

    def create(self, template: str | None = None) -> str:
        name = f"av_test_{uuid.uuid4().hex[:12]}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self._admin(statement)
        self.names.append(name)
        return with_database(self.server_url, name)

    def drop_all(self) -> None:
        for name in reversed(self.names):
            self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_name(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


@pytest.fixture(scope="session")
def databases(postgres_url) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_url)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def migrated_template(databases) -> str:
    url = databases.create()
    migrate(url)
    return database_name(url)


@pytest.fixture(scope="session")
def seeded_template(databases) -> str:
    url = databases.create()
    migrate(url)
    seed(url, users=400, seed=7)
    return database_name(url)


PRODUCT_SCHEMA = Path(__file__).parent / "fixtures" / "product_schema.sql"


@pytest.fixture
def product_db(databases) -> str:
    """URL of a fresh database holding another team's product schema and views (fixtures/product_schema.sql):
    weekly partitions, inheritance, a view over the partitions, views over views, a nullable key, a fan-out,
    session-time-zone buckets and a window over now(); its views populated once."""
    url = databases.create()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PRODUCT_SCHEMA.read_text())
    return url


@pytest.fixture
def empty_db(databases) -> str:
    """URL of a fresh, empty database."""
    return databases.create()


@pytest.fixture
def migrated_db(databases, migrated_template) -> str:
    """URL of a fresh database with every migration and view applied (views unpopulated, tables empty)."""
    return databases.create(template=migrated_template)


@pytest.fixture
def seeded_db(databases, seeded_template) -> str:
    """URL of a fresh migrated database holding a small seeded demo data set (views unpopulated)."""
    return databases.create(template=seeded_template)


DEPLOYMENT_PASSWORD = "E2e-pw-never-logged"


def with_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{DEPLOYMENT_PASSWORD}@{host}"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dagster_env(seeded_db, empty_db, tmp_path, monkeypatch) -> dict[str, str]:
    """The environment of a deployment: a seeded analytics database and Dagster storage in PostgreSQL,
    set in this process too (so in-process runs land in the same instance) and returned for services."""
    # A plain postgresql:// URL on purpose: the form that breaks dagster-postgres on psycopg 3. The servers
    # trust these connections and ignore the password, which must still reach no log.
    env = {
        **os.environ,
        "DATABASE_URL": with_password(seeded_db),
        "DAGSTER_POSTGRES_URL": with_password(libpq_url(empty_db)),
        "DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "dagster_home")),
    }
    for name in ("DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME"):
        monkeypatch.setenv(name, env[name])
    return env


@pytest.fixture
def dagster_instance(empty_db, tmp_path, monkeypatch) -> dict[str, str]:
    """A persistent Dagster instance on PostgreSQL storage, set in this process's environment: what
    `analytics-views refresh` records its runs in."""
    env = {"DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "dagster_home")), "DAGSTER_POSTGRES_URL": libpq_url(empty_db)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def refreshed_db(seeded_db) -> str:
    """A seeded database whose views have been populated once."""
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        for view in ("daily_aggregations", "cohort_aggregations", "campaign_aggregations", "weekly_aggregations"):
            refresh_view(conn, view)
    return seeded_db
