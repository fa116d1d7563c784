"""Refreshing one materialized view without blocking its readers, and without ever running twice at once.

Every refresh runs in one transaction that
- refuses a server in recovery (a read replica cannot refresh);
- sets `lock_timeout`, `statement_timeout`, `work_mem` and `TimeZone` (the configured zone, whatever the
  connection's, role's or database's) with SET LOCAL semantics, so they never outlive it;
- takes a per-view advisory lock, waiting at most `lock_timeout`: two refreshes of one view never overlap,
  whoever started them (Dagster, the CLI or a psql session using the same lock);
- skips the view only on a proof that it is unchanged (below);
- runs REFRESH MATERIALIZED VIEW CONCURRENTLY, or a plain REFRESH when the view was never populated,
  or for large views (strategy `auto` or `swap`) builds the new contents beside the view and swaps them
  in (swap.py), falling back to CONCURRENTLY where that cannot be done faithfully.
A view is skipped only when (1) its sources' fingerprint (source_fingerprint.py) equals the one recorded at
its last refresh, (2) the view itself was not written since that refresh (its file node and row counters as
they were just after it: a REFRESH by another session or tool shows), and (3) every write committed before
the decision is counted in the statistics both compare (write_quiescence.py: PostgreSQL 15 or later, no other
session of the database busy, in a transaction or recently active). When (1) and (2) hold and (3) cannot be
shown, the view is refreshed and `note` says why.
The lock ends with the transaction, on success and on failure alike. An interrupted refresh (a run
terminated in the UI) cancels its query in the server before the error goes on.
"""

import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

from analytics_views.postgres import swap, write_quiescence
from analytics_views.postgres.modes import RefreshMode, RefreshStrategy
from analytics_views.postgres.database import view_state
from analytics_views.errors import AnalyticsViewsError
from analytics_views.postgres.source_fingerprint import Fingerprint, source_fingerprint

SKIP_PROOF = (
    "skipped: no source and not the view changed since its last refresh, and no other session of the database "
    f"could hold uncounted writes (each idle for over {write_quiescence.QUIET_AFTER_S} s)"
)
VIEW_WRITTEN = "the view itself was written since its last refresh (a REFRESH by another session or tool)"
_VIEW_MARK = " view:"  # separates the sources' fingerprint from the view's own mark in what a refresh records
# The view's own file node and row counters, as a statement in its own transaction sees them.
_VIEW_MARK_QUERY = """
SELECT pg_stat_clear_snapshot(), concat_ws(':', c.oid, c.relfilenode,
    pg_stat_get_tuples_inserted(c.oid), pg_stat_get_tuples_updated(c.oid), pg_stat_get_tuples_deleted(c.oid))
FROM pg_class AS c WHERE c.oid = %s::regclass
"""
# Tries of the proof when only a transaction started elsewhere between its two looks broke it: the next
# transaction id is the cluster's, so every database's writes move it (Dagster's own events when its storage
# shares the server); each try waits a little longer for a gap between them.
_PROOF_TRIES = 8
_PROOF_RETRY_S = 0.005

# First key of the two-key advisory lock, so ours never collide with other applications' locks:
# pg_advisory_xact_lock(ADVISORY_LOCK_NAMESPACE, hashtext(view)).
ADVISORY_LOCK_NAMESPACE = 0x0A7A11E5

# Failures worth another try: the same refresh may well succeed a little later.
TRANSIENT = (
    errors.LockNotAvailable,  # 55P03 lock_timeout while waiting for the view
    errors.DeadlockDetected,  # 40P01
    errors.SerializationFailure,  # 40001
    errors.AdminShutdown,  # 57P01 backend terminated or server shutting down
    errors.CrashShutdown,  # 57P02
    errors.CannotConnectNow,  # 57P03 server starting up
    psycopg.OperationalError,  # connection lost
)


@dataclass(frozen=True)
class RefreshSettings:
    lock_timeout_s: float = 30.0  # longest wait for the view's lock or for another refresh of it
    statement_timeout_s: float = 3600.0  # longest refresh before PostgreSQL cancels it
    # Memory per sort or hash of the refresh; None keeps the server's. More is not always faster: at 256MB
    # PostgreSQL 15 ran the weekly view 1.5x faster, PostgreSQL 18 1.5x slower (docs/benchmarks.md).
    work_mem_mb: int | None = None
    # TimeZone of every refresh, whatever the connection's, role's or database's: the views' date(), ::date
    # and current_date follow it. The schedules' zone.
    timezone: str = "UTC"


@dataclass(frozen=True)
class RefreshOutcome:
    view: str
    mode: RefreshMode
    duration_s: float
    note: str = ""  # why the mode differs from the strategy asked for, how the swap went, why it cannot skip
    # What the view's sources looked like when it was refreshed, and the view itself just after.
    sources_fingerprint: str | None = None


