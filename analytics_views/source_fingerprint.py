"""What a materialized view's result depends on, as one string that changes whenever that may have changed.

The sources are resolved through the catalog, starting from the relations and functions in the view's
stored query tree (pg_rewrite.ev_action: pg_depend records nothing on PostgreSQL's own objects):
- ordinary views are followed down (their own rules) to what they read, and their query trees are part of
  the fingerprint (CREATE OR REPLACE VIEW changes what the materialized view reads);
- tables bring their inheritance children and partitions at every level (pg_inherits), so a partition
  attached or detached changes the set of relations;
- other materialized views count as tables: a plain REFRESH gives them a new file node, CONCURRENTLY
  applies its diff as counted inserts and deletes;
- each relation contributes its oid, its file node (new after TRUNCATE or a plain REFRESH) and its
  cumulative insert/update/delete counters, plus the statistics' epoch (a server restart or a
  pg_stat_reset() starts the counters again).
The clock is read from the SQL of the view and of the views it reads: a result that follows the date in a
zone (current_date, (now() AT TIME ZONE 'UTC')::date, date_trunc('day', now())) adds that date to the
fingerprint; anything finer (now() - interval '6 hours') cannot be fingerprinted. That SQL (pg_get_viewdef)
is read only where the query tree calls a clock function or current_date: it locks the sources, so it
waits for them at most 50 ms and otherwise gives no fingerprint; every other look-up takes no lock.

Where the catalog cannot tell (a foreign table, a sequence, a volatile function, a function that is not a
built-in and may read tables, track_counts off, counters we cannot read), there is no fingerprint, only
the reason: such a view is refreshed every time.

Counters are PostgreSQL's cumulative statistics, which a writing session reports when it goes idle
(within about a second, longer under heavy lock contention), so a change committed in the last moment
may be seen only by the next refresh. pg_stat_reset_single_table_counters() on a source is not seen.
"""

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import errors
from sqlglot import exp, parse_one
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

# Objects with a lower oid were made by initdb: PostgreSQL's own functions (FirstNormalObjectId).
_FIRST_USER_OID = 16384
# Built-in functions whose value is the transaction's start time: read through the SQL text (below).
_TRANSACTION_CLOCK = frozenset({"now", "transaction_timestamp", "statement_timestamp"})
# Words that may read the clock (or, for mxid_age, the transaction counter); without any, no SQL is parsed.
_CLOCK_NAMES = frozenset(
    {"now", "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
     "transaction_timestamp", "statement_timestamp", "clock_timestamp", "timeofday", "age", "mxid_age"}
)
# date_trunc units no finer than a day: the result changes at most once a day.
_DAY_UNITS = frozenset({"DAY", "WEEK", "MONTH", "QUARTER", "YEAR", "DECADE", "CENTURY", "MILLENNIUM"})
SESSION_ZONE = ""  # the refresh's TimeZone setting


@dataclass(frozen=True)
class Fingerprint:
    value: str | None  # None: the view must be refreshed every time
    reason: str = ""  # why there is no value


