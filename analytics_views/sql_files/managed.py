"""Which materialized views the project manages and on which cadence, from `views.toml` (or the file
ANALYTICS_VIEWS_CONFIG names).

The project's own views (`sql/views/`) are managed unless `project_views = false`. Views made elsewhere are
managed when their schema is listed in `schemas` or their name matches one of `names` (exact or glob,
optionally `schema.name`). Cadences are named in `[cadences]` (a cron and a time zone each; `daily` and
`weekly` are always defined). The `[cadence]` table puts views on them by pattern, first match wins: a
project view otherwise keeps its file header's `-- Cadence:`, a discovered view is daily. Definitions learn
about views made elsewhere only from the state file `analytics-views discover` writes, never from the database.
"""

import os
import re
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "views.toml"
CONFIG_ENV = "ANALYTICS_VIEWS_CONFIG"
DEFAULT_CADENCE = "daily"
_KEYS = {"project_views", "schemas", "names", "cadences", "cadence", "state_file", "data_tests"}
# A cadence names `<cadence>_refresh_job` and `_schedule` and is a tag value: Dagster names, at most 63 characters.
CADENCE_NAME = re.compile(r"[a-z0-9_]{1,40}")
_CADENCE_KEYS = {"cron", "timezone"}


@dataclass(frozen=True)
class Cadence:
    """When a cadence's job runs: a cron in a time zone (the schedule's execution_timezone)."""

    name: str
    cron: str
    timezone: str = "UTC"
    where: str = field(default="", compare=False)  # the entry that defines it, for messages


DEFAULT_CADENCES = {
    "daily": Cadence("daily", "0 3 * * *", where="the default cadence daily"),
    "weekly": Cadence("weekly", "0 4 * * 1", where="the default cadence weekly"),
}


@dataclass(frozen=True)
class ManagedConfig:
    path: Path | None  # None: no file, today's defaults
    project_views: bool = True
    schemas: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    cadence: tuple[tuple[str, str], ...] = ()  # (pattern, cadence), in file order
    state_file: Path = field(default=PROJECT_ROOT / "state" / "discovered_views.json")
    cadences: tuple[Cadence, ...] = tuple(DEFAULT_CADENCES.values())
    data_tests: Path | None = None  # folder of discovered views' data tests, <schema>.<view>/<test>.sql

    @property
    def discovers(self) -> bool:
        """True when views made elsewhere are selected, so a discovery state file is needed."""
        return bool(self.schemas or self.names)

    @property
    def cadence_names(self) -> tuple[str, ...]:
        return tuple(cadence.name for cadence in self.cadences)

    def selects(self, schema: str, name: str) -> bool:
        return schema in self.schemas or any(matches(pattern, schema, name) for pattern in self.names)

    def cadence_of(self, schema: str | None, name: str, default: str = DEFAULT_CADENCE) -> str:
        """The first `[cadence]` pattern matching the view, else `default`. A project view (schema None) is
        matched by its name only: which schema it lives in is known to the database, not to the definitions."""
        return next((cadence for pattern, cadence in self.cadence if matches(pattern, schema, name)), default)


def matches(pattern: str, schema: str | None, name: str) -> bool:
    if "." in pattern:
        return schema is not None and fnmatchcase(f"{schema}.{name}", pattern)
    return fnmatchcase(name, pattern)


def _strings(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AnalyticsViewsError(f"{where} must be a list of strings, like [\"analytics\"]")
    return tuple(value)


def _read(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise AnalyticsViewsError(f"cannot read {path} ({error.strerror}): fix {CONFIG_ENV} or create the file") from None
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise AnalyticsViewsError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} on line {line}): save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AnalyticsViewsError(f"{path} is not valid TOML ({error}): fix it") from None


def _cadence(path: Path, name: str, value) -> Cadence:
    where = f"{path}: [cadences] {name}"
    if not CADENCE_NAME.fullmatch(name):
        raise AnalyticsViewsError(
            f"{where}: a cadence name is 1 to 40 lowercase letters, digits and _ (it names {name}_refresh_job)"
        )
    if isinstance(value, str):
        value = {"cron": value}
    if not isinstance(value, dict) or not isinstance(value.get("cron"), str) or set(value) - _CADENCE_KEYS:
        raise AnalyticsViewsError(f'{where} must be {{ cron = "0 */4 * * *", timezone = "UTC" }} (timezone optional)')
    timezone = value.get("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise AnalyticsViewsError(
            f"{where}: timezone {timezone!r} is not an IANA time zone; use one like \"UTC\" or \"Europe/Berlin\""
        ) from None
    return Cadence(name, value["cron"].strip(), timezone, where=where)


def _cadences(path: Path, table) -> tuple[Cadence, ...]:
    if not isinstance(table, dict):
        raise AnalyticsViewsError(f'{path}: [cadences] must be a table of name = {{ cron = "...", timezone = "..." }}')
    cadences = {**DEFAULT_CADENCES, **{name: _cadence(path, name, value) for name, value in table.items()}}
    return tuple(cadences.values())


def load_config(path: Path | None = None) -> ManagedConfig:
    """The configuration at `path`, else $ANALYTICS_VIEWS_CONFIG, else views.toml; defaults when absent."""
    if path is None:
        path = Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else DEFAULT_CONFIG
        if path == DEFAULT_CONFIG and not path.exists():
            return ManagedConfig(path=None)
    data = _read(path)
    unknown = set(data) - _KEYS
    if unknown:
        raise AnalyticsViewsError(f"{path}: unknown setting {sorted(unknown)[0]!r}; known: {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("project_views", True), bool):
        raise AnalyticsViewsError(f"{path}: project_views must be true or false")
    cadences = _cadences(path, data.get("cadences", {}))
    names = [cadence.name for cadence in cadences]
    cadence = data.get("cadence", {})
    if not isinstance(cadence, dict):
        raise AnalyticsViewsError(f"{path}: [cadence] must be a table of \"pattern\" = \"cadence name\"")
    for pattern, value in cadence.items():
        if value not in names:
            raise AnalyticsViewsError(
                f"{path}: [cadence] {pattern!r} = {value!r} names no cadence; use one of {', '.join(names)} "
                "or define it under [cadences]"
            )
    state_file = data.get("state_file", "state/discovered_views.json")
    if not isinstance(state_file, str):
        raise AnalyticsViewsError(f"{path}: state_file must be a path (relative to {path.name})")
    data_tests = data.get("data_tests")
    if data_tests is not None and not isinstance(data_tests, str):
        raise AnalyticsViewsError(f"{path}: data_tests must be a folder path (relative to {path.name})")
    return ManagedConfig(
        path=path,
        project_views=data.get("project_views", True),
        schemas=_strings(data.get("schemas", []), f"{path}: schemas"),
        names=_strings(data.get("names", []), f"{path}: names"),
        cadence=tuple(cadence.items()),
        state_file=(path.parent / state_file).resolve(),
        cadences=cadences,
        data_tests=(path.parent / data_tests).resolve() if data_tests is not None else None,
    )
