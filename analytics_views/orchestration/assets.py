"""One Dagster asset per materialized view in sql/views/, and one per source table they read.

The translation from SQL to an asset happens here and only here: key, group, description, owners, kinds,
tags, freshness, column schema, column lineage, code reference and the `unique_index` check all come from
the view's `ViewDefinition` or, for a source table, from its migration (`SourceTable`).
"""

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg

from analytics_views.postgres import database
from analytics_views.orchestration import view_checks
from analytics_views.orchestration.cadences import freshness_window
from analytics_views.sql_files.discovery import SourceRelation, current_fingerprint, managed_views
from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.managed import DEFAULT_CADENCES, Cadence, ManagedConfig
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.refresh import SKIPPED, RefreshError, refresh_view
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.source_tables import ColumnDoc, SourceTable, load_source_tables
from analytics_views.sql_files.views import ViewDefinition, source_tables

UNIQUE_INDEX_CHECK = "unique_index"
MATCHES_DISCOVERY_CHECK = "matches_discovery"
SOURCES_GROUP = "sources"
VIEWS_GROUP = "analytics_views"
OWNERS = ["team:analytics"]

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
    """A terminated run interrupts its steps (DagsterExecutionInterruptedError, raised by Dagster's SIGINT
    handler in the step's process): cancel the query in the server too, so the view keeps its contents and its
    lock is freed at once. psycopg cancels by itself on KeyboardInterrupt only."""
    try:
        yield
    except dg.DagsterExecutionInterruptedError:
        conn.cancel_safe(timeout=5)
        raise


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


def code_reference(path: Path, line: int) -> dg.CodeReferencesMetadataValue:
    """"View source" in the UI: the SQL file and line that define the asset.

    A path on this machine by default (the UI opens it in the local editor); with ANALYTICS_VIEWS_GIT_URL
    set (e.g. https://github.com/org/analytics-views), a link to the file on ANALYTICS_VIEWS_GIT_BRANCH
    (default main), for a server whose paths mean nothing to the analyst's browser.
    """
    # A SQL folder of another project (a component configured elsewhere) is named by its full path.
    relative = (path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path).as_posix()
    git_url = os.environ.get("ANALYTICS_VIEWS_GIT_URL", "").strip().rstrip("/")
    with warnings.catch_warnings():  # beta since 1.7, yet what the UI reads; one warning per asset is noise
        warnings.simplefilter("ignore", dg.BetaWarning)
        if git_url:
            branch = os.environ.get("ANALYTICS_VIEWS_GIT_BRANCH", "main")
            reference = dg.UrlCodeReference(url=f"{git_url}/blob/{branch}/{relative}#L{line}", label=relative)
        else:
            reference = dg.LocalFileCodeReference(file_path=str(path), line_number=line, label=relative)
        return dg.CodeReferencesMetadataValue(code_references=[reference])


def as_markdown(text: str) -> str:
    """The UI renders descriptions as Markdown: keep the header's line breaks (Grain:, Cadence: ...)."""
    return "\n".join(f"{line}  " if line.strip() else "" for line in text.splitlines())


def table_schema(columns: Iterable[ColumnDoc | database.Column]) -> dg.TableSchema:
    # A view's types are known only once PostgreSQL has created it: its materializations record them.
    return dg.TableSchema(
        columns=[dg.TableColumn(name=c.name, type=c.type or "", description=c.description) for c in columns]
    )


def source_table_spec(table: str, declared: SourceTable | None) -> dg.AssetSpec:
    if declared is None:  # read by a view but created outside sql/migrations
        return dg.AssetSpec(
            key=table,
            group_name=SOURCES_GROUP,
            description=f"Source table `{table}`, not created by sql/migrations.",
            kinds={"postgres"},
            owners=OWNERS,
        )
    return dg.AssetSpec(
        key=table,
        group_name=SOURCES_GROUP,
        description=declared.description or f"Source table `{table}`, written by the product application.",
        kinds={"postgres"},
        owners=OWNERS,
        metadata={
            "dagster/table_name": f"public.{table}",
            "dagster/column_schema": table_schema(declared.columns),
            "dagster/code_references": code_reference(declared.path, declared.line),
        },
    )


def column_lineage_table(view: ViewDefinition) -> dg.MarkdownMetadataValue:
    """The same column lineage as a table on the asset page: Dagster OSS does not draw column lineage."""
    rows = [
        f"| `{column}` | {', '.join(f'`{table}.{name}`' for table, name in deps) or '(calendar: generate_series, now())'} |"
        for column, deps in view.column_lineage.items()
    ]
    return dg.MetadataValue.md("\n".join(["| column | computed from |", "|---|---|", *rows]))


def column_lineage(view: ViewDefinition) -> dg.TableColumnLineage:
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=dg.AssetKey(table), column_name=name) for table, name in deps]
            for column, deps in view.column_lineage.items()
        }
    )


