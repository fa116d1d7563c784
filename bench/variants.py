"""The ways of running the refresh jobs that the benchmark compares, each a Definitions object that
dagster_jobs.py loads as a code location of its own (it writes the workspace.yaml): the executor is fixed by
the definitions, as the project's own jobs fix theirs, not chosen in run config.

- `in_process_defs`: the project's assets and jobs, steps one after another in the run's process
  (`dg.in_process_executor`);
- `multiprocess_spawn_defs`: Dagster's default executor: a spawned Python process per step, at most one per
  core (`dg.multiprocess_executor` unconfigured);
- `multiprocess_forkserver_defs`: a process per step forked from a server that imported this module once
  (`start_method: forkserver`, `preload_modules`), at most 8 at once;
- `multi_asset_defs`: one subsettable `multi_asset` per cadence whose single step refreshes the selected
  views over a small pool of connections, each view once the views it reads in the selection are done, as
  dagster-dbt runs dbt's threads inside one step.
The project's own `analytics_views.definitions:defs`, with whatever executor it fixes, is loaded beside them.

The first three share the project's assets (`build_assets`); their jobs have the project's job names,
selections and tags (`analytics_views.orchestration.jobs`), without the executor those fix.
"""

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from graphlib import TopologicalSorter

import dagster as dg
import psycopg

from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration import view_checks
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration.assets import (
    MATCHES_DISCOVERY_CHECK,
    UNIQUE_INDEX_CHECK,
    build_assets,
    refresh_metadata,
    skip_if_unchanged_since,
    unique_index_fix,
)
from analytics_views.orchestration.translator import ViewTranslator
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.postgres import database
from analytics_views.postgres.refresh import RefreshOutcome, refresh_view
from analytics_views.sql_files.data_tests import DataTest
from analytics_views.sql_files.discovery import current_fingerprint, managed_views
from analytics_views.sql_files.managed import Cadence, ManagedConfig
from analytics_views.sql_files.views import ViewDefinition

# Connections (and threads) of a multi_asset's step: our daily job has three views, and each refresh is
# mostly PostgreSQL's work, so a few suffice; a larger selection waits for a free connection.
POOL_SIZE = 4
FORKSERVER_MAX_CONCURRENT = 8  # the steps wait on PostgreSQL, not on the local cores


def view_key(view: ViewDefinition) -> dg.AssetKey:
    return dg.AssetKey(list(view.asset_key_path))


def views_by_cadence(config: ManagedConfig) -> dict[Cadence, list[ViewDefinition]]:
    """Each cadence that has views, with its views (as analytics_views.orchestration.jobs.build_jobs)."""
    views = managed_views(config).views
    return {
        cadence: on_it
        for cadence in config.cadences
        if (on_it := [view for view in views if view.cadence == cadence.name])
    }


def cadence_jobs(by_cadence: dict[Cadence, list[ViewDefinition]]) -> list:
    """The project's jobs (same names, selections and tags), with the executor of the Definitions they are in."""
    return [
        dg.define_asset_job(
            name=f"{cadence.name}_refresh_job",
            selection=dg.AssetSelection.assets(*map(view_key, views)),
            tags={"cadence": cadence.name},
        )
        for cadence, views in by_cadence.items()
    ]


# --- one multi_asset per cadence ----------------------------------------------------------------------


def view_spec(view: ViewDefinition, cadence: Cadence) -> dg.AssetSpec:
    """The view's asset as the project declares it (the translator's spec)."""
    return ViewTranslator().get_asset_spec(view, cadence)


def view_check_specs(view: ViewDefinition, tests: tuple[DataTest, ...]) -> list[dg.AssetCheckSpec]:
    """The checks the project's asset declares for the view (view_asset), evaluated the same way."""
    key = view_key(view)
    specs = [dg.AssetCheckSpec(UNIQUE_INDEX_CHECK, asset=key)]
    if view.fingerprint:
        specs.append(dg.AssetCheckSpec(MATCHES_DISCOVERY_CHECK, asset=key))
    return specs + view_checks.specs(key, tests)


