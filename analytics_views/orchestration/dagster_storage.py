"""Dagster's run, event-log and schedule storage in PostgreSQL, always on the psycopg2 driver.

dagster-postgres is written for psycopg2 (its event watcher sends `NOTIFY run_events, %(notify_id)s`).
With psycopg 3 installed, SQLAlchemy 2.1 resolves a plain `postgresql://` URL to psycopg 3, and the daemon
then fails on every event with `syntax error at or near "$1"`. This storage pins the driver whatever URL
form the user gives; dagster.yaml names it as a custom storage.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from dagster._core.storage.config import PostgresStorageConfig
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

from analytics_views.postgres.database import connect, parse_url

STORAGE_VARIABLE = "DAGSTER_POSTGRES_URL"
STORAGE_CHECK_TIMEOUT_S = 5


def psycopg2_url(url: str, variable: str = STORAGE_VARIABLE) -> str:
    """The same URL with SQLAlchemy's psycopg2 driver named explicitly (a one-line error if it does not parse)."""
    return parse_url(url, variable).sqlalchemy("psycopg2")


def storage_url(dagster_yaml: Path, environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(variable, URL) of the PostgreSQL storage that dagster.yaml configures, when it names one by `env:`
    and that variable is set; None otherwise (Dagster then reports what is missing)."""
    if not dagster_yaml.is_file():
        return None
    storage = (yaml.safe_load(dagster_yaml.read_text()) or {}).get("storage") or {}
    config = (storage.get("custom") or {}).get("config") or storage.get("postgres") or {}
    source = config.get("postgres_url") if isinstance(config, dict) else None
    variable = source.get("env") if isinstance(source, dict) else None
    if not isinstance(variable, str) or not environ.get(variable, "").strip():
        return None
    return variable, environ[variable]


def check_storage(dagster_home: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> None:
    """Connect once to Dagster's storage database: a wrong URL is one line naming what failed (auth, host,
    database) and the fix, instead of the page of retries dagster-postgres logs before it gives up."""
    found = storage_url(Path(dagster_home) / "dagster.yaml", environ)
    if found is None:
        return
    variable, url = found
    with connect(
        url,
        variable=variable,
        purpose="Dagster's storage database",
        connect_timeout=STORAGE_CHECK_TIMEOUT_S,
        application_name="analytics-views storage check",
    ):
        pass


class Psycopg2PostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage whose SQLAlchemy engines always use psycopg2."""

    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: PostgresStorageConfig
    ) -> "Psycopg2PostgresStorage":
        return cls(
            inst_data=inst_data,
            postgres_url=psycopg2_url(pg_url_from_config(config_value)),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