# Every relation the view's result may depend on, every function its rules call (operators through their
# function), and the definitions of the views followed. Both are read from the rules' stored query trees:
# pg_depend records no dependency on PostgreSQL's own (pinned) objects, such as random() or pg_class. The
# root's own oid is left out: build-and-swap gives the view a new one. Inheritance children are taken from
# every relation reached, partitions included.
_CATALOG = r"""
WITH RECURSIVE walk (oid, followed) AS (
    SELECT %(view)s::regclass::oid, true
    UNION
    SELECT next.oid, next.followed
    FROM walk
    CROSS JOIN LATERAL (
        SELECT c.oid, c.relkind = 'v' AS followed
        FROM pg_rewrite AS rule
        CROSS JOIN LATERAL regexp_matches(rule.ev_action::text, ':relid (\d+)', 'g') AS read (relid)
        JOIN pg_class AS c ON c.oid = read.relid[1]::oid
        WHERE walk.followed AND rule.ev_class = walk.oid AND rule.ev_type = '1' AND c.oid <> rule.ev_class
        UNION ALL
        SELECT inh.inhrelid, false FROM pg_inherits AS inh WHERE inh.inhparent = walk.oid
    ) AS next
),
called AS (
    SELECT CASE WHEN call.field[1] = 'opno' THEN op.oprcode::oid ELSE call.field[2]::oid END AS oid
    FROM walk
    JOIN pg_rewrite AS rule ON rule.ev_class = walk.oid AND rule.ev_type = '1' AND walk.followed
    CROSS JOIN LATERAL regexp_matches(
        rule.ev_action::text, ':(funcid|opfuncid|opno|aggfnoid|winfnoid) (\d+)', 'g') AS call (field)
    LEFT JOIN pg_operator AS op ON call.field[1] = 'opno' AND op.oid = call.field[2]::oid
)
SELECT
    current_setting('track_counts')::boolean,
    concat_ws(':', pg_postmaster_start_time(), pg_stat_get_db_stat_reset_time(
        (SELECT oid FROM pg_database WHERE datname = current_database()))),
    (SELECT coalesce(json_agg(json_build_array(c.oid::bigint, c.oid::regclass::text, c.relkind,
            c.relfilenode::bigint, s.n_tup_ins, s.n_tup_upd, s.n_tup_del) ORDER BY c.oid), '[]')
     FROM (SELECT DISTINCT oid FROM walk) AS w JOIN pg_class AS c ON c.oid = w.oid
     LEFT JOIN pg_stat_all_tables AS s ON s.relid = c.oid
     WHERE c.oid <> %(view)s::regclass),
    (SELECT coalesce(json_agg(json_build_array(p.oid::bigint, p.oid::regprocedure::text, p.proname, p.provolatile)
            ORDER BY p.oid), '[]')
     FROM (SELECT DISTINCT oid FROM called) AS f JOIN pg_proc AS p ON p.oid = f.oid),
    (SELECT coalesce(json_agg(json_build_array(w.oid::bigint, w.oid::regclass::text, w.oid = %(view)s::regclass,
            md5(rule.ev_action::text), rule.ev_action::text LIKE '%%{SQLVALUEFUNCTION %%') ORDER BY w.oid), '[]')
     FROM (SELECT DISTINCT oid FROM walk WHERE followed) AS w JOIN pg_rewrite AS rule ON rule.ev_class = w.oid AND rule.ev_type = '1'),
    current_setting('TimeZone')
"""

# Relation kinds whose changes the counters and file node show.
_COUNTED_KINDS = {"r": "table", "p": "partitioned table", "m": "materialized view"}
_UNCOUNTED_KINDS = {"f": "foreign table", "S": "sequence"}


def _is_clock(node: exp.Expression) -> bool:
    if isinstance(node, (exp.CurrentDate, exp.CurrentTime, exp.Localtime, exp.CurrentTimestamp, exp.Localtimestamp)):
        return True
    name = node.name.lower() if isinstance(node, exp.Anonymous) else ""
    return name in _TRANSACTION_CLOCK or name in {"clock_timestamp", "timeofday"} or (
        name in {"age", "mxid_age"} and len(node.expressions) == 1  # from today's midnight, or the next xid
    )


def _reading_zone(clock: exp.Expression) -> str | None:
    """The zone whose date this clock reading is reduced to (SESSION_ZONE for the session's), None when
    the reading is not reduced to a date or coarser within the expression parsed."""
    if isinstance(clock, exp.CurrentDate):
        return SESSION_ZONE
    if isinstance(clock, (exp.CurrentTimestamp, exp.Localtimestamp)) or (
        isinstance(clock, exp.Anonymous) and clock.name.lower() in _TRANSACTION_CLOCK
    ):
        return _day_zone(clock)
    return None


