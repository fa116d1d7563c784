"""SQL data tests beside a view: a query whose returned rows are failures (as dbt's singular tests).

A view file's tests are `tests/<view>/<test>.sql` beside its folder (`sql/views/x.sql`: `sql/tests/x/`); a
discovered view's are `<data_tests folder of the defs.yaml>/<schema>.<view>/<test>.sql`. Each file holds one
SELECT that names the view directly, after a header of `--` lines: the first says what the test asserts,
`-- Severity: error|warn` sets the check's severity (default error). Each test runs after the view's refresh in a read-only
transaction of its own, under the refresh's TimeZone (default UTC); a test whose query fails is a failed
check, not a failed step.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from analytics_views.paths import SQL_DIR

TESTS_DIR = SQL_DIR / "tests"  # this project's own view tests
SEVERITIES = ("error", "warn")
SAMPLE_ROWS = 5
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class DataTest:
    name: str  # the asset check's name: the file's stem, made a valid Dagster name
    path: Path
    query: str
    asserts: str
    severity: str  # "error" or "warn"


@dataclass(frozen=True)
class DataTestResult:
    test: DataTest
    failing_rows: int
    columns: tuple[str, ...] = ()
    sample: tuple[tuple, ...] = ()  # the first SAMPLE_ROWS failing rows
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.failing_rows == 0


def check_name(stem: str) -> str:
    """A file stem as a Dagster name (letters, digits, underscores)."""
    name = _INVALID_NAME_CHARS.sub("_", stem)
    return name if name and not name[0].isdigit() else f"test_{name}"


def parse_test(path: Path) -> DataTest:
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line[2:].strip())
    severity = "error"
    asserts = []
    for line in header:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "severity":
            severity = value.strip().lower()
            if severity not in SEVERITIES:
                raise ValueError(f"{path}: severity {value.strip()!r} is not one of {', '.join(SEVERITIES)}")
        elif line:
            asserts.append(line)
    query = text.strip().rstrip(";").strip()
    if not query or query.count(";"):
        raise ValueError(f"{path}: a data test holds exactly one SELECT, whose rows are the failures")
    return DataTest(check_name(path.stem), path, query, " ".join(asserts) or f"{path.stem} returns no rows", severity)


def load_tests(folder: Path | None, reserved: tuple[str, ...] = ()) -> tuple[DataTest, ...]:
    """The tests in a view's folder, by name; `reserved` are check names the view already has."""
    if folder is None or not folder.is_dir():
        return ()
    tests = tuple(parse_test(path) for path in sorted(folder.glob("*.sql")))
    seen: dict[str, Path] = {}
    for test in tests:
        if test.name in reserved:
            raise ValueError(f"{test.path}: {test.name!r} is the name of a built-in check; rename the file")
        if test.name in seen:
            raise ValueError(f"{test.path}: same check name {test.name!r} as {seen[test.name].name}; rename one")
        seen[test.name] = test.path
    return tests


def tests_folder(view_file: Path | None, name: str, schema: str | None, discovered_tests_dir: Path | None) -> Path | None:
    """Where a view's tests live: <sql folder>/tests/<view> for a view file <sql folder>/views/<view>.sql,
    <data_tests>/<schema>.<view> for a discovered one."""
    if view_file is not None:
        return view_file.parent.parent / "tests" / name
    return discovered_tests_dir / f"{schema}.{name}" if discovered_tests_dir else None


def run_test(
    conn: psycopg.Connection, test: DataTest, statement_timeout_s: float = 300, *, timezone: str = "UTC"
) -> DataTestResult:
    """Run one test on an autocommit connection; every row it returns is a failure."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(
                "SELECT set_config('TimeZone', %s, true), set_config('statement_timeout', %s, true)",
                [timezone, f"{int(statement_timeout_s * 1000)}ms"],
            )
            cursor = conn.execute(test.query)
            columns = tuple(column.name for column in cursor.description or ())
            sample = tuple(cursor.fetchmany(SAMPLE_ROWS))
            failing = cursor.rowcount if cursor.rowcount >= 0 else len(sample) + len(cursor.fetchall())
    except psycopg.Error as error:
        message = " ".join(str(error).split()) or type(error).__name__
        return DataTestResult(test, failing_rows=0, error=message)
    return DataTestResult(test, failing_rows=failing, columns=columns, sample=sample)


def markdown_table(columns: tuple[str, ...], rows: tuple[tuple, ...]) -> str:
    def cell(value) -> str:
        return "NULL" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    lines.extend(f"| {' | '.join(cell(value) for value in row)} |" for row in rows)
    return "\n".join(lines)
