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
  cumulative insert/update/delete counters, plus the statistics' epoch (a server restart, a crash's
  recovery, which discards the statistics and resets the fixed ones' time, or a pg_stat_reset() starts the
  counters again).
The clock is read from the SQL of the view and of the views it reads: a result that follows the date in a
zone (current_date, (now() AT TIME ZONE 'UTC')::date, date_trunc('day', now())) adds that date to the
fingerprint; anything finer (now() - interval '6 hours') cannot be fingerprinted. That SQL (pg_get_viewdef)
is read only where the query tree calls a clock function or current_date: it locks the sources, so it
waits for them at most 50 ms and otherwise gives no fingerprint; every other look-up takes no lock.

Where the catalog cannot tell (a foreign table, a sequence, a volatile function, a function that is not a
built-in and may read tables, track_counts off), there is no fingerprint, only
the reason: such a view is refreshed every time.

Counters are PostgreSQL's cumulative statistics, which a writing session reports late (when it goes idle,
and not while a procedure or a transaction stays open): counters that moved mean a change, equal counters
mean no change only when write_quiescence.py shows that no committed write can still be uncounted.
pg_stat_reset_single_table_counters() on a source is not seen.
"""

import hashlib
import re
from dataclasses import dataclass

import psycopg
from psycopg import errors

# Objects with a lower oid were made by initdb: PostgreSQL's own functions (FirstNormalObjectId).
_FIRST_USER_OID = 16384
# Built-in functions whose value is the transaction's start time: read through the SQL text (below).
TRANSACTION_CLOCK = frozenset({"now", "transaction_timestamp", "statement_timestamp"})
# Words that may read the clock (or, for mxid_age, the transaction counter); without any, no SQL is parsed.
CLOCK_NAMES = frozenset(
    {"now", "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
     "transaction_timestamp", "statement_timestamp", "clock_timestamp", "timeofday", "age", "mxid_age"}
)
# date_trunc units no finer than a day: the result changes at most once a day.
DAY_UNITS = frozenset({"DAY", "WEEK", "MONTH", "QUARTER", "YEAR", "DECADE", "CENTURY", "MILLENNIUM"})
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
    concat_ws(':', pg_postmaster_start_time(), pg_stat_get_bgwriter_stat_reset_time(), pg_stat_get_db_stat_reset_time(
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
        clock_called |= proname in TRANSACTION_CLOCK
        reads_clock |= proname in CLOCK_NAMES and volatility != "i"
    if zones is None and (reads_clock or any(reads_sql_clock for *_, reads_sql_clock in rules)):
        definitions = _definitions(conn, [oid for oid, *_ in rules])
        if definitions is None:
            return Fingerprint(None, "its SQL reads the clock, and its definition could not be read while a source is locked")
        from analytics_views.postgres.clock_readings import clock_zones  # sqlglot, only for views that read the clock

        zones = set()
        for (_oid, name, is_view, *_), definition in zip(rules, definitions):
            found, reason = clock_zones(definition)
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
