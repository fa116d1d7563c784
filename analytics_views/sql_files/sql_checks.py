"""Static checks of a materialized view's SQL against the catalog: the classic bugs of analytics SQL.

Each check reads the view's definition as PostgreSQL stores it (pg_get_viewdef: every name resolved, every
implicit cast written out), parses it with sqlglot and asks the catalog what it needs (column types, NOT
NULL, primary keys and unique indexes, the definitions of the views it reads); no row of data is read.
- timezone_independent: expressions whose value follows the session's TimeZone (date(timestamptz),
  timestamptz::date, date_trunc without a zone, current_date, to_char/extract of a timestamptz, ...).
- unique_key_not_null: columns of the view's unique index that can be NULL, inferred from the SQL
  (PostgreSQL marks every materialized view column nullable); null_key_rows() counts them after a refresh.
- unique_key_covers_grouping: a GROUP BY (or DISTINCT) expression that the view's unique index neither holds
  nor determines (through a primary key, unique index or GROUP BY of what it reads, or an equality): a view
  grouped by (day, level_id, zone_id) under a unique index on (day, level_id) breaks its refresh the day one
  level is played in two zones, or one event has no zone.
- no_join_fanout: an aggregate (sum, avg, count(x), ...) over a relation whose rows a one-to-many join
  repeats before grouping. The first relation of FROM sets the grain; a join to a side that is unique on
  its join columns (primary key, unique index, GROUP BY or DISTINCT of a CTE or subquery) is a lookup and
  repeats nothing; an equality sees through the casts PostgreSQL writes around varchar, char and domain
  columns (`(a.user_id)::text = (r.user_id)::text`). count(*) counts the joined rows themselves and is not reported; min, max, bool_and,
  bool_or and any aggregate over DISTINCT are unchanged by repeated rows.
A check that meets an expression it cannot type or prove says so in its outcome instead of passing.

The analysis (sql_analysis.py, sqlglot) runs only when the view's definition or a fact of the catalog it
reads changed: its result is kept in `.cache/` (as parse_cache.py keeps the files' parse) under a key of the
definition, a digest of every relation the view reads down its views (columns, types, NOT NULL, unique
indexes, definitions), the server's version and the package's source; a refresh then costs three catalog
queries and the NULL-key count, without importing sqlglot.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from analytics_views.sql_files.parse_cache import CACHE_DIR, cache_key

TIMEZONE_CHECK = "timezone_independent"
NULL_KEY_CHECK = "unique_key_not_null"
FANOUT_CHECK = "no_join_fanout"
GROUPING_CHECK = "unique_key_covers_grouping"

NOT_NULL, NULLABLE, UNKNOWN = "not null", "nullable", "unknown"


@dataclass(frozen=True)
class Finding:
    expression: str  # the SQL of the expression or aggregate, as PostgreSQL stores it (qualified)
    problem: str
    fix: str


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, free of Dagster: the Dagster layer (view_checks.py) turns it into a check result."""

    name: str
    passed: bool
    description: str
    findings: tuple[Finding, ...] = ()
    undecided: tuple[str, ...] = ()  # what the check could not decide, and why
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ViewFacts:
    """What the analysis of a definition found, kept between refreshes; an *_error says why a check could not run."""

    timezone_findings: tuple[Finding, ...] = ()
    timezone_undecided: tuple[str, ...] = ()
    timezone_error: str | None = None
    fanout_findings: tuple[Finding, ...] = ()
    fanout_error: str | None = None
    key_nullability: dict[str, str] = field(default_factory=dict)  # key column -> NOT_NULL, NULLABLE or UNKNOWN
    grouping: tuple[str, ...] = ()  # the GROUP BY (or DISTINCT) of the view's query; () when it has none
    grouping_findings: tuple[Finding, ...] = ()
    grouping_undecided: tuple[str, ...] = ()
    grouping_index: tuple[str, ...] = ()  # the columns of a unique index that would cover the grouping
    grouping_error: str | None = None


# --- entry points over a connection


def view_query(conn: psycopg.Connection, view: str, schema: str | None = None) -> str:
    text = sql.Identifier(view) if schema is None else sql.Identifier(schema, view)
    row = conn.execute("SELECT pg_get_viewdef(%s::regclass)", [text.as_string(conn)]).fetchone()
    return row[0].strip().rstrip(";")