class RefreshError(AnalyticsViewsError):
    """A refresh that failed; `transient` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


class RefreshSkipped(RefreshError):
    """Another refresh of the same view held its lock for longer than we wait."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


def _holder(conn: psycopg.Connection, view: str) -> str:
    row = conn.execute(
        """
        SELECT a.pid, a.application_name, to_char(a.xact_start AT TIME ZONE 'UTC', 'HH24:MI:SS')
        FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = %s
          AND l.objid::bigint = (hashtext(%s)::bigint & 4294967295) AND l.objsubid = 2
        """,
        [ADVISORY_LOCK_NAMESPACE, view],
    ).fetchone()
    return f"pid {row[0]}, {row[1] or 'no application_name'}, since {row[2]} UTC" if row else "a session"


def _set_timezone(conn: psycopg.Connection, timezone: str) -> None:
    """SET LOCAL TimeZone, or one line naming the setting and the fix."""
    try:
        conn.execute("SELECT set_config('TimeZone', %s, true)", [timezone])
    except errors.InvalidParameterValue:
        raise RefreshError(
            f"timezone {timezone!r} of the analytics_db resource is not a time zone PostgreSQL knows: set it to "
            "a name from pg_timezone_names, such as 'UTC' or 'Europe/Berlin'",
            transient=False,
        ) from None


def _explain(view: str, error: psycopg.Error, settings: RefreshSettings) -> RefreshError:
    """One line naming the view, what went wrong and the fix; transient or not."""
    reason = (error.diag.message_primary or str(error)).strip()
    if isinstance(error, errors.QueryCanceled):
        return RefreshError(
            f"refresh of {view} was cancelled ({reason}); if it hit statement_timeout "
            f"({settings.statement_timeout_s:g} s), raise statement_timeout_s in the analytics_db resource",
            transient=False,
        )
    if isinstance(error, TRANSIENT):
        return RefreshError(f"refresh of {view} interrupted ({reason})", transient=True)
    if isinstance(error, errors.CardinalityViolation):
        fix = "its new data has duplicate rows: fix the view's query so its unique key is unique"
    elif isinstance(error, errors.UniqueViolation):
        fix = "its new data violates its unique index: fix the view's query or the index's columns"
    elif isinstance(error, errors.ObjectNotInPrerequisiteState):
        fix = "it has no usable unique index: create one (see its file in sql/views/)"
    elif isinstance(error, errors.FeatureNotSupported):
        fix = "it is not populated: run a plain REFRESH MATERIALIZED VIEW once"
    elif isinstance(error, errors.UndefinedTable):
        fix = "a relation it needs is missing: run `analytics-views migrate`"
    elif isinstance(error, errors.InsufficientPrivilege):
        fix = "the role lacks privileges: grant them with sql/roles/refresher.sql (see docs/reliability-and-security.md)"
    else:
        fix = "fix the view's SQL or the database, then refresh again"
    return RefreshError(f"refresh of {view} failed and it keeps its previous contents: {fix} ({reason})", transient=False)