def _fragments(definition: str, tokens: list, clock: int) -> Iterator[str]:
    """The expressions around the clock token at index `clock`, innermost first: the token (with its own
    argument list), then up to three enclosing parentheses, each with the function name before it and a
    `::date` after it."""
    closing, stack = {}, []
    for index, token in enumerate(tokens):
        if token.token_type == TokenType.L_PAREN:
            stack.append(index)
        elif token.token_type == TokenType.R_PAREN and stack:
            closing[stack.pop()] = index
    enclosing = [i for i in closing if i < clock < closing[i]]
    enclosing.sort(reverse=True)
    own = clock + 1 if clock + 1 < len(tokens) and tokens[clock + 1].token_type == TokenType.L_PAREN else None
    groups = [(clock, closing.get(own, clock) if own else clock)] + [(i, closing[i]) for i in enclosing[:3]]
    for first, last in groups:
        starts = [first - 1, first] if first > 0 and tokens[first].token_type == TokenType.L_PAREN else [first]
        ends = [last]
        if last + 2 < len(tokens) and tokens[last + 1].token_type == TokenType.DCOLON and tokens[last + 2].text.lower() == "date":
            ends.insert(0, last + 2)
        for start in starts:
            for end in ends:
                yield definition[tokens[start].start : tokens[end].end + 1]


@functools.lru_cache(maxsize=256)  # a definition rarely changes; parsing it costs milliseconds
def _clock_zones(definition: str) -> tuple[frozenset[str], str]:
    """The zones whose current date the query's result follows, or why its result follows the clock more
    finely than that (then the zones are meaningless). SESSION_ZONE stands for the session's TimeZone.

    Each word that may read the clock is judged within the smallest expression around it that reduces it
    to a date (pg_get_viewdef's text does not always parse whole: a parenthesized join of unnest() does not).
    """
    if not any(name in definition.lower() for name in _CLOCK_NAMES):
        return frozenset(), ""
    try:
        tokens = Postgres().tokenize(definition)
    except SqlglotError:
        return frozenset(), "its SQL mentions the clock and could not be read to tell how"
    zones: set[str] = set()
    for index, token in enumerate(tokens):
        if token.text.lower() not in _CLOCK_NAMES or token.token_type in (TokenType.STRING, TokenType.IDENTIFIER):
            continue
        verdict, readings = "", []
        for fragment in _fragments(definition, tokens, index):
            try:
                tree = parse_one(f"SELECT {fragment}", dialect="postgres")
            except SqlglotError:
                continue
            readings = [node for node in tree.walk() if _is_clock(node)]
            if not readings:
                break  # a column or alias named like a clock function
            found = [_reading_zone(node) for node in readings]
            if None not in found:
                zones.update(found)
                break
            verdict = _instant_reason(_outermost(readings[found.index(None)]))
        else:
            return frozenset(), verdict or f"its SQL reads the clock ({token.text}) in a way we could not read"
    return frozenset(zones), ""


def _instant_reason(node: exp.Expression) -> str:
    return f"its result follows the clock ({node.sql(dialect='postgres')}), finer than a day"


def _up(node: exp.Expression) -> exp.Expression | None:
    parent = node.parent
    while isinstance(parent, exp.Paren):
        parent = parent.parent
    return parent


def _literal(node: exp.Expression) -> str | None:
    while isinstance(node, (exp.Cast, exp.Paren)):
        node = node.this
    return node.this if isinstance(node, exp.Literal) and node.is_string else None


def _day_zone(clock: exp.Expression) -> str | None:
    """The zone in which this clock reading is reduced to a date (or coarser), None when it is not."""
    zone, node = SESSION_ZONE, clock
    parent = _up(node)
    if not isinstance(clock, exp.Localtimestamp) and isinstance(parent, exp.AtTimeZone) and parent.this.unnest() is node:
        zone = _literal(parent.args["zone"])
        if zone is None:
            return None
        node, parent = parent, _up(parent)
    if isinstance(parent, exp.Cast) and parent.to.is_type(exp.DataType.Type.DATE):
        return zone
    if isinstance(parent, exp.Date) and len(parent.expressions) == 0:
        return zone
    if isinstance(parent, (exp.TimestampTrunc, exp.DateTrunc)) and parent.this.unnest() is node:
        unit = parent.args.get("unit")
        if unit is None or unit.name.upper() not in _DAY_UNITS:
            return None
        if parent.args.get("zone") is not None:
            if zone != SESSION_ZONE or node is not clock:
                return None
            zone = _literal(parent.args["zone"])
        return zone
    return None


