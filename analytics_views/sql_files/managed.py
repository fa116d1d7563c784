"""Which materialized views the project manages and on which cadence: the settings of a
`MaterializedViewsComponent` (its defs.yaml), checked here with one-line errors naming the file and the entry.

The views of a SQL folder (`<sql_folder>/views/*.sql`) are managed when the component names one. Views made
elsewhere are managed when their schema is listed in `schemas` or their name matches one of `names` (exact or
glob, optionally `schema.name`). Cadences are named in `cadences` (a cron and a time zone each; `daily` and
`weekly` are always defined). `cadence` puts views on them by pattern, first match wins: a view of the SQL
folder otherwise keeps its file header's `-- Cadence:`, a discovered view is daily. Definitions learn about
views made elsewhere only from the discovery state (`state_file`), never from the database.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import SQL_DIR

DEFAULT_CADENCE = "daily"
# `target_lag: 15m`: a number and a unit (s, m, h, d). At least 2 minutes: sources are observed every minute.
TARGET_LAG = re.compile(r"\s*(?P<number>\d+)\s*(?P<unit>s|m|min|h|d)\s*")
_LAG_UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days"}
MIN_TARGET_LAG = timedelta(minutes=2)
# A cadence names `<cadence>_refresh_job` and `_schedule` and is a tag value: Dagster names, at most 63 characters.
CADENCE_NAME = re.compile(r"[a-z0-9_]{1,40}")


@dataclass(frozen=True)
class Cadence:
    """When a cadence's views are refreshed: on a cron in a time zone (the schedule's execution_timezone), and/or
    within a target lag of their sources' changes (declarative automation), neither when nothing changed."""

    name: str
    cron: str | None  # None: no schedule, only the target lag
    timezone: str = "UTC"
    where: str = field(default="", compare=False)  # the entry that defines it, for messages
    target_lag: timedelta | None = None  # refresh within this of a source's change; None: the cron only

    @property
    def job_name(self) -> str:
        return f"{self.name}_refresh_job"

    @property
    def schedule_name(self) -> str:
        return f"{self.name}_refresh_schedule"


DEFAULT_CADENCES = {
    "daily": Cadence("daily", "0 3 * * *", where="the default cadence daily"),
    "weekly": Cadence("weekly", "0 4 * * 1", where="the default cadence weekly"),
}


@dataclass(frozen=True)
class ManagedConfig:
    """What a component manages. The defaults are this project's own views on the default cadences."""

    source: Path | None = None  # the defs.yaml it was read from, for messages; None: built in code
    sql_dir: Path | None = SQL_DIR  # views/, tests/ and migrations/ of the views made here; None: no such views
    schemas: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    cadence: tuple[tuple[str, str], ...] = ()  # (pattern, cadence), in file order
    cadences: tuple[Cadence, ...] = tuple(DEFAULT_CADENCES.values())
    data_tests: Path | None = None  # folder of discovered views' data tests, <schema>.<view>/<test>.sql
    state_file: Path | None = None  # the discovery state; None: never discovered

    @property
    def where(self) -> str:
        """How messages name the configuration."""
        return str(self.source) if self.source else "the component's defs.yaml"

    @property
    def project_views(self) -> bool:
        """True when views defined by SQL files (`<sql_dir>/views/`) are managed."""
        return self.sql_dir is not None

    @property
    def views_dir(self) -> Path | None:
        return self.sql_dir / "views" if self.sql_dir else None

    @property
    def migrations_dir(self) -> Path | None:
        """Where the source tables the views read are declared (CREATE TABLE, COMMENT ON), if anywhere."""
        return self.sql_dir / "migrations" if self.sql_dir else None

    @property
    def discovers(self) -> bool:
        """True when views made elsewhere are selected, so a discovery state is needed."""
        return bool(self.schemas or self.names)

    @property
    def cadence_names(self) -> tuple[str, ...]:
        return tuple(cadence.name for cadence in self.cadences)

    def selects(self, schema: str, name: str) -> bool:
        return schema in self.schemas or any(matches(pattern, schema, name) for pattern in self.names)

    def cadence_of(self, schema: str | None, name: str, default: str = DEFAULT_CADENCE) -> str:
        """The first `cadence` pattern matching the view, else `default`. A view of the SQL folder (schema None) is
        matched by its name only: which schema it lives in is known to the database, not to the definitions."""
        return next((cadence for pattern, cadence in self.cadence if matches(pattern, schema, name)), default)