def source_relation_spec(relation: SourceRelation) -> dg.AssetSpec:
    """A relation a discovered view reads: described by its catalog comment and columns."""
    return dg.AssetSpec(
        key=list(relation.key),
        group_name=SOURCES_GROUP,
        description=relation.comment or f"Source {relation.kind} `{relation.schema}.{relation.name}`.",
        kinds={"postgres"},
        owners=OWNERS,
        metadata={"dagster/column_schema": table_schema(relation.columns), "schema": relation.schema},
    )


def _view_metadata(view: ViewDefinition) -> dict:
    if view.path is not None:
        return {
            "grain": view.grain,
            "sql_file": f"sql/views/{view.path.name}",
            "dagster/column_schema": table_schema(view.columns),
            "dagster/column_lineage": column_lineage(view),
            "column_lineage": column_lineage_table(view),
            "dagster/code_references": code_reference(view.path, view.line),
        }
    return {
        "schema": view.schema,
        "dagster/column_schema": table_schema(view.columns),
        "definition": dg.MetadataValue.md(f"```sql\n{view.sql}\n```"),
        "fingerprint": view.fingerprint,
    }


def view_asset(
    view: ViewDefinition, cadence: Cadence | None = None, data_tests_dir: Path | None = None
) -> dg.AssetsDefinition:
    """The view's asset; `cadence` (default: the default cadence the view names) sets its freshness window;
    `data_tests_dir` is where discovered views' data tests live (the defs.yaml's `data_tests`)."""
    cadence = cadence or DEFAULT_CADENCES[view.cadence]
    key = dg.AssetKey(list(view.asset_key_path))
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

    @dg.asset(
        key=key,
        deps=[dg.AssetKey.from_user_string(dep) for dep in view.deps],
        description=as_markdown(view.description),
        group_name=VIEWS_GROUP,
        kinds={"postgres"},
        owners=OWNERS,
        tags={"cadence": cadence.name},
        freshness_policy=dg.FreshnessPolicy.time_window(fail_window=freshness_window(cadence)),
        check_specs=check_specs,
        metadata=_view_metadata(view),
        # One refresh of a view at a time across all runs (dagster.yaml: pools default_limit 1).
        pool=f"refresh_{'_'.join(view.asset_key_path)}",
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
                metadata={"index": state.unique_index or "none"},
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
            last_fingerprint = last_metadata.get("sources_fingerprint")
            try:
                with cancel_on_interrupt(conn):
                    outcome = refresh_view(
                        conn,
                        view.name,
                        analytics_db.refresh_settings,
                        view.refresh_strategy,
                        schema=view.schema,
                        skip_if_unchanged_since=last_fingerprint.value
                        if last_fingerprint and analytics_db.skip_unchanged
                        else None,
                    )
            except RefreshError as error:
                if error.transient:
                    raise retry_later(context) from error
                raise dg.Failure(str(error), allow_retries=False) from None
            note = f"; {outcome.note}" if outcome.note else ""
            context.log.info(f"{view.label}: {outcome.mode}{note} in {outcome.duration_s:.3f} s")
            state = database.view_state(conn, view.name, view.schema)
            skipped = outcome.mode == SKIPPED
            yield dg.MaterializeResult(
                metadata={
                    # Unchanged sources mean unchanged rows: a skip costs catalog look-ups only.
                    "dagster/row_count": last_metadata["dagster/row_count"].value
                    if skipped
                    else database.row_count(conn, view.name, view.schema),
                    "sources_fingerprint": outcome.sources_fingerprint or "",
                    "size_bytes": state.size_bytes,
                    "size": state.size_pretty,
                    "refresh_duration_s": dg.MetadataValue.float(round(outcome.duration_s, 4)),
                    "refresh_mode": outcome.mode,
                    **({"refresh_note": outcome.note} if outcome.note else {}),
                    "refresh_timezone": analytics_db.timezone,
                    "dagster/table_name": database.qualified_name(conn, view.name, view.schema),
                    "dagster/column_schema": table_schema(database.columns(conn, view.name, view.schema)),
                }
            )
            yield from view_checks.results(conn, view, state.unique_index, tests, analytics_db.timezone)

    return refresh


def build_assets(config: ManagedConfig | None = None) -> list[dg.AssetSpec | dg.AssetsDefinition]:
    """Every managed view (default: this project's) and the sources they read; discovered ones from the state only."""
    config = config or ManagedConfig()
    managed = managed_views(config)
    cadences = {cadence.name: cadence for cadence in config.cadences}
    project = [view for view in managed.views if view.path is not None]
    discovered_keys = {source.key for source in managed.sources}
    declared = load_source_tables(config.migrations_dir) if config.migrations_dir else {}
    return [
        *(
            source_table_spec(table, declared.get(table))
            for table in source_tables(tuple(project))
            if (table,) not in discovered_keys
        ),
        *map(source_relation_spec, managed.sources),
        *(view_asset(view, cadences[view.cadence], config.data_tests) for view in managed.views),
    ]
