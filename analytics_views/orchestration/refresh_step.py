"""How one step refreshes many views: in dependency order, over a bounded pool of connections in threads, as
dagster-dbt runs dbt's threads inside one step.

Each view is refreshed on a pool thread with its own connection; the step (the main thread) yields each
view's materialization and check results as soon as it is done, so the UI shows a view refreshed while the
others go on. A view is started once every view it reads in the selection is done; a failed view fails alone:
the views reading it are not started, and the step fails at the end naming every failed view, why, and the
views left out because of them. A transient failure (lost connection, lock timeout, deadlock, ...) is retried
with TRANSIENT_RETRY's backoff, for that view only. Terminating the run cancels every query in flight at once.
A view that failed a blocking check (ERROR severity) is done, but the views reading it are not started either,
and say which check stopped them.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from graphlib import TopologicalSorter

import dagster as dg
import psycopg

from analytics_views.postgres.modes import RefreshMode
from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.postgres.refresh import RefreshError, RefreshOutcome, refresh_view
from analytics_views.sql_files.views import ViewDefinition

# Transient failures are retried with this policy's backoff, inside the step, per view.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
# Metadata of the step's failure: {view label: reason} for every view the step did not refresh.
NOT_REFRESHED = keys.ours("not_refreshed")
# The last attempt's cause comes first; then what an operator does about a failure that kept coming back.
GAVE_UP = (
    "the same failure came back in all {attempts} attempts: check the server (its log, restarts, connection "
    "limits, sessions holding the view's lock) and the network, then refresh again"
)
_POLL_S = 0.5


class ViewFailed(Exception):
    """A view's refresh failed for good: its one-line reason, and the events to yield all the same (a failed
    `unique_index` check)."""

    def __init__(self, reason: str, events: list | tuple = ()):
        super().__init__(reason)
        self.events = list(events)


@dataclass
class ViewRefresh:
    """What a pool thread hands the step for one view: its refresh's outcome and the events to yield."""

    outcome: RefreshOutcome
    events: list = field(default_factory=list)


class Sessions:
    """The step's connections, one per pool thread, opened when first needed and reopened when lost; every
    query in flight on them is cancelled by `cancel_all`."""

    def __init__(self, analytics_db: AnalyticsDatabase, run_id: str, stack: ExitStack):
        self._db, self._run_id, self._stack = analytics_db, run_id[:8], stack
        self._lock = threading.Lock()
        self._by_thread: dict[int, psycopg.Connection] = {}

    def connection(self, label: str) -> psycopg.Connection:
        """This thread's connection, named for the DBA after the view it refreshes (`analytics-views <view> run
        <run id>`, as pg_stat_activity and PostgreSQL's log show it)."""
        name = f"analytics-views {label} run {self._run_id}"
        thread = threading.get_ident()
        conn = self._by_thread.get(thread)
        if conn is None or conn.closed or conn.broken:
            opening = self._db.connection(name)
            conn = opening.__enter__()
            with self._lock:  # closed with the step
                self._stack.push(opening.__exit__)
                self._by_thread[thread] = conn
        else:
            conn.execute("SELECT set_config('application_name', %s, false)", [name])
        return conn

    def __iter__(self):
        """The backend pids of the step's connections as of now: a skip's proof looks at the database twice and
        reads them at each look, so a connection another pool thread opens in between is known as the run's."""
        with self._lock:
            return iter([c.info.backend_pid for c in self._by_thread.values() if not c.closed])

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_thread)

    def cancel_all(self) -> None:
        with self._lock:
            connections = list(self._by_thread.values())
        for conn in connections:
            if not conn.closed:
                conn.cancel_safe(timeout=5)