def refresh_view(
    conn: psycopg.Connection,
    view: str,
    settings: RefreshSettings = RefreshSettings(),
    strategy: RefreshStrategy = RefreshStrategy.AUTO,
    *,
    schema: str | None = None,
    skip_if_unchanged_since: str | None = None,
    own_sessions: Collection[int] = (),
    own_writes_held: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> RefreshOutcome:
    """REFRESH MATERIALIZED VIEW CONCURRENTLY (or build-and-swap, see `strategy` and swap.py), or a plain
    REFRESH when the view was never populated.

    `schema` names a view made elsewhere (discovered), refreshed CONCURRENTLY; None is the project's own
    view, found on the search_path. With `skip_if_unchanged_since` (the `sources_fingerprint` of the last refresh), a populated
    view proven unchanged since then is left as it is: the cost is catalog look-ups. `own_sessions` are the
    backend pids of the caller's other connections (a run's pool), whose writes the caller accounts for.
    `own_writes_held()` keeps the caller's own writes to the server from starting while a skip's proof looks
    (Dagster's event log on the same server moves the transaction id the proof compares); the proof holds
    without it, it only fails less often.
    `conn` must be in autocommit mode; the refresh makes its own transaction.
    """
    name, view = view, view if schema is None else f"{schema}.{view}"  # `view` names it in messages and locks
    relation = sql.Identifier(name) if schema is None else sql.Identifier(schema, name)
    try:
        with conn.transaction():
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise RefreshError(
                    "the server is in recovery (a read replica) and cannot refresh views: "
                    "point DATABASE_URL at the primary",
                    transient=False,
                )
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true),"
                " set_config('work_mem', coalesce(%s, current_setting('work_mem')), true)",
                [
                    f"{int(settings.lock_timeout_s * 1000)}ms",
                    f"{int(settings.statement_timeout_s * 1000)}ms",
                    f"{settings.work_mem_mb}MB" if settings.work_mem_mb else None,
                ],
            )
            _set_timezone(conn, settings.timezone)
            try:
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [ADVISORY_LOCK_NAMESPACE, view]
                    )
            except errors.LockNotAvailable:
                raise RefreshSkipped(
                    f"skipped {view}: another refresh of it is running ({_holder(conn, view)}) and did not "
                    f"finish within lock_timeout ({settings.lock_timeout_s:g} s); its result will be current"
                ) from None
            state = view_state(conn, name, schema)
            if not state.exists:
                raise RefreshError(
                    f"materialized view {view!r} does not exist in this database: run `analytics-views migrate`",
                    transient=False,
                )
            if not state.is_materialized_view:
                raise RefreshError(
                    f"{view} is now a {state.kind}, not a materialized view: it was replaced since it was "
                    "discovered or migrated; run `analytics-views discover` (a view made elsewhere) or "
                    "`analytics-views migrate` (the project's own)",
                    transient=False,
                )
            if state.populated and state.unique_index is None:
                raise RefreshError(
                    f"{view} has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY: create one "
                    "(unique, no WHERE clause, plain columns; see its file in sql/views/) and refresh again",
                    transient=False,
                )
            last = skip_if_unchanged_since if state.populated else None
            sources, skip, decision = _decide(conn, relation, last, own_sessions, own_writes_held)
            if skip:
                return RefreshOutcome(view, RefreshMode.SKIPPED, 0.0, note=decision, sources_fingerprint=last)
            fingerprint = sources.value
            # CONCURRENTLY is refused on a view that was never populated: the first refresh is a plain one.
            mode = RefreshMode.CONCURRENT if state.populated else RefreshMode.INITIAL_PLAIN
            started = time.perf_counter()
            note = ""
            try:
                if mode == RefreshMode.CONCURRENT and schema is None:
                    mode, note = swap.refresh_populated(conn, name, strategy, lock_wait_s=settings.lock_timeout_s)
                elif mode == RefreshMode.CONCURRENT:
                    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(relation))
                else:
                    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(relation))
                if fingerprint is not None and conn.info.server_version >= write_quiescence.FIRST_VERSION:
                    # The view's mark, read after the commit, must count this refresh's own writes.
                    conn.execute("SELECT pg_stat_force_next_flush()")
            except psycopg.Error:
                raise
            except BaseException:
                # Interrupted from outside (a terminated run): stop the server-side query too. psycopg does
                # this by itself for KeyboardInterrupt, not for Dagster's own interrupt exception.
                conn.cancel_safe(timeout=5)
                raise
            duration = time.perf_counter() - started
            never = f"never skipped: {sources.reason}" if sources.reason else ""
            note = "; ".join(filter(None, [note, decision, never]))
        if fingerprint is not None:
            fingerprint += _VIEW_MARK + _view_mark(conn, relation)
    except RefreshError:
        raise
    except psycopg.Error as error:
        raise _explain(view, error, settings) from error
    return RefreshOutcome(view=view, mode=mode, duration_s=duration, note=note, sources_fingerprint=fingerprint)


def _view_mark(conn: psycopg.Connection, relation: sql.Composable) -> str:
    return conn.execute(_VIEW_MARK_QUERY, [relation.as_string(conn)]).fetchone()[1]


def _decide(
    conn: psycopg.Connection,
    relation: sql.Composable,
    last: str | None,
    own_sessions: Collection[int],
    own_writes_held: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Fingerprint, bool, str]:
    """The sources' fingerprint now, whether the view may be skipped, and the note that says why (not)."""
    previous_sources, marked, previous_view = (last or "").partition(_VIEW_MARK)
    last = last if marked else None  # recorded before the view's mark was: refresh once, and record it
    for attempt in range(_PROOF_TRIES):
        time.sleep(_PROOF_RETRY_S * attempt)
        with own_writes_held() if last else contextlib.nullcontext():
            before = write_quiescence.look(conn, own_sessions) if last else None
            sources = source_fingerprint(conn, relation.as_string(conn), previous_sources or None)
            if not last or sources.value != previous_sources:
                return sources, False, ""
            if _view_mark(conn, relation) != previous_view:
                return sources, False, f"not skipped: {VIEW_WRITTEN}"
            reason = write_quiescence.unproven(before, write_quiescence.look(conn, own_sessions, before.quiet_before))
        if reason is None:
            return sources, True, SKIP_PROOF
        if before.busy or before.version < write_quiescence.FIRST_VERSION:
            break
    return sources, False, f"not skipped, though no source's counters moved: {reason}"
