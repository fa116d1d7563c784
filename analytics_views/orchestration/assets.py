"""One Dagster asset per managed materialized view, and one per source table they read.

What an asset is called and shows (key, group, description, owners, tags, kinds, metadata, freshness, code
references) is the translator's (translator.py); here the spec gets its refresh, its pool and its checks
(`unique_index`, `matches_discovery`, the static checks and data tests of view_checks.py).
"""

import multiprocessing
import os
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg

from analytics_views.postgres import database
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration import view_checks
from analytics_views.orchestration.translator import UndeclaredTable, ViewTranslator, table_schema
from analytics_views.sql_files.discovery import current_fingerprint, managed_views
from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.managed import DEFAULT_CADENCES, Cadence, ManagedConfig
from analytics_views.postgres.refresh import SKIPPED, RefreshError, refresh_view
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.source_tables import load_source_tables
from analytics_views.sql_files.views import ViewDefinition, source_tables

UNIQUE_INDEX_CHECK = "unique_index"
MATCHES_DISCOVERY_CHECK = "matches_discovery"

# Transient failures (lost connection, lock timeout, deadlock, ...) are retried with this policy's backoff;
# permanent ones raise Failure(allow_retries=False) and fail at once. The step asks for the retry itself
# (RetryRequested) rather than carrying the policy: with a retry policy, Dagster also retries a step whose
# run was terminated while the step ran in the run's own process (dagster-io/dagster#15026), as the CLI's
# runs and `in_process` runs do.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def retry_later(context: dg.AssetExecutionContext) -> dg.RetryRequested:
    """Ask Dagster to run the step again after TRANSIENT_RETRY's backoff (it fails after its max_retries)."""
    return dg.RetryRequested(
        max_retries=TRANSIENT_RETRY.max_retries,
        seconds_to_wait=TRANSIENT_RETRY.calculate_delay(context.retry_number + 1),
    )


@contextmanager
def cancel_on_interrupt(conn) -> Iterator[None]:
    """The refresh stops with its run. A terminated run interrupts its steps (DagsterExecutionInterruptedError,
    raised by Dagster's SIGINT handler in the step's process): cancel the query in the server too, so the view
    keeps its contents and its lock is freed at once (psycopg cancels by itself on KeyboardInterrupt only). And
    a step in a process of its own outlives a run worker killed with SIGKILL (out of memory, `kill -9`): when
    the worker that started it dies, the step cancels its query and exits, as it would have died with it."""
    worker = multiprocessing.parent_process()  # None when the step runs in the run worker itself
    done = threading.Event()

    def follow_the_worker() -> None:
        while not done.is_set():
            worker.join(0.5)
            if not worker.is_alive() and not done.is_set():
                conn.cancel_safe(timeout=5)
                os._exit(1)

    if worker is not None:
        threading.Thread(target=follow_the_worker, name="follow the run worker", daemon=True).start()
    try:
        yield
    except dg.DagsterExecutionInterruptedError:
        conn.cancel_safe(timeout=5)
        raise
    finally:
        done.set()


_UNIQUE_INDEX_DDL = re.compile(r"CREATE\s+UNIQUE\s+INDEX\s+[^;]+;", re.IGNORECASE)


def unique_index_fix(view: ViewDefinition) -> str:
    """How to repair a missing unique index: the statement from the view's own SQL file, or the index
    discovery recorded on a view made elsewhere."""
    if view.path is None and view.unique_index:
        return f"recreate the unique index `analytics-views discover` recorded: `{view.unique_index};`"
    match = _UNIQUE_INDEX_DDL.search(view.sql)
    statement = " ".join(match.group(0).split()) if match else f"CREATE UNIQUE INDEX ON {view.label} (...);"
    if view.path is None:
        return f"run `{statement}` on the columns that identify a row (the view was made outside this project)"
    return f"run `{statement}` (from {view.path.parent.name}/{view.path.name})"


