"""A version of each source relation that changes whenever what the views read from it may have changed.

From the same signal a skip is proven on (source_fingerprint.py, write_quiescence.py), for relations instead
of views:
- a table (with its partitions and inheritance children at every level) or a materialized view: its file
  nodes and insert/update/delete counters, and the statistics' epoch;
- a plain view: its query tree and the versions of what it reads (source_fingerprint of the view);
- what the catalog cannot vouch for (a foreign table, a view calling a volatile function, track_counts off):
  no version, and the reason.
Counters prove nothing while some session may hold uncounted writes: then every version read in that look
is marked unsettled with the time of the look, so it differs from every earlier one (the views that read it
may have fallen behind); once the database is quiet, versions settle on the counters again. Catalog and
statistics reads only: an observation takes no lock and waits for no writer.
"""

import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import psycopg

from analytics_views.postgres import write_quiescence
from analytics_views.postgres.database import RELATION_KINDS
from analytics_views.postgres.source_fingerprint import source_fingerprint

# Each relation with its inheritance children and partitions at every level, their file nodes and counters.
_COUNTED = """
WITH RECURSIVE tree (root, oid) AS (
    SELECT c.oid, c.oid FROM pg_class AS c WHERE c.oid = ANY(%(relations)s::regclass[])
    UNION
    SELECT tree.root, inh.inhrelid FROM tree JOIN pg_inherits AS inh ON inh.inhparent = tree.oid
)
SELECT pg_stat_clear_snapshot(), current_setting('track_counts')::boolean,
    concat_ws(':', pg_postmaster_start_time(), pg_stat_get_bgwriter_stat_reset_time(), pg_stat_get_db_stat_reset_time(
        (SELECT oid FROM pg_database WHERE datname = current_database()))),
    (SELECT coalesce(json_object_agg(root::regclass::text, parts), '{}') FROM (
        SELECT tree.root, json_agg(json_build_array(c.oid::bigint, c.relkind, c.relfilenode::bigint,
            pg_stat_get_tuples_inserted(c.oid), pg_stat_get_tuples_updated(c.oid), pg_stat_get_tuples_deleted(c.oid))
            ORDER BY c.oid) AS parts
        FROM tree JOIN pg_class AS c ON c.oid = tree.oid GROUP BY tree.root) AS by_root)
"""
# Each relation asked for: its kind, and its name as PostgreSQL prints it (the keys of _COUNTED's map).
_KINDS = """
SELECT r, c.relkind::text, c.oid::regclass::text
FROM unnest(%s::text[]) AS r LEFT JOIN pg_class AS c ON c.oid = to_regclass(r)
"""
_COUNTED_KINDS = {"r", "p", "m"}


@dataclass(frozen=True)
class SourceVersion:
    relation: str  # as asked for (regclass text)
    version: str | None  # None: it cannot be observed, see reason
    reason: str = ""  # why there is no version, or why it is unsettled
    settled: bool = True  # False: no proof that every committed write is counted (a new version every look)


def source_versions(
    conn: psycopg.Connection, relations: Sequence[str], own_sessions: Collection[int] = ()
) -> list[SourceVersion]:
    """The version of each relation (regclass text, e.g. `public.events`), in order. `conn` in autocommit."""
    found = {r: (kind, printed) for r, kind, printed in conn.execute(_KINDS, [list(relations)]).fetchall()}
    kinds = {r: kind for r, (kind, _) in found.items()}
    before = write_quiescence.look(conn, own_sessions)
    counted = [r for r in relations if kinds.get(r) in _COUNTED_KINDS]
    tracking, epoch, parts = conn.execute(_COUNTED, {"relations": counted}).fetchone()[1:] if counted else (True, "", {})
    versions = {}
    for relation in relations:
        kind = kinds.get(relation)
        if kind is None:
            versions[relation] = SourceVersion(relation, None, "it does not exist (dropped or renamed)")
        elif kind in _COUNTED_KINDS and not tracking:
            versions[relation] = SourceVersion(relation, None, "track_counts is off, so PostgreSQL counts no writes")
        elif kind in _COUNTED_KINDS:
            digest = hashlib.md5(json.dumps([epoch, parts.get(found[relation][1], [])]).encode()).hexdigest()
            versions[relation] = SourceVersion(relation, digest)
        elif kind == "v":
            below = source_fingerprint(conn, relation)
            value = below.value and hashlib.md5(below.value.encode()).hexdigest()
            versions[relation] = SourceVersion(relation, value, below.reason)
        else:
            what = RELATION_KINDS.get(kind, f"relation of kind {kind!r}")
            versions[relation] = SourceVersion(relation, None, f"it is a {what}, whose changes PostgreSQL does not count")
    after = write_quiescence.look(conn, own_sessions, before.quiet_before)
    unsettled = write_quiescence.unproven(before, after)
    if unsettled:
        now = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
        versions = {
            r: SourceVersion(r, f"{v.version} unsettled@{now}", f"may have changed: {unsettled}", settled=False)
            if v.version else v
            for r, v in versions.items()
        }
    return [versions[relation] for relation in relations]
