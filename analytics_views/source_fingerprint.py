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
built-in and may read tables, track_counts off), there is no fingerprint, only
the reason: such a view is refreshed every time.

Counters are PostgreSQL's cumulative statistics, which a writing session reports when it goes idle
(within about a second, longer under heavy lock contention), so a change committed in the last moment
may be seen only by the next refresh. pg_stat_reset_single_table_counters() on a source is not seen.
"""

import functools
import hashlib
import re
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
_SESSION_ZONE_NAME = "TimeZone"  # how the fingerprint names it: the day in the refresh's zone


@dataclass(frozen=True)
class Fingerprint:
    value: str | None  # None: the view must be refreshed every time
    reason: str = ""  # why there is no value


# The query trees of the view's SELECT rule and of the ordinary views it reads, level by level. The trees,
# not pg_depend, say what a query reads and calls: pg_depend records nothing on PostgreSQL's own (pinned)
# objects, such as random() or pg_class. Read in Python: PostgreSQL's regexp takes milliseconds per tree.
_ROOT_TREE = """
SELECT pg_stat_clear_snapshot(), rule.ev_class::bigint, rule.ev_class::regclass::text, rule.ev_action::text
FROM pg_rewrite AS rule WHERE rule.ev_class = %s::regclass AND rule.ev_type = '1'
"""
_RELATION_READ = re.compile(r":relid (\d+)")
_FUNCTION_CALLED = re.compile(r":(funcid|opfuncid|opno|aggfnoid|winfnoid) (\d+)")

# Every relation read with its inheritance children and partitions at every level, their kinds, file nodes
# and counters (pg_stat_all_tables, unfiltered, costs milliseconds; its counters are visible to any role);
# every function called (operators through their function); the settings that matter.
_CATALOG = """
WITH RECURSIVE relation (oid) AS (
    SELECT unnest(%(relations)s::oid[])
    UNION
    SELECT inh.inhrelid FROM relation JOIN pg_inherits AS inh ON inh.inhparent = relation.oid
)
SELECT
    current_setting('track_counts')::boolean,
    concat_ws(':', pg_postmaster_start_time(), pg_stat_get_db_stat_reset_time(
        (SELECT oid FROM pg_database WHERE datname = current_database()))),
    (SELECT coalesce(json_agg(json_build_array(c.oid::bigint, c.oid::regclass::text, c.relkind, c.relfilenode::bigint,
            pg_stat_get_tuples_inserted(c.oid), pg_stat_get_tuples_updated(c.oid), pg_stat_get_tuples_deleted(c.oid))
            ORDER BY c.oid), '[]')
     FROM relation JOIN pg_class AS c ON c.oid = relation.oid),
    (SELECT coalesce(json_agg(json_build_array(p.oid::bigint, p.oid::regprocedure::text, p.proname, p.provolatile)
            ORDER BY p.oid), '[]')
     FROM pg_proc AS p
     WHERE p.oid = ANY(%(functions)s::oid[])
        OR p.oid IN (SELECT oprcode::oid FROM pg_operator WHERE oid = ANY(%(operators)s::oid[]))),
    current_setting('TimeZone'),
    (SELECT coalesce(json_agg(json_build_array(rule.ev_class::bigint, rule.ev_class::regclass::text, rule.ev_action::text)
            ORDER BY rule.ev_class), '[]')
     FROM relation JOIN pg_class AS c ON c.oid = relation.oid AND c.relkind = 'v'
     JOIN pg_rewrite AS rule ON rule.ev_class = c.oid AND rule.ev_type = '1'),
    (SELECT coalesce(json_agg(json_build_array(
            zone, (now() AT TIME ZONE coalesce(nullif(zone, ''), current_setting('TimeZone')))::date::text) ORDER BY zone), '[]')
     FROM unnest(%(zones)s::text[]) AS zone)
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