def view_asset(
    view: ViewDefinition,
    cadence: Cadence | None = None,
    data_tests_dir: Path | None = None,
    translator: ViewTranslator = ViewTranslator(),
) -> dg.AssetsDefinition:
    """The view's asset: the translator's spec, refreshed by one step with the view's checks.

    `cadence` (default: the default cadence the view names) is passed to the translator (tag, freshness);
    `data_tests_dir` is where discovered views' data tests live (the defs.yaml's `data_tests`).
    """
    cadence = cadence or DEFAULT_CADENCES[view.cadence]
    spec = translator.get_asset_spec(view, cadence)
    key = spec.key
    tests = view_checks.data_tests(view, data_tests_dir, reserved=(UNIQUE_INDEX_CHECK, MATCHES_DISCOVERY_CHECK))
    check_specs = [
        dg.AssetCheckSpec(
            UNIQUE_INDEX_CHECK,
            asset=key,
            description="The view has a unique index that REFRESH MATERIALIZED VIEW CONCURRENTLY can use "
            "(unique, valid, no WHERE clause, plain columns).",
        )
    ]
    if view.fingerprint:
        check_specs.append(
            dg.AssetCheckSpec(
                MATCHES_DISCOVERY_CHECK,
                asset=key,
                description="The view's definition and columns in the database are still the ones "
                "`analytics-views discover` recorded.",
            )
        )
    check_specs.extend(view_checks.specs(key, tests))

    @dg.multi_asset(
        specs=[spec],
        # The step and its pool are named as @dg.asset(key=...) named them: the CLI and the pool slots find a
        # view's step by its key.
        name=key.to_python_identifier(),
        description=spec.description,
        check_specs=check_specs,
        # One refresh of a view at a time across all runs (dagster.yaml: pools default_limit 1).
        pool=f"refresh_{'_'.join(key.path)}",
    )
    def refresh(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        with ExitStack() as stack:
            try:
                conn = stack.enter_context(
                    analytics_db.connection(f"analytics-views {view.label} run {context.run.run_id[:8]}")
                )
            except AnalyticsViewsError as error:  # the server may be restarting: like any transient failure
                raise retry_later(context) from error
            state = database.view_state(conn, view.name, view.schema)
            if not state.exists:
                fix = "run `analytics-views migrate`" if view.path else "run `analytics-views discover` and reload"
                raise dg.Failure(f"materialized view {view.label!r} does not exist: {fix}", allow_retries=False)
            if view.fingerprint:
                now = current_fingerprint(conn, view.schema, view.name)
                yield dg.AssetCheckResult(
                    check_name=MATCHES_DISCOVERY_CHECK,
                    passed=now == view.fingerprint,
                    severity=dg.AssetCheckSeverity.WARN,
                    description="matches the discovered definition"
                    if now == view.fingerprint
                    else f"{view.label} was redefined since discovery: run `analytics-views discover`",
                )
            yield dg.AssetCheckResult(
                check_name=UNIQUE_INDEX_CHECK,
                passed=state.unique_index is not None,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={keys.INDEX: state.unique_index or "none"},
                description=(
                    f"usable unique index: {state.unique_index}"
                    if state.unique_index
                    else f"{view.label} has no usable unique index: {unique_index_fix(view)}"
                ),
            )
            if state.unique_index is None:
                raise dg.Failure(
                    f"{view.label} has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY; "
                    f"{unique_index_fix(view)}, then materialize again",
                    allow_retries=False,
                )
            last = context.instance.get_latest_materialization_event(context.asset_key)
            last_metadata = last.asset_materialization.metadata if last and last.asset_materialization else {}
            try:
                with cancel_on_interrupt(conn):
                    outcome = refresh_view(
                        conn,
                        view.name,
                        analytics_db.refresh_settings,
                        view.refresh_strategy,
                        schema=view.schema,
                        skip_if_unchanged_since=skip_if_unchanged_since(last_metadata, analytics_db),
                    )
            except RefreshError as error:
                if error.transient:
                    raise retry_later(context) from error
                raise dg.Failure(str(error), allow_retries=False) from None
            note = f"; {outcome.note}" if outcome.note else ""
            context.log.info(f"{view.label}: {outcome.mode}{note} in {outcome.duration_s:.3f} s")
            state = database.view_state(conn, view.name, view.schema)
            yield dg.MaterializeResult(metadata=refresh_metadata(conn, view, outcome, state, last_metadata, analytics_db.timezone))
            yield from view_checks.results(conn, view, state.unique_index, tests, analytics_db.timezone)

    return refresh


def skip_if_unchanged_since(last_metadata, analytics_db: AnalyticsDatabase) -> str | None:
    """The sources fingerprint the last materialization recorded, which a refresh may skip against; None when
    skipping is off or none was recorded. A materialization recorded before the key was namespaced (plain
    `sources_fingerprint`) is not read: the first refresh after the upgrade runs, and records the new key."""
    last_fingerprint = last_metadata.get(keys.SOURCES_FINGERPRINT)
    return last_fingerprint.value if last_fingerprint and analytics_db.skip_unchanged else None


def refresh_metadata(conn, view: ViewDefinition, outcome, state, last_metadata, timezone: str) -> dict:
    """What a refresh's materialization records: rows, size, mode and timing, the fingerprint the next refresh
    compares (refresh.py), the table and its columns."""
    return {
        # Unchanged sources mean unchanged rows: a skip costs catalog look-ups only.
        keys.ROW_COUNT: last_metadata[keys.ROW_COUNT].value
        if outcome.mode == SKIPPED
        else database.row_count(conn, view.name, view.schema),
        keys.SOURCES_FINGERPRINT: outcome.sources_fingerprint or "",
        keys.SIZE_BYTES: state.size_bytes,
        keys.SIZE: state.size_pretty,
        keys.REFRESH_DURATION_S: dg.MetadataValue.float(round(outcome.duration_s, 4)),
        keys.REFRESH_MODE: outcome.mode,
        **({keys.REFRESH_NOTE: outcome.note} if outcome.note else {}),
        keys.REFRESH_TIMEZONE: timezone,
        keys.TABLE_NAME: database.qualified_name(conn, view.name, view.schema),
        keys.COLUMN_SCHEMA: table_schema(database.columns(conn, view.name, view.schema)),
    }


def build_assets(
    config: ManagedConfig | None = None, translator: ViewTranslator = ViewTranslator()
) -> list[dg.AssetSpec | dg.AssetsDefinition]:
    """Every managed view (default: this project's) and the sources they read, as `translator` makes them; discovered ones
    from the state file only."""
    config = config or ManagedConfig()
    managed = managed_views(config)
    cadences = {cadence.name: cadence for cadence in config.cadences}
    project = [view for view in managed.views if view.path is not None]
    discovered_keys = {source.key for source in managed.sources}
    declared = load_source_tables(config.migrations_dir) if config.migrations_dir else {}
    return [
        *(
            translator.get_source_spec(declared.get(table) or UndeclaredTable(table))
            for table in source_tables(tuple(project))
            if (table,) not in discovered_keys
        ),
        *map(translator.get_source_spec, managed.sources),
        *(view_asset(view, cadences[view.cadence], config.data_tests, translator) for view in managed.views),
    ]