def for_asset(result: dg.AssetCheckResult, key: dg.AssetKey) -> dg.AssetCheckResult:
    """A check result naming its asset: in a multi_asset, a result without one is ambiguous."""
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=result.check_name,
        passed=result.passed,
        severity=result.severity,
        description=result.description,
        metadata=result.metadata,
    )


def refresh_one(
    conn: psycopg.Connection,
    view: ViewDefinition,
    analytics_db: AnalyticsDatabase,
    last_metadata: dict,
    tests: tuple[DataTest, ...],
    checks: set[dg.AssetCheckKey],
) -> tuple[RefreshOutcome, list]:
    """The project's asset body (view_asset) for one view, on a pool thread: its events, yielded by the step."""
    key = view_key(view)
    events: list = []
    state = database.view_state(conn, view.name, view.schema)
    if not state.exists:
        raise dg.Failure(f"materialized view {view.label!r} does not exist", allow_retries=False)
    if view.fingerprint and dg.AssetCheckKey(key, MATCHES_DISCOVERY_CHECK) in checks:
        now = current_fingerprint(conn, view.schema, view.name)
        events.append(
            dg.AssetCheckResult(
                asset_key=key,
                check_name=MATCHES_DISCOVERY_CHECK,
                passed=now == view.fingerprint,
                severity=dg.AssetCheckSeverity.WARN,
            )
        )
    if dg.AssetCheckKey(key, UNIQUE_INDEX_CHECK) in checks:
        events.append(
            dg.AssetCheckResult(
                asset_key=key,
                check_name=UNIQUE_INDEX_CHECK,
                passed=state.unique_index is not None,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={keys.INDEX: state.unique_index or "none"},
            )
        )
    if state.unique_index is None:
        raise dg.Failure(f"{view.label} has no usable unique index: {unique_index_fix(view)}", allow_retries=False)
    outcome = refresh_view(
        conn,
        view.name,
        analytics_db.refresh_settings,
        view.refresh_strategy,
        schema=view.schema,
        skip_if_unchanged_since=skip_if_unchanged_since(last_metadata, analytics_db),
    )
    state = database.view_state(conn, view.name, view.schema)
    metadata = refresh_metadata(conn, view, outcome, state, last_metadata, analytics_db.timezone)
    events.append(dg.MaterializeResult(asset_key=key, metadata=metadata))
    for result in view_checks.results(conn, view, state.unique_index, tests, analytics_db.timezone):
        if dg.AssetCheckKey(key, result.check_name) in checks:
            events.append(for_asset(result, key))
    return outcome, events


def refresh_in_dependency_order(
    context: dg.AssetExecutionContext,
    analytics_db: AnalyticsDatabase,
    views: list[ViewDefinition],
    tests: dict[dg.AssetKey, tuple[DataTest, ...]],
) -> Iterator:
    """Refresh `views` on POOL_SIZE connections, each once the views it reads among them are done; yield each
    view's events as it finishes. A view that fails fails the step at the end, and the views reading it
    are not refreshed."""
    by_key = {view_key(view): view for view in views}
    order = TopologicalSorter(
        {key: [dep for dep in map(dg.AssetKey.from_user_string, view.deps) if dep in by_key] for key, view in by_key.items()}
    )
    order.prepare()
    checks = set(context.selected_asset_check_keys)
    last_metadata = {}
    for key in by_key:
        last = context.instance.get_latest_materialization_event(key)
        last_metadata[key] = dict(last.asset_materialization.metadata) if last and last.asset_materialization else {}
    failed: dict[dg.AssetKey, str] = {}
    finished: set[dg.AssetKey] = set()
    with ExitStack() as stack:
        workers = min(POOL_SIZE, len(by_key))
        connections: queue.SimpleQueue = queue.SimpleQueue()
        opened: list[psycopg.Connection] = []
        stopping = threading.Event()
        for _ in range(workers):  # one connection per worker thread: a task takes one, and gives it back
            try:
                conn = stack.enter_context(analytics_db.connection(f"analytics-views bench run {context.run.run_id[:8]}"))
            except AnalyticsViewsError as error:
                raise dg.Failure(str(error)) from error
            connections.put(conn)
            opened.append(conn)

        def task(view: ViewDefinition) -> tuple[RefreshOutcome, list]:
            if stopping.is_set():
                raise dg.Failure(f"{view.label}: not refreshed, the run is stopping")
            conn = connections.get()
            try:
                return refresh_one(conn, view, analytics_db, last_metadata[view_key(view)], tests[view_key(view)], checks)
            finally:
                connections.put(conn)

        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refresh"))
        running: dict[Future, dg.AssetKey] = {}
        try:
            while True:
                for key in order.get_ready():
                    running[pool.submit(task, by_key[key])] = key
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    try:
                        outcome, events = future.result()
                    except Exception as error:  # the views reading it stay not ready: never started
                        failed[key] = " ".join(str(error).split())
                        context.log.error(f"{by_key[key].label}: {failed[key]}")
                        continue
                    note = f"; {outcome.note}" if outcome.note else ""
                    context.log.info(f"{by_key[key].label}: {outcome.mode}{note} in {outcome.duration_s:.3f} s")
                    yield from events
                    finished.add(key)
                    order.done(key)
        except BaseException:  # the run was terminated (or the step broke): start nothing more, cancel the queries
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for conn in opened:
                conn.cancel_safe(timeout=5)
            raise
    if failed:
        not_started = [by_key[key].label for key in by_key if key not in finished and key not in failed]
        raise dg.Failure(
            "; ".join(f"{by_key[key].label}: {message}" for key, message in failed.items())
            + (f" (not refreshed, as they read a failed view: {', '.join(not_started)})" if not_started else ""),
            allow_retries=False,
        )


