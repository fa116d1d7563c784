"""The checks of a view's SQL as Dagster asset checks: the static checks (sql_checks.py), evaluated when the
view's definition or the catalog facts they read change (definition_checks.py), and its data tests
(data_tests.py), declared on the view's asset and evaluated after each refresh in the same step.

sql_checks (and so sqlglot) is imported only when a step evaluates the checks: loading definitions stays
free of the parser (parse_cache.py).
"""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg

from analytics_views.orchestration import metadata_keys as keys
from analytics_views.sql_files.data_tests import DataTest, DataTestResult, load_tests, markdown_table, run_test, tests_folder
from analytics_views.sql_files.views import ViewDefinition

# name -> what the check verifies (the names are sql_checks' TIMEZONE_CHECK, NULL_KEY_CHECK, FANOUT_CHECK,
# GROUPING_CHECK)
STATIC_CHECKS = {
    "timezone_independent": "No expression of the view's SQL follows the session's TimeZone (date(timestamptz), "
    "timestamptz::date, date_trunc without a zone, current_date, to_char/extract of a timestamptz, ...); "
    "each finding names its fix (AT TIME ZONE 'UTC'). From the stored definition and the catalog.",
    "unique_key_not_null": "No column of the view's unique index can be NULL, per its SQL, and no row has a NULL "
    "key after the refresh (a count over the view): the index does not make NULL keys unique, and every "
    "concurrent refresh deletes and re-inserts those rows.",
    "no_join_fanout": "No aggregate (sum, avg, count(x), ...) reads rows that a one-to-many join repeats before "
    "grouping; uniqueness from primary keys, unique indexes and GROUP BY/DISTINCT of CTEs and subqueries.",
    "unique_key_covers_grouping": "Every GROUP BY (or DISTINCT) expression of the view is in its unique index or "
    "determined by the index's columns (a primary key, unique index or GROUP BY of what it reads, an equality): "
    "otherwise two groups can share a key and the refresh fails on them.",
}
_SEVERITY = {"error": dg.AssetCheckSeverity.ERROR, "warn": dg.AssetCheckSeverity.WARN}


def data_tests(view: ViewDefinition, discovered_tests_dir: Path | None, reserved: tuple[str, ...]) -> tuple[DataTest, ...]:
    return load_tests(tests_folder(view.path, view.name, view.schema, discovered_tests_dir), (*reserved, *STATIC_CHECKS))


def static_specs(key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(name, asset=key, description=description) for name, description in STATIC_CHECKS.items()]


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


def static_results(
    conn: psycopg.Connection, view: ViewDefinition, unique_index: str | None, key: dg.AssetKey | None = None
) -> Iterator[dg.AssetCheckResult]:
    from analytics_views.sql_files import sql_checks

    try:
        outcomes = sql_checks.static_checks(conn, view.name, view.schema, view.label, unique_index)
    except psycopg.Error as error:  # a catalog query failed: each check says it could not decide
        reason = f"cannot decide: the catalog could not be read ({' '.join(str(error).split())})"
        outcomes = [sql_checks.CheckOutcome(name, False, reason, undecided=(reason,)) for name in STATIC_CHECKS]
    for outcome in outcomes:
        yield dg.AssetCheckResult(
            asset_key=key,
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
