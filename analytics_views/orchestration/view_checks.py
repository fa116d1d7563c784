"""Every check of a view, as a list: `CHECKS`, one `ViewCheck` each (name, severity, description, when it is
evaluated, evaluate). Adding a check of the catalog is adding an entry; the assets, the definition checks and
their specs read the list. The data tests (data_tests.py) are files, declared on the view's asset and run after
each refresh in the same step.

When a check is evaluated (`follows`):
- REFRESH: on the catalog, just before each refresh of the view, in the refresh's step (assets.py); one of
  severity ERROR that fails stops the view's refresh, and the views reading it wait (blocking);
- DEFINITION: when the view's definition or the catalog facts the checks read change, and on demand
  (definition_checks.py): the static checks (sql_checks.py) and `matches_discovery` read the view's definition
  and the catalog, not its rows.

sql_checks (and so sqlglot) is imported only when a step evaluates the static checks: loading definitions stays
free of the parser (parse_cache.py).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psycopg

from analytics_views.orchestration import metadata_keys as keys
from analytics_views.postgres.database import ViewState
from analytics_views.sql_files.data_tests import DataTest, DataTestResult, load_tests, markdown_table, run_test, tests_folder
from analytics_views.sql_files.discovery import current_fingerprint
from analytics_views.sql_files.views import ViewDefinition

REFRESH, DEFINITION = "refresh", "definition"
UNIQUE_INDEX_CHECK = "unique_index"
MATCHES_DISCOVERY_CHECK = "matches_discovery"
_SEVERITY = {"error": dg.AssetCheckSeverity.ERROR, "warn": dg.AssetCheckSeverity.WARN}
_UNIQUE_INDEX_DDL = re.compile(r"CREATE\s+UNIQUE\s+INDEX\s+[^;]+;", re.IGNORECASE)


@dataclass
class CheckInput:
    """What a check reads: a connection, the view, its asset key and its state in the catalog. The static
    analysis (sql_checks.py) runs once for the static checks of a view, when the first of them asks."""

    conn: psycopg.Connection
    view: ViewDefinition
    key: dg.AssetKey
    state: ViewState
    _static: dict = field(default_factory=dict)

    def static_outcome(self, name: str):
        from analytics_views.sql_files import sql_checks

        if not self._static:
            try:
                outcomes = sql_checks.static_checks(self.conn, self.view.name, self.view.schema, self.view.label, self.state.unique_index)
            except psycopg.Error as error:  # a catalog query failed: each check says it could not decide
                reason = f"cannot decide: the catalog could not be read ({' '.join(str(error).split())})"
                outcomes = [sql_checks.CheckOutcome(check, False, reason, undecided=(reason,)) for check in STATIC_CHECKS]
            self._static.update((outcome.name, outcome) for outcome in outcomes)
        return self._static[name]


@dataclass(frozen=True)
class ViewCheck:
    name: str
    description: str
    follows: str  # REFRESH or DEFINITION (the module docstring)
    evaluate: Callable[[CheckInput], dg.AssetCheckResult]
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.WARN
    applies: Callable[[ViewDefinition], bool] = lambda view: True  # default: every view

    def spec(self, key: dg.AssetKey) -> dg.AssetCheckSpec:
        # ERROR blocks, as dagster-dbt maps a test's `severity: error`: the views reading it are not refreshed.
        return dg.AssetCheckSpec(self.name, asset=key, description=self.description, blocking=self.severity == dg.AssetCheckSeverity.ERROR)


def unique_index_fix(view: ViewDefinition) -> str:
    """How to repair a missing unique index: the statement from the view's own SQL file, or the index
    discovery recorded on a view made elsewhere."""
    if view.path is None and view.unique_index:
        return f"recreate the unique index `analytics-views discover` recorded: `{view.unique_index};`"
    match = _UNIQUE_INDEX_DDL.search(view.sql)
    statement = " ".join(match.group(0).split()) if match else f"CREATE UNIQUE INDEX ON {view.label} (...);"
    if view.path is None:
        return f"run `{statement}` on the columns that identify a row (the view was made outside this project)"
    return f"run `{statement}` (from {view.path.parent.name}/{view.path.name})"


def unique_index(check: CheckInput) -> dg.AssetCheckResult:
    index = check.state.unique_index
    return dg.AssetCheckResult(
        asset_key=check.key,
        check_name=UNIQUE_INDEX_CHECK,
        passed=index is not None,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={keys.INDEX: index or "none"},
        description=f"usable unique index: {index}"
        if index
        else f"{check.view.label} has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY; "
        f"{unique_index_fix(check.view)}",
    )


def matches_discovery(check: CheckInput) -> dg.AssetCheckResult:
    view = check.view
    now = current_fingerprint(check.conn, view.schema, view.name)
    return dg.AssetCheckResult(
        asset_key=check.key,
        check_name=MATCHES_DISCOVERY_CHECK,
        passed=now == view.fingerprint,
        severity=dg.AssetCheckSeverity.WARN,
        description="matches the discovered definition"
        if now == view.fingerprint
        else f"{view.label} was redefined since discovery: run `analytics-views discover`",
    )


def static_check(name: str, description: str) -> ViewCheck:
    """A static check's entry: a DEFINITION check whose result is its outcome of the view's analysis
    (sql_checks.py), findings and all."""

    def evaluate(check: CheckInput) -> dg.AssetCheckResult:
        outcome = check.static_outcome(name)
        return dg.AssetCheckResult(
            asset_key=check.key,
            check_name=outcome.name,
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata={
                **{keys.ours(key): _metadata_value(value) for key, value in outcome.metadata.items()},
                keys.FINDINGS: dg.MetadataValue.md(
                    "\n".join(f"- `{f.expression}`: {f.problem}; fix: `{f.fix}`" for f in outcome.findings) or "none"
                ),
                **({keys.UNDECIDED: dg.MetadataValue.json(list(outcome.undecided))} if outcome.undecided else {}),
            },
        )

    return ViewCheck(name, description, DEFINITION, evaluate)


# The static checks, name -> what it verifies; their rules are sql_checks' (TIMEZONE_CHECK, NULL_KEY_CHECK,
# FANOUT_CHECK, GROUPING_CHECK), not imported here: sql_checks imports sqlglot.
STATIC_CHECKS = {
    "timezone_independent": "No expression of the view's SQL follows the session's TimeZone (date(timestamptz), "
    "timestamptz::date, date_trunc without a zone, current_date, to_char/extract of a timestamptz, ...); "
    "each finding names its fix (AT TIME ZONE 'UTC'). From the stored definition and the catalog.",
    "unique_key_not_null": "No column of the view's unique index can be NULL, per its SQL, and no row has a NULL "
    "key (a count over the view, as of the check): the index does not make NULL keys unique, and every "
    "concurrent refresh deletes and re-inserts those rows.",
    "no_join_fanout": "No aggregate (sum, avg, count(x), ...) reads rows that a one-to-many join repeats before "
    "grouping; uniqueness from primary keys, unique indexes and GROUP BY/DISTINCT of CTEs and subqueries.",
    "unique_key_covers_grouping": "Every GROUP BY (or DISTINCT) expression of the view is in its unique index or "
    "determined by the index's columns (a primary key, unique index or GROUP BY of what it reads, an equality): "
    "otherwise two groups can share a key and the refresh fails on them.",
}

CHECKS: tuple[ViewCheck, ...] = (
    ViewCheck(
        UNIQUE_INDEX_CHECK,
        "The view has a unique index that REFRESH MATERIALIZED VIEW CONCURRENTLY can use "
        "(unique, valid, no WHERE clause, plain columns).",
        REFRESH,
        unique_index,
        severity=dg.AssetCheckSeverity.ERROR,
    ),
    ViewCheck(
        MATCHES_DISCOVERY_CHECK,
        "The view's definition and columns in the database are still the ones `analytics-views discover` recorded.",
        DEFINITION,
        matches_discovery,
        applies=lambda view: bool(view.fingerprint),  # a view made elsewhere
    ),
    *(static_check(name, description) for name, description in STATIC_CHECKS.items()),
)


def checks_following(when: str, view: ViewDefinition) -> list[ViewCheck]:
    """The checks of `view` evaluated at `when` (REFRESH or DEFINITION), in the list's order."""
    return [check for check in CHECKS if check.follows == when and check.applies(view)]