class EventWriteGate:
    """Keeps the step's event writes (Dagster's, on the main thread, as it takes each yielded event) and the skip
    proofs' looks (on the pool threads) apart. A proof compares the server's next transaction id before and
    after it reads the statistics, and every event Dagster writes to a storage on the same server moves it: with
    the gate a proof is not broken by the run's own events (at 500 views, half the proofs took 2 to 8 tries
    without it). Looks share the gate; a write waits for the looks in progress, and new looks wait for it. A
    look waits at most LOOK_WAIT_S for a write, then goes on: the gate only spares tries, the proof does not
    rely on it."""

    LOOK_WAIT_S = 1.0

    def __init__(self):
        self._changed = threading.Condition()
        self._looking = 0
        self._writing = self._write_waiting = False

    @contextmanager
    def looking(self):
        with self._changed:
            self._changed.wait_for(lambda: not (self._writing or self._write_waiting), timeout=self.LOOK_WAIT_S)
            self._looking += 1
        try:
            yield
        finally:
            with self._changed:
                self._looking -= 1
                self._changed.notify_all()

    @contextmanager
    def writing(self):
        with self._changed:
            self._write_waiting = True
            self._changed.wait_for(lambda: self._looking == 0, timeout=self.LOOK_WAIT_S)
            self._writing, self._write_waiting = True, False
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


# refresh_one(conn, view, last_metadata, options): refreshes one view; `last_metadata` is its last
# materialization's (for a skip: the rows did not change), `options` the keyword arguments of refresh_view that
# the run decides (skip_if_unchanged_since, own_sessions, own_writes_held).
RefreshOne = Callable[[psycopg.Connection, ViewDefinition, dict, dict], ViewRefresh]


def refresh_in_dependency_order(
    context: dg.AssetExecutionContext,
    analytics_db: AnalyticsDatabase,
    views: list[ViewDefinition],
    refresh_one: RefreshOne,
    key_of: Callable[[ViewDefinition], dg.AssetKey],
    reads_of: Callable[[ViewDefinition], Sequence[dg.AssetKey]],
) -> Iterator:
    """Refreshes `views` (each its asset key, `key_of`, reading the assets `reads_of` gives) over at most
    `analytics_db.refresh_connections` connections, each once the views it reads among them are done; yields
    each view's events as it finishes, then fails naming the views that failed or were left out."""
    by_key = {key_of(view): view for view in views}
    reads = {key: [dep for dep in reads_of(view) if dep in by_key and dep != key] for key, view in by_key.items()}
    order = TopologicalSorter(reads)
    order.prepare()
    # Only a skip reads the last materialization (its fingerprint and row count): read in one query for all.
    last_metadata = _last_metadata(context, list(by_key)) if analytics_db.skip_unchanged else {}
    results: queue.SimpleQueue = queue.SimpleQueue()
    stopping = threading.Event()
    refreshed: set[dg.AssetKey] = set()  # refreshed, not skipped
    done: set[dg.AssetKey] = set()
    failed: dict[dg.AssetKey, str] = {}
    blocked: dict[dg.AssetKey, list[str]] = {}  # the blocking checks each view failed

    with ExitStack() as stack:
        sessions = Sessions(analytics_db, context.run.run_id, stack)
        gate = EventWriteGate()

        def task(key: dg.AssetKey, skip_since: str | None) -> None:
            view = by_key[key]
            try:
                outcome = _with_retries(view, sessions, gate, refresh_one, last_metadata.get(key, {}), skip_since, stopping, results, key)
                results.put((key, "done", outcome))
            except ViewFailed as error:
                results.put((key, "failed", error))
            except BaseException as error:  # noqa: BLE001 - one view's bug must not hang the step
                results.put((key, "failed", ViewFailed(f"{type(error).__name__}: {' '.join(str(error).split())}")))

        workers = max(1, min(analytics_db.refresh_connections, len(by_key)))
        threads: list[threading.Thread] = []
        ready: list[dg.AssetKey] = []
        running = 0
        try:
            while True:
                ready.extend(order.get_ready())
                while ready and running < workers:
                    key = ready.pop(0)
                    # A view reading a view this run refreshed must be refreshed: its sources just changed.
                    fingerprint = last_metadata.get(key, {}).get(keys.SOURCES_FINGERPRINT)
                    skip_since = None if any(dep in refreshed for dep in reads[key]) else fingerprint or None
                    thread = threading.Thread(target=task, args=(key, skip_since), name=f"refresh {by_key[key].label}")
                    thread.start()
                    threads.append(thread)
                    running += 1
                if not running:
                    break
                try:
                    key, kind, payload = results.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if kind == "retry":
                    context.log.warning(payload)
                    continue
                running -= 1
                if checks := failed_blocking_checks(payload.events):
                    blocked[key] = checks
                if kind == "failed":
                    failed[key] = str(payload)
                    context.log.error(f"{by_key[key].label}: {payload}")
                else:
                    if payload.outcome.mode != RefreshMode.SKIPPED:
                        refreshed.add(key)
                    done.add(key)
                with gate.writing():  # Dagster writes each event as it takes it, before it asks for the next
                    yield from map(as_event, payload.events)
                if kind != "failed" and key not in blocked:  # else the views reading it never become ready
                    order.done(key)
        except BaseException:  # the run was terminated (or the step broke): start nothing more, cancel the queries
            stopping.set()
            sessions.cancel_all()
            raise
        finally:
            stopping.set()
            for thread in threads:
                thread.join()

    left_out = _left_out(by_key, reads, failed, done, blocked)
    for key, reason in left_out.items():
        context.log.error(f"{by_key[key].label}: {reason}")
    context.log.info(
        f"{len(done)} of {len(by_key)} views done ({len(refreshed)} refreshed, {len(done) - len(refreshed)} skipped) "
        f"over {workers} connections"
    )
    if failed or left_out:
        reasons = {by_key[key].label: reason for key, reason in {**failed, **left_out}.items()}
        raise dg.Failure(
            description="; ".join(f"{label}: {reason}" for label, reason in reasons.items()),
            metadata={NOT_REFRESHED: dg.MetadataValue.json(reasons)},
            allow_retries=False,
        )