def source_fingerprint(conn: psycopg.Connection, view: str, previous: str | None = None) -> Fingerprint:
    """The fingerprint of `view` (a regclass text, e.g. `product.cohort_stats`) as the current transaction
    sees it, or why there is none. Call it inside the refresh's transaction, after its TimeZone is set.

    `previous`, the fingerprint of the last refresh, saves reading the clock from the SQL again: when the
    query trees are the same, so are the zones whose day the result follows (it names them).
    """
    # Counters as of now, not of this transaction's first read of them (pg_stat_clear_snapshot).
    _, root, name, tree = conn.execute(_ROOT_TREE, [view]).fetchone()
    rules, read, called, operators, unread = [], set(), set(), set(), [(root, name, tree)]
    while unread:  # the ordinary views read, level by level
        for oid, name, tree in unread:
            rules.append((oid, name, oid == root, tree, "{SQLVALUEFUNCTION " in tree))
            read |= {int(relid) for relid in _RELATION_READ.findall(tree)} - {oid, root}  # build-and-swap renews root
            for field, number in _FUNCTION_CALLED.findall(tree):
                (operators if field == "opno" else called).add(int(number))
        trees = hashlib.md5(repr([tree for _, _, _, tree, _ in rules]).encode()).hexdigest()
        zones = _previous_zones(previous, trees)
        counting, epoch, relations, functions, timezone, views, days = conn.execute(
            _CATALOG,
            {"relations": sorted(read), "functions": sorted(called), "operators": sorted(operators), "zones": sorted(zones or ())},
        ).fetchone()
        followed = {oid for oid, *_ in rules}
        unread = [(oid, name, tree) for oid, name, tree in views if oid not in followed]
    if not counting:
        return Fingerprint(None, "track_counts is off, so PostgreSQL does not count writes to its sources")
    for _oid, name, kind, *_ in relations:
        if kind in _UNCOUNTED_KINDS:
            return Fingerprint(None, f"it reads the {_UNCOUNTED_KINDS[kind]} {name}, whose changes PostgreSQL does not count")
        if kind not in _COUNTED_KINDS and kind != "v":
            return Fingerprint(None, f"it depends on {name}, of relation kind {kind!r}, whose changes we cannot tell")
    clock_called = reads_clock = False
    for oid, signature, proname, volatility in functions:
        if volatility == "v":
            return Fingerprint(None, f"it calls the volatile function {signature}, whose result may change any time")
        if oid >= _FIRST_USER_OID and volatility != "i":
            return Fingerprint(None, f"it calls the function {signature}, which may read tables the catalog does not show")
        clock_called |= proname in _TRANSACTION_CLOCK
        reads_clock |= proname in _CLOCK_NAMES and volatility != "i"
    if zones is None and (reads_clock or any(reads_sql_clock for *_, reads_sql_clock in rules)):
        definitions = _definitions(conn, [oid for oid, *_ in rules])
        if definitions is None:
            return Fingerprint(None, "its SQL reads the clock, and its definition could not be read while a source is locked")
        zones = set()
        for (_oid, name, is_view, *_), definition in zip(rules, definitions):
            found, reason = _clock_zones(definition)
            if reason:
                return Fingerprint(None, reason if is_view else f"{reason} in the view {name} it reads")
            zones |= found
        if clock_called and not zones:
            return Fingerprint(None, "it calls now() in a way its SQL does not show")
        if zones:
            days = conn.execute(
                "SELECT zone, (now() AT TIME ZONE coalesce(nullif(zone, ''), current_setting('TimeZone')))::date::text"
                " FROM unnest(%s::text[]) AS zone ORDER BY 1",
                [sorted(zones)],
            ).fetchall()
    # Names are left out: they depend on the search_path, the oids do not.
    counted = [(oid, kind, node, counters) for oid, _name, kind, node, *counters in relations]
    digest = hashlib.md5(repr((timezone, epoch, counted, trees)).encode()).hexdigest()
    return Fingerprint(" ".join([digest, trees, *(f"{zone or _SESSION_ZONE_NAME}={day}" for zone, day in days)]))


def _previous_zones(previous: str | None, trees: str) -> set[str] | None:
    """The zones named in the previous fingerprint when it was taken of the same query trees, else None."""
    digest, previous_trees, *days = (previous or "").split(" ") + ["", ""]
    days = [day for day in days if day]
    if not digest or previous_trees != trees or not all("=" in day for day in days):
        return None
    zones = {day.rpartition("=")[0] for day in days}
    return {"" if zone == _SESSION_ZONE_NAME else zone for zone in zones}


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