def matches(pattern: str, schema: str | None, name: str) -> bool:
    if "." in pattern:
        return schema is not None and fnmatchcase(f"{schema}.{name}", pattern)
    return fnmatchcase(name, pattern)


def parse_target_lag(text: str, where: str) -> timedelta:
    """`15m`, `2h`, `90s`, `1d` as a timedelta of at least MIN_TARGET_LAG; one line naming the entry otherwise."""
    match = TARGET_LAG.fullmatch(text)
    lag = timedelta(**{_LAG_UNITS[match["unit"]]: int(match["number"])}) if match else None
    if lag is None or lag < MIN_TARGET_LAG:
        raise AnalyticsViewsError(
            f"{where}: target_lag {text!r} is not a lag of at least 2 minutes: write a number and a unit (s, m, h, "
            "d), like 15m (sources are observed every minute)"
        )
    return lag


def _cadence(source: Path, name: str, cron: str | None, timezone: str, target_lag: str | None = None) -> Cadence:
    where = f"{source}: attributes.cadences.{name}"
    if cron is None and target_lag is None:
        raise AnalyticsViewsError(f"{where}: give it a cron, a target_lag, or both")
    if not CADENCE_NAME.fullmatch(name):
        raise AnalyticsViewsError(
            f"{where}: a cadence name is 1 to 40 lowercase letters, digits and _ (it names {name}_refresh_job)"
        )
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise AnalyticsViewsError(
            f"{where}: timezone {timezone!r} is not an IANA time zone; use one like UTC or Europe/Berlin"
        ) from None
    lag = parse_target_lag(target_lag, where) if target_lag is not None else None
    return Cadence(name, cron.strip() if cron is not None else None, timezone, where=where, target_lag=lag)


def managed_config(
    source: Path,
    *,
    sql_dir: Path | None,
    schemas: Sequence[str] = (),
    names: Sequence[str] = (),
    cadences: Mapping[str, tuple[str | None, str] | tuple[str | None, str, str | None]] | None = None,
    cadence: Mapping[str, str] | None = None,
    data_tests: Path | None = None,
    state_file: Path | None = None,
) -> ManagedConfig:
    """The settings of the component configured in `source`, checked: `cadences` maps a name to (cron, time
    zone[, target lag]), `cadence` a view pattern to a cadence name, in file order. Crons are checked by Dagster, where the
    schedules are built (orchestration/cadences.py)."""
    defined = {**DEFAULT_CADENCES, **{n: _cadence(source, n, *entry) for n, entry in (cadences or {}).items()}}
    for pattern, name in (cadence or {}).items():
        if name not in defined:
            raise AnalyticsViewsError(
                f"{source}: attributes.cadence {pattern!r}: {name!r} names no cadence; use one of "
                f"{', '.join(defined)} or define it under attributes.cadences"
            )
    if sql_dir is not None and not (sql_dir / "views").is_dir():
        raise AnalyticsViewsError(
            f"{source}: attributes.sql_folder {sql_dir} has no views/ folder: point it at the folder holding "
            "views/*.sql (relative to the defs.yaml), or remove it"
        )
    return ManagedConfig(
        source=source,
        sql_dir=sql_dir,
        schemas=tuple(schemas),
        names=tuple(names),
        cadence=tuple((cadence or {}).items()),
        cadences=tuple(defined.values()),
        data_tests=data_tests,
        state_file=state_file,
    )