def _outermost(clock: exp.Expression) -> exp.Expression:
    """The clock reading with the arithmetic around it, for the message."""
    node = clock
    while isinstance(node.parent, (exp.Paren, exp.Sub, exp.Add, exp.AtTimeZone, exp.Cast)):
        node = node.parent
    return node.unnest() if isinstance(node, exp.Paren) else node


def source_fingerprint(conn: psycopg.Connection, view: str) -> Fingerprint:
    """The fingerprint of `view` (a regclass text, e.g. `product.cohort_stats`) as the current transaction
    sees it, or why there is none. Call it inside the refresh's transaction, after its TimeZone is set."""
    conn.execute("SELECT pg_stat_clear_snapshot()")  # counters as of now, not of this transaction's first read
    counting, epoch, relations, functions, rules, timezone = conn.execute(_CATALOG, {"view": view}).fetchone()
    if not counting:
        return Fingerprint(None, "track_counts is off, so PostgreSQL does not count writes to its sources")
    for oid, name, kind, _node, inserted, _updated, _deleted in relations:
        if kind in _UNCOUNTED_KINDS:
            return Fingerprint(None, f"it reads the {_UNCOUNTED_KINDS[kind]} {name}, whose changes PostgreSQL does not count")
        if kind not in _COUNTED_KINDS and kind != "v":
            return Fingerprint(None, f"it depends on {name}, of relation kind {kind!r}, whose changes we cannot tell")
        if kind in _COUNTED_KINDS and inserted is None:
            return Fingerprint(None, f"the write counters of {name} are not visible to this role")
    clock_called = reads_clock = False
    for oid, signature, proname, volatility in functions:
        if volatility == "v":
            return Fingerprint(None, f"it calls the volatile function {signature}, whose result may change any time")
        if oid >= _FIRST_USER_OID and volatility != "i":
            return Fingerprint(None, f"it calls the function {signature}, which may read tables the catalog does not show")
        clock_called |= proname in _TRANSACTION_CLOCK
        reads_clock |= proname in _CLOCK_NAMES and volatility != "i"
    zones: set[str] = set()
    if reads_clock or any(reads_sql_clock for *_, reads_sql_clock in rules):
        definitions = _definitions(conn, [oid for oid, *_ in rules])
        if definitions is None:
            return Fingerprint(None, "its SQL reads the clock, and its definition could not be read while a source is locked")
        for (_oid, name, is_view, *_), definition in zip(rules, definitions):
            found, reason = _clock_zones(definition)
            if reason:
                return Fingerprint(None, reason if is_view else f"{reason} in the view {name} it reads")
            zones |= found
        if clock_called and not zones:
            return Fingerprint(None, "it calls now() in a way its SQL does not show")
    days = []
    if zones:
        days = conn.execute(
            "SELECT coalesce(nullif(zone, ''), current_setting('TimeZone')) || '=' || (now() AT TIME ZONE"
            " coalesce(nullif(zone, ''), current_setting('TimeZone')))::date FROM unnest(%s::text[]) AS zone ORDER BY 1",
            [sorted(zones)],
        ).fetchall()
    # Names are left out: they depend on the search_path, the oids do not.
    counted = [(oid, kind, node, counters) for oid, _name, kind, node, *counters in relations]
    trees = [tree for *_, tree, _reads_sql_clock in rules]
    digest = hashlib.md5(repr((timezone, epoch, counted, trees)).encode()).hexdigest()
    return Fingerprint(":".join([digest, *(day for (day,) in days)]))


def _definitions(conn: psycopg.Connection, views: list[int]) -> list[str] | None:
    """pg_get_viewdef of each view, or None when a relation they read is locked: deparsing locks them all,
    and a skip must not wait where the catalog alone answers (the refresh then waits as it always did)."""
    try:
        with conn.transaction():
            previous = conn.execute(
                "SELECT current_setting('lock_timeout'), set_config('lock_timeout', '50ms', true)"
            ).fetchone()[0]
            definitions = [row[0] for row in conn.execute(
                "SELECT pg_get_viewdef(view) FROM unnest(%s::oid[]) WITH ORDINALITY AS v (view, n) ORDER BY n", [views]
            )]
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [previous])
    except errors.LockNotAvailable:
        return None
    return definitions
