"""Dagster's run, event-log and schedule storage in PostgreSQL, always on the psycopg2 driver.

dagster-postgres is written for psycopg2 (its event watcher sends `NOTIFY run_events, %(notify_id)s`).
With psycopg 3 installed, SQLAlchemy 2.1 resolves a plain `postgresql://` URL to psycopg 3, and the daemon
then fails on every event with `syntax error at or near "$1"`. This storage pins the driver whatever URL
form the user gives; dagster.yaml names it as a custom storage.
"""

import re

from dagster._core.storage.config import PostgresStorageConfig
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://")


def psycopg2_url(url: str) -> str:
    """The same URL with SQLAlchemy's psycopg2 driver named explicitly."""
    if not _SCHEME.match(url):
        raise ValueError("DAGSTER_POSTGRES_URL must start with postgresql:// (or postgres://)")
    return _SCHEME.sub("postgresql+psycopg2://", url, count=1)


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