def data_tests(view: ViewDefinition, discovered_tests_dir: Path | None) -> tuple[DataTest, ...]:
    """The view's data tests; a test may not take a check's name."""
    return load_tests(tests_folder(view.path, view.name, view.schema, discovered_tests_dir), tuple(check.name for check in CHECKS))


def data_test_specs(key: dg.AssetKey, tests: tuple[DataTest, ...]) -> list[dg.AssetCheckSpec]:
    """A data test of severity error is blocking, as dagster-dbt maps a dbt test's `severity: error`: the
    views reading the view are not refreshed after it failed (refresh_step.py, and automation)."""
    return [
        dg.AssetCheckSpec(
            test.name,
            asset=key,
            description=f"{test.asserts} (data test {_relative(test.path)})",
            blocking=test.severity == "error",
        )
        for test in tests
    ]


def _relative(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _metadata_value(value):
    return dg.MetadataValue.json(value) if isinstance(value, (list, dict)) else value


def data_test_result(result: DataTestResult, key: dg.AssetKey | None = None) -> dg.AssetCheckResult:
    test = result.test
    if result.error is not None:
        description = f"{test.name} could not run: {result.error}"
    elif result.passed:
        description = f"no failing rows. {test.asserts}"
    else:
        description = f"{result.failing_rows} failing rows. {test.asserts}"
    metadata = {keys.FAILING_ROWS: result.failing_rows, keys.TEST_FILE: _relative(test.path)}
    if result.sample:
        metadata[keys.FAILING_SAMPLE] = dg.MetadataValue.md(markdown_table(result.columns, result.sample))
    if result.error is not None:
        metadata[keys.ERROR] = result.error
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=test.name,
        passed=result.passed,
        severity=_SEVERITY[test.severity],
        description=description,
        metadata=metadata,
    )


def data_test_check_result(
    conn: psycopg.Connection, key: dg.AssetKey, test: DataTest, timezone: str = "UTC"
) -> dg.AssetCheckResult:
    """A data test, run over the refresh's connection after the refresh, in the refresh's time zone, so it
    buckets as the view did."""
    return data_test_result(run_test(conn, test, timezone=timezone), key)