def cadence_multi_asset(cadence: Cadence, views: list[ViewDefinition], config: ManagedConfig) -> dg.AssetsDefinition:
    tests = {
        view_key(view): view_checks.data_tests(
            view, config.data_tests, reserved=(UNIQUE_INDEX_CHECK, MATCHES_DISCOVERY_CHECK)
        )
        for view in views
    }

    @dg.multi_asset(
        name=f"{cadence.name}_views",
        specs=[view_spec(view, cadence) for view in views],
        check_specs=[spec for view in views for spec in view_check_specs(view, tests[view_key(view)])],
        can_subset=True,
        # One step for all the views: one pool for it. One refresh of a view at a time is still the refresh's
        # advisory lock (postgres/refresh.py), whoever runs it.
        pool=f"refresh_{cadence.name}_views",
    )
    def refresh_views(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        selected = [view for view in views if view_key(view) in context.selected_asset_keys]
        yield from refresh_in_dependency_order(context, analytics_db, selected, tests)

    return refresh_views


# --- the variants -------------------------------------------------------------------------------------

CONFIG = ManagedConfig()
BY_CADENCE = views_by_cadence(CONFIG)
PROJECT_ASSETS = build_assets(CONFIG)
SOURCE_SPECS = [asset for asset in PROJECT_ASSETS if isinstance(asset, dg.AssetSpec)]
RESOURCES = {"analytics_db": AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))}


def project_assets_with(executor: dg.ExecutorDefinition) -> dg.Definitions:
    return dg.Definitions(
        assets=PROJECT_ASSETS, jobs=cadence_jobs(BY_CADENCE), resources=RESOURCES, executor=executor
    )


in_process_defs = project_assets_with(dg.in_process_executor)
multiprocess_spawn_defs = project_assets_with(dg.multiprocess_executor)
multiprocess_forkserver_defs = project_assets_with(
    dg.multiprocess_executor.configured(
        {
            "max_concurrent": FORKSERVER_MAX_CONCURRENT,
            # The server imports Dagster, the project and these definitions once; each step's process is
            # forked from it instead of importing them again.
            "start_method": {"forkserver": {"preload_modules": [__name__]}},
        }
    )
)
multi_asset_defs = dg.Definitions(
    assets=[*SOURCE_SPECS, *(cadence_multi_asset(c, views, CONFIG) for c, views in BY_CADENCE.items())],
    jobs=cadence_jobs(BY_CADENCE),
    resources=RESOURCES,
    executor=dg.in_process_executor,  # one step per run: nothing to run beside it
)