def failed_blocking_checks(events) -> list[str]:
    """The names of the blocking checks among `events` that failed. Our blocking checks are exactly those of
    ERROR severity (unique_index, data tests of severity error: assets.py and view_checks.py)."""
    return [
        event.check_name
        for event in events
        if isinstance(event, dg.AssetCheckResult) and not event.passed and event.severity == dg.AssetCheckSeverity.ERROR
    ]


def as_event(result: dg.MaterializeResult | dg.AssetCheckResult) -> dg.AssetMaterialization | dg.AssetCheckEvaluation:
    """A view's result as the event it records, not as an output of the step: an output adds a STEP_OUTPUT
    event per view and per check, and dagster-postgres writes each event on connections of its own
    (docs/benchmarks.md, *Scale*). The outputs are optional (can_subset), so the run records the same
    materializations and check evaluations, two events a view fewer."""
    if isinstance(result, dg.MaterializeResult):
        # An event yielded by the step gets no version tags from Dagster (only outputs do): they are written here.
        version = result.data_version
        tags = {
            **(result.tags or {}),
            **({keys.DATA_VERSION_TAG: version.value, keys.DATA_VERSION_IS_USER_PROVIDED_TAG: "true"} if version else {}),
        }
        return dg.AssetMaterialization(asset_key=result.asset_key, metadata=result.metadata, tags=tags or None)
    return dg.AssetCheckEvaluation(
        asset_key=result.asset_key,
        check_name=result.check_name,
        passed=result.passed,
        metadata=result.metadata,
        severity=result.severity,
        description=result.description,
    )


