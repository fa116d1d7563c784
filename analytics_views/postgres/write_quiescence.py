"""Whether every write committed so far is counted in PostgreSQL's statistics: what turns equal counters
into a proof that a view is unchanged (refresh.py skips only on that proof).

The counters a source fingerprint compares (pg_stat_all_tables' inserts, updates and deletes) are not
transactional: a backend adds its counts to shared memory only when it reports its statistics. What
PostgreSQL 15 and later do (src/backend/utils/activity/pgstat.c `pgstat_report_stat`, and the idle branch
of `PostgresMain` in src/backend/tcop/postgres.c; the documentation's "The Cumulative Statistics System"
says only that a backend reports "just before going idle" and that a report can be delayed):
- a client backend reports when it is about to go idle outside a transaction, before it sets its state to
  `idle` and sends ReadyForQuery. The report is skipped when the last one is under PGSTAT_MIN_INTERVAL
  (1 s) old, or partial when a lock on a statistics entry is taken (it does not wait); then an
  IDLE_STATS_UPDATE_TIMEOUT of PGSTAT_IDLE_INTERVAL (10 s) is armed, and when it fires while the backend is
  still idle outside a transaction, the report is forced (it waits for the locks, held for microseconds);
- a backend that is running a statement (a `CALL` that COMMITs per batch, `COMMIT; SELECT pg_sleep(100)`
  sent as one string) or that is idle *in* a transaction does not report at all until it goes idle
  outside one; neither does anything else report on a timer. Background workers (pg_cron's jobs,
  logical replication apply workers, extensions' workers) report when their own code calls for it;
- a backend that exits reports from its exit hooks (pgstat_shutdown_hook), a moment after it leaves
  pg_stat_activity (pgstat_beshutdown_hook runs first);
- before PostgreSQL 15, counts travelled to a collector process over UDP and could be dropped.

So, on PostgreSQL 15 and later, all committed writes are counted when, over the whole reading of the
counters, every other backend connected to the database is a client backend that has been `idle` for
longer than QUIET_AFTER_S, or one that cannot write rows (autovacuum, a WAL sender). This module looks at
pg_stat_activity before the counters are read and again after, and compares the next transaction id
(pg_snapshot_xmax of a new snapshot) at both looks: an unchanged id means that no transaction that could
have written was started in between, so no session can have connected, written and left between the looks
unseen. Sessions the caller owns (the other connections of the same run) are named by pid and left out, with
their parallel workers (which only read: the leader writes a refresh's rows).

On a database where some session is always busy, in a transaction or recently active, this proves nothing
and every view is refreshed: that is the price of never reporting a stale view as unchanged.
"""

from collections.abc import Collection
from dataclasses import dataclass

import psycopg

# PGSTAT_IDLE_INTERVAL (10 s), after which an idle backend's pending counts are forced out, plus 2 s for the
# timer's firing and the forced report's waits on statistics entries' locks.
QUIET_AFTER_S = 12
FIRST_VERSION = 150000  # shared-memory statistics: before 15 they could be lost on the way
# Backend types that connect to a database without ever counting inserted, updated or deleted rows.
_NON_WRITING = ("autovacuum worker", "walsender")

# One look at the database's other backends: the next transaction id, the quiet threshold (taken at the first
# look and passed to the second) and every backend that breaks quiescence, described.
_LOOK = """
SELECT pg_stat_clear_snapshot(), pg_snapshot_xmax(pg_current_snapshot())::text,
    coalesce(%(quiet_before)s, clock_timestamp() - make_interval(secs => %(quiet_after_s)s)),
    current_setting('server_version_num')::int,
    (SELECT coalesce(json_agg(json_build_array(
            a.pid, a.backend_type, a.state, a.application_name,
            round(extract(epoch FROM clock_timestamp() - a.state_change))) ORDER BY a.pid), '[]')
     FROM pg_stat_activity AS a
     WHERE a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND a.pid <> pg_backend_pid() AND a.pid <> ALL(%(own)s::int[])
       AND coalesce(a.leader_pid, 0) <> pg_backend_pid() AND coalesce(a.leader_pid, 0) <> ALL(%(own)s::int[])
       AND a.backend_type <> ALL(%(non_writing)s::text[])
       AND NOT (a.backend_type = 'client backend' AND a.state = 'idle'
                AND a.state_change < coalesce(%(quiet_before)s, clock_timestamp() - make_interval(secs => %(quiet_after_s)s))))
"""


@dataclass(frozen=True)
class Look:
    next_xid: str
    quiet_before: object  # the timestamp before which every other session must have gone idle
    version: int
    busy: list  # [pid, backend_type, state, application_name, seconds in that state]


def look(conn: psycopg.Connection, own_sessions: Collection[int] = (), quiet_before=None) -> Look:
    """The database's other sessions as of now; `quiet_before` from the first look keeps one threshold."""
    _, next_xid, threshold, version, busy = conn.execute(
        _LOOK,
        {"quiet_before": quiet_before, "quiet_after_s": QUIET_AFTER_S, "own": sorted(own_sessions), "non_writing": list(_NON_WRITING)},
    ).fetchone()
    return Look(next_xid, threshold, version, busy)


def unproven(before: Look, after: Look) -> str | None:
    """Why the counters read between the two looks may miss a committed write; None when they cannot."""
    if before.version < FIRST_VERSION:
        return (
            f"PostgreSQL {before.version // 10000} sends its statistics over a channel that may drop them, so equal "
            "counters prove nothing (PostgreSQL 15 and later can prove a view unchanged)"
        )
    for sessions in (before.busy, after.busy):
        if sessions:
            return f"{_describe(sessions[0])}{f' (and {len(sessions) - 1} more)' if len(sessions) > 1 else ''}"
    if before.next_xid != after.next_xid:
        return "a transaction started while the counters were read, in a session that may have left unseen"
    return None


def _describe(session: list) -> str:
    pid, backend_type, state, application, seconds = session
    who = f"{backend_type} pid {pid}{f' ({application})' if application else ''}"
    if backend_type != "client backend":
        return f"the {who} is connected to the database, and reports its counts only when its own code does"
    if state is None:
        return (
            f"the {who} belongs to another role whose state this role may not see: grant it pg_read_all_stats "
            "so that quiet sessions can be told apart"
        )
    if state == "idle":
        return (
            f"the {who} went idle {seconds:g} s ago, and PostgreSQL may hold its last counts for up to "
            f"{QUIET_AFTER_S} s after that"
        )
    return f"the {who} is {state} ({seconds:g} s), and reports the counts of what it committed only when it goes idle"
