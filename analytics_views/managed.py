"""Which materialized views the project manages, from `views.toml` (or the file ANALYTICS_VIEWS_CONFIG names).

The project's own views (`sql/views/`) are managed unless `project_views = false`. Views made elsewhere are
managed when their schema is listed in `schemas` or their name matches one of `names` (exact or glob,
optionally `schema.name`). Their cadence comes from the `[cadence]` table (first matching pattern wins,
default daily); a project view's cadence stays in its file's header. Definitions learn about views made
elsewhere only from the state file `analytics-views discover` writes, never from the database.
"""

import os
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT
from analytics_views.views import CADENCES


DEFAULT_CONFIG = PROJECT_ROOT / "views.toml"
CONFIG_ENV = "ANALYTICS_VIEWS_CONFIG"
DEFAULT_CADENCE = "daily"
_KEYS = {"project_views", "schemas", "names", "cadence", "state_file", "data_tests"}


@dataclass(frozen=True)
class ManagedConfig:
    path: Path | None  # None: no file, today's defaults
    project_views: bool = True
    schemas: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    cadence: tuple[tuple[str, str], ...] = ()  # (pattern, cadence), in file order
    state_file: Path = field(default=PROJECT_ROOT / "state" / "discovered_views.json")
    data_tests: Path | None = None  # folder of discovered views' data tests, <schema>.<view>/<test>.sql

    @property
    def discovers(self) -> bool:
        """True when views made elsewhere are selected, so a discovery state file is needed."""
        return bool(self.schemas or self.names)

    def selects(self, schema: str, name: str) -> bool:
        return schema in self.schemas or any(_matches(pattern, schema, name) for pattern in self.names)

    def cadence_of(self, schema: str, name: str) -> str:
        return next((cadence for pattern, cadence in self.cadence if _matches(pattern, schema, name)), DEFAULT_CADENCE)


def _matches(pattern: str, schema: str, name: str) -> bool:
    return fnmatchcase(f"{schema}.{name}" if "." in pattern else name, pattern)


def _strings(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AnalyticsViewsError(f"{where} must be a list of strings, like [\"analytics\"]")
    return tuple(value)


def load_config(path: Path | None = None) -> ManagedConfig:
    """The configuration at `path`, else $ANALYTICS_VIEWS_CONFIG, else views.toml; defaults when absent."""
    if path is None:
        path = Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else DEFAULT_CONFIG
        if path == DEFAULT_CONFIG and not path.exists():
            return ManagedConfig(path=None)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise AnalyticsViewsError(f"cannot read {path} ({error.strerror}): fix {CONFIG_ENV} or create the file") from None
    except tomllib.TOMLDecodeError as error:
        raise AnalyticsViewsError(f"{path} is not valid TOML ({error}): fix it") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise AnalyticsViewsError(f"{path}: unknown setting {sorted(unknown)[0]!r}; known: {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("project_views", True), bool):
        raise AnalyticsViewsError(f"{path}: project_views must be true or false")
    cadence = data.get("cadence", {})
    if not isinstance(cadence, dict):
        raise AnalyticsViewsError(f"{path}: [cadence] must be a table of \"pattern\" = \"daily\" or \"weekly\"")
    for pattern, value in cadence.items():
        if value not in CADENCES:
            raise AnalyticsViewsError(f"{path}: cadence of {pattern!r} is {value!r}; use one of {', '.join(CADENCES)}")
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
        data_tests=(path.parent / data_tests).resolve() if data_tests is not None else None,
    )