def index_columns(conn: psycopg.Connection, index: str) -> list[str]:
    """Key columns of an index given as regclass text (database.view_state's unique_index), in order."""
    rows = conn.execute(
        """
        SELECT a.attname
        FROM pg_index AS i, unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k (attnum, position)
        JOIN pg_attribute AS a ON a.attnum = k.attnum
        WHERE i.indexrelid = %s::regclass AND a.attrelid = i.indrelid
        ORDER BY k.position
        """,
        [index],
    ).fetchall()
    return [row[0] for row in rows]


def null_key_rows(conn: psycopg.Connection, view: str, schema: str | None, key_columns: list[str]) -> int:
    """Rows of the view with a NULL in any key column: a count over the view, run after each refresh."""
    relation = sql.Identifier(view) if schema is None else sql.Identifier(schema, view)
    condition = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in key_columns)
    return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(relation, condition)).fetchone()[0]


def _listing(findings: list[Finding]) -> str:
    return "\n".join(f"- `{f.expression}`: {f.problem}; fix: `{f.fix}`" for f in findings)


def timezone_outcome(findings: tuple[Finding, ...], undecided: tuple[str, ...], label: str) -> CheckOutcome:
    if findings:
        description = f"{label} computes values that follow the session's TimeZone:\n" + _listing(findings)
    elif undecided:
        description = f"cannot decide whether {label} depends on the session's TimeZone: " + "; ".join(undecided)
    else:
        description = f"no expression of {label} depends on the session's TimeZone"
    return CheckOutcome(
        TIMEZONE_CHECK,
        passed=not findings and not undecided,
        description=description,
        findings=tuple(findings),
        undecided=tuple(undecided),
        metadata={"expressions": [f.expression for f in findings], "undecided": list(undecided)},
    )


def fanout_outcome(findings: tuple[Finding, ...], label: str) -> CheckOutcome:
    description = (
        f"{label} aggregates rows that a join multiplies first:\n" + _listing(findings)
        if findings
        else f"no aggregate of {label} reads rows that a one-to-many join repeats"
    )
    return CheckOutcome(
        FANOUT_CHECK,
        passed=not findings,
        description=description,
        findings=tuple(findings),
        metadata={"aggregates": [f.expression for f in findings]},
    )


def null_key_outcome(states: dict[str, str], label: str, key_columns: list[str], null_rows: int) -> CheckOutcome:
    nullable = [c for c, state in states.items() if state == NULLABLE]
    unproven = [c for c, state in states.items() if state == UNKNOWN]
    passed = not nullable and null_rows == 0
    why = (
        "the unique index does not make rows with a NULL key unique, and every REFRESH ... CONCURRENTLY deletes "
        "and re-inserts them; fix: coalesce the key to a sentinel (coalesce(x, -1)) or filter the NULLs out"
    )
    if passed:
        description = f"key ({', '.join(key_columns)}) of {label} cannot be NULL"
        if unproven:
            description = (f"key ({', '.join(key_columns)}) of {label}: {null_rows} rows with a NULL key; "
                           f"the SQL does not prove {', '.join(unproven)} NOT NULL, so the rows were counted")
    else:
        parts = []
        if nullable:
            parts.append(f"{', '.join(nullable)} can be NULL per the view's SQL")
        parts.append(f"{null_rows} rows have a NULL key now")
        description = f"unique key ({', '.join(key_columns)}) of {label}: {'; '.join(parts)}: {why}"
    return CheckOutcome(
        NULL_KEY_CHECK,
        passed=passed,
        description=description,
        metadata={
            "key_columns": list(key_columns),
            "nullable_columns": nullable,
            "unproven_columns": unproven,
            "null_key_rows": null_rows,
        },
    )


def grouping_outcome(facts: ViewFacts, label: str, key_columns: list[str]) -> CheckOutcome:
    key, grouping = ", ".join(key_columns), ", ".join(facts.grouping)
    if facts.grouping_findings:
        description = (f"the unique index ({key}) of {label} is narrower than its grouping ({grouping}):\n"
                       + _listing(list(facts.grouping_findings)))
        if facts.grouping_index:
            description += (f"\nfix: CREATE UNIQUE INDEX ON {label} ({', '.join(facts.grouping_index)}), "
                            "then drop the narrower index")
    elif facts.grouping_undecided:
        description = (f"cannot decide whether the unique index ({key}) of {label} covers its grouping: "
                       + "; ".join(facts.grouping_undecided))
    elif not facts.grouping:
        description = f"{label} has no GROUP BY or DISTINCT to compare its unique index ({key}) with"
    else:
        description = (f"the unique index ({key}) of {label} covers its grouping ({grouping}): each grouping "
                       "expression is in the index or determined by it")
    return CheckOutcome(
        GROUPING_CHECK,
        passed=not facts.grouping_findings and not facts.grouping_undecided,
        description=description,
        findings=facts.grouping_findings,
        undecided=facts.grouping_undecided,
        metadata={
            "key_columns": list(key_columns),
            "grouping": list(facts.grouping),
            "uncovered": [f.expression for f in facts.grouping_findings],
        },
    )


