"""The analytics database as a Dagster resource, configured from the environment."""

from contextlib import contextmanager
from typing import Iterator

import dagster as dg
import psycopg
from pydantic import Field

from analytics_views.postgres.database import APPLICATION_NAME, connect
from analytics_views.errors import AnalyticsViewsError
from analytics_views.postgres.refresh import RefreshSettings


class AnalyticsDatabase(dg.ConfigurableResource):
    """The PostgreSQL database holding the source tables and the materialized views."""

    url: str = Field(description="libpq URL of the analytics database, normally from DATABASE_URL.")
    lock_timeout_s: float = Field(
        default=RefreshSettings.lock_timeout_s,
        description="Longest wait, in seconds, for a view's lock or for another refresh of the same view.",
    )
    statement_timeout_s: float = Field(
        default=RefreshSettings.statement_timeout_s,
        description="Longest refresh, in seconds, before PostgreSQL cancels it.",
    )

    skip_unchanged: bool = Field(
        default=True,
        description="Skip the refresh of a populated view when none of its sources changed since its last refresh.",
    )
    work_mem_mb: int | None = Field(
        default=RefreshSettings.work_mem_mb,
        description="Memory, in MB, for each sort or hash of a refresh (work_mem, set for the refresh only); "
        "unset keeps the server's work_mem.",
    )

    refresh_connections: int = Field(
        default=4,
        ge=1,
        description="Connections (each on a thread of the run's step) refreshing a run's views at the same time; "
        "each view waits for the views it reads.",
    )

    timezone: str = Field(
        default=RefreshSettings.timezone,
        description="TimeZone every refresh runs under (SET LOCAL), whatever the connection's, role's or "
        "database's: date(), ::date and current_date in a view's SQL follow it. A name from pg_timezone_names.",
    )

    @property
    def refresh_settings(self) -> RefreshSettings:
        return RefreshSettings(
            lock_timeout_s=self.lock_timeout_s,
            statement_timeout_s=self.statement_timeout_s,
            work_mem_mb=self.work_mem_mb,
            timezone=self.timezone,
        )

    @contextmanager
    def connection(self, application_name: str = APPLICATION_NAME) -> Iterator[psycopg.Connection]:
        try:
            conn = connect(self.url, autocommit=True, application_name=application_name)
        except AnalyticsViewsError as error:  # a bad URL, login or database: retrying cannot fix it
            if getattr(error, "transient", False):
                raise
            raise dg.Failure(str(error), allow_retries=False) from None
        with conn:
            if conn.info.server_version >= 140000:
                # A killed run worker's backend would otherwise wait on in its query, holding the view's
                # advisory lock, until the query ends: with this, PostgreSQL ends it within a second.
                conn.execute("SET client_connection_check_interval = '1s'")
            yield conn