def _with_retries(
    view: ViewDefinition,
    sessions: Sessions,
    gate: EventWriteGate,
    refresh_one: RefreshOne,
    last_metadata: dict,
    skip_since: str | None,
    stopping: threading.Event,
    results: queue.SimpleQueue,
    key: dg.AssetKey,
) -> ViewRefresh:
    """One view's refresh on this thread's connection, a transient failure retried after TRANSIENT_RETRY's
    backoff (a lost connection is reopened)."""
    attempt = 0
    while True:
        if stopping.is_set():
            raise ViewFailed("not refreshed: the run is stopping")
        try:
            conn = sessions.connection(view.label)
            # The pool's other connections: their writes are this run's refreshes, which the skip accounts for.
            options: dict = {"skip_if_unchanged_since": skip_since, "own_sessions": sessions, "own_writes_held": gate.looking}
            return refresh_one(conn, view, last_metadata, options)
        except ViewFailed:
            raise
        except dg.Failure as error:
            raise ViewFailed(error.description or str(error)) from None
        except (RefreshError, AnalyticsViewsError, psycopg.OperationalError) as error:
            transient = getattr(error, "transient", isinstance(error, psycopg.OperationalError))
            message = " ".join(str(error).split())
            if not transient or attempt >= TRANSIENT_RETRY.max_retries:
                raise ViewFailed(f"{message}; {GAVE_UP.format(attempts=attempt + 1)}" if transient else message) from None
            attempt += 1
            delay = TRANSIENT_RETRY.calculate_delay(attempt)
            results.put((key, "retry", f"{view.label}: {message}; retry {attempt} of {TRANSIENT_RETRY.max_retries} in {delay:.1f} s"))
            if stopping.wait(delay):
                raise ViewFailed("not refreshed: the run is stopping") from None


def _last_metadata(context: dg.AssetExecutionContext, asset_keys: list[dg.AssetKey]) -> dict[dg.AssetKey, dict]:
    """Each view's last materialization's metadata, as plain values, and its data version (under
    `dagster/data_version`, which a skip keeps), read in one query for all the views. A
    materialization recorded before the fingerprint's key was namespaced (plain `sources_fingerprint`) gives
    none: the first refresh after the upgrade runs, and records the new key."""
    last = {}
    for record in context.instance.get_asset_records(asset_keys):
        entry = record.asset_entry.last_materialization
        materialization = entry.asset_materialization if entry else None
        if materialization is not None:
            last[record.asset_entry.asset_key] = {name: value.value for name, value in materialization.metadata.items()}
            if version := (entry.tags or {}).get(keys.DATA_VERSION_TAG):
                last[record.asset_entry.asset_key][keys.DATA_VERSION_TAG] = version
    return last


def _left_out(
    by_key: dict[dg.AssetKey, ViewDefinition],
    reads: dict[dg.AssetKey, list[dg.AssetKey]],
    failed: dict[dg.AssetKey, str],
    done: set[dg.AssetKey],
    blocked: dict[dg.AssetKey, list[str]] | None = None,
) -> dict[dg.AssetKey, str]:
    """Why each view neither done nor failed was left out: the failed views it reads, directly or not, naming
    the blocking checks they failed."""
    reasons: dict[dg.AssetKey, str] = {}
    blocked = blocked or {}

    def failed_below(key: dg.AssetKey, seen: set) -> set[dg.AssetKey]:
        below: set[dg.AssetKey] = set()
        for dep in reads[key]:
            if dep in failed or dep in blocked:
                below.add(dep)
            elif dep not in done and dep not in seen:
                seen.add(dep)
                below |= failed_below(dep, seen)
        return below

    for key in by_key:
        if key in done or key in failed:
            continue
        below = failed_below(key, set())
        culprits = sorted(by_key[dep].label for dep in below if dep in failed)
        checked = sorted(
            f"{by_key[dep].label}, whose blocking check {', '.join(blocked[dep])} failed" for dep in below if dep in blocked and dep not in failed
        )
        reasons[key] = (
            "not refreshed: it reads " + "; ".join([*([f"{', '.join(culprits)}, which failed"] if culprits else []), *checked])
            if below
            else "not refreshed: the run stopped"
        )
    return reasons