# Every relation the view reads, down through the views it reads, with the facts the analysis uses.
_CATALOG_DIGEST = """
WITH RECURSIVE read (oid) AS (
    SELECT %s::regclass::oid
    UNION
    SELECT d.refobjid
    FROM read
    JOIN pg_rewrite AS r ON r.ev_class = read.oid
    JOIN pg_depend AS d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
)
SELECT md5(string_agg(facts, E'\\n' ORDER BY facts))
FROM (
    SELECT concat_ws(' | ', c.oid, n.nspname, c.relname, c.relkind,
        (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull, ', '
                           ORDER BY a.attnum)
         FROM pg_attribute AS a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
        (SELECT string_agg(pg_get_indexdef(i.indexrelid) || ' ' || i.indisvalid, ', ' ORDER BY i.indexrelid)
         FROM pg_index AS i WHERE i.indrelid = c.oid AND i.indisunique),
        CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END) AS facts
    FROM read JOIN pg_class AS c ON c.oid = read.oid JOIN pg_namespace AS n ON n.oid = c.relnamespace
) AS relation_facts
"""


def _facts_path(conn: psycopg.Connection, relation: str, definition: str, key_columns: list[str]) -> Path:
    digest = conn.execute(_CATALOG_DIGEST, [relation]).fetchone()[0] or ""
    key = hashlib.sha256(
        "\0".join([cache_key("sql-checks", []), str(conn.info.server_version), definition, digest, *key_columns]).encode()
    ).hexdigest()[:32]
    return CACHE_DIR / "sql-checks" / f"{key}.pickle"


def view_facts(conn: psycopg.Connection, view: str, schema: str | None, key_columns: list[str]) -> ViewFacts:
    """The analysis of the view's stored definition: from the cache when nothing it reads changed."""
    relation = (sql.Identifier(view) if schema is None else sql.Identifier(schema, view)).as_string(conn)
    definition = view_query(conn, view, schema)
    path = _facts_path(conn, relation, definition, key_columns)
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # missing, unreadable or damaged: analyse again
        pass
    from analytics_views.sql_files.sql_analysis import analyse_view

    facts = analyse_view(conn, definition, key_columns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".facts-", delete=False) as file:
            pickle.dump(facts, file)
        os.replace(file.name, path)  # readers see no file or the whole one
    except OSError:
        pass
    return facts


def _cannot_decide(name: str, label: str, reason: str) -> CheckOutcome:
    text = f"cannot decide for {label}: {reason}"
    return CheckOutcome(name, False, text, undecided=(text,))


def static_checks(
    conn: psycopg.Connection, view: str, schema: str | None, label: str, unique_index: str | None
) -> list[CheckOutcome]:
    """The four checks of a view, from its stored definition and the catalog (and the NULL-key count)."""
    key_columns = index_columns(conn, unique_index) if unique_index else []
    facts = view_facts(conn, view, schema, key_columns)
    outcomes = [
        _cannot_decide(TIMEZONE_CHECK, label, facts.timezone_error)
        if facts.timezone_error
        else timezone_outcome(facts.timezone_findings, facts.timezone_undecided, label),
        _cannot_decide(FANOUT_CHECK, label, facts.fanout_error)
        if facts.fanout_error
        else fanout_outcome(facts.fanout_findings, label),
    ]
    if unique_index is None:
        outcomes.append(CheckOutcome(NULL_KEY_CHECK, False, f"{label} has no usable unique index (see unique_index)"))
        outcomes.append(CheckOutcome(GROUPING_CHECK, False, f"{label} has no usable unique index (see unique_index)"))
    else:
        null_rows = null_key_rows(conn, view, schema, key_columns)
        states = {column: facts.key_nullability.get(column, UNKNOWN) for column in key_columns}
        outcomes.append(null_key_outcome(states, label, key_columns, null_rows))
        outcomes.append(_cannot_decide(GROUPING_CHECK, label, facts.grouping_error) if facts.grouping_error
                        else grouping_outcome(facts, label, key_columns))
    return outcomes
