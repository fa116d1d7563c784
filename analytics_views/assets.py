"""One Dagster asset per materialized view in sql/views/, and one per source table they read.

The translation from a SQL file to an asset happens here and only here: key, group, description, kinds,
tags, lineage and the `unique_index` check all come from the view's `ViewDefinition`.
"""

import re

import dagster as dg

from analytics_views import database
from analytics_views.discovery import SourceRelation, current_fingerprint, managed_views
from analytics_views.managed import ManagedConfig, load_config
from analytics_views.resources import AnalyticsDatabase
from analytics_views.refresh import SKIPPED, RefreshError, refresh_view
from analytics_views.views import ViewDefinition, source_tables

UNIQUE_INDEX_CHECK = "unique_index"
MATCHES_DISCOVERY_CHECK = "matches_discovery"
SOURCES_GROUP = "sources"
VIEWS_GROUP = "analytics_views"

# Transient failures (lost connection, lock timeout, deadlock, ...) are retried; permanent ones raise
# Failure(allow_retries=False) and fail at once.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

_UNIQUE_INDEX_DDL = re.compile(r"CREATE\s+UNIQUE\s+INDEX\s+[^;]+;", re.IGNORECASE)


def unique_index_fix(view: ViewDefinition) -> str:
    """How to repair a missing unique index: the statement from the view's own SQL file."""
    match = _UNIQUE_INDEX_DDL.search(view.sql)
    statement = " ".join(match.group(0).split()) if match else f"CREATE UNIQUE INDEX ON {view.label} (...);"
    if view.path is None:
        return f"run `{statement}` on the columns that identify a row (the view was made outside this project)"
    return f"run `{statement}` (from {view.path.parent.name}/{view.path.name})"


def source_table_spec(table: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=table,
        group_name=SOURCES_GROUP,
        description=f"Source table `{table}`, written by the product application.",
        kinds={"postgres"},
    )


def _column_schema(columns: tuple[database.Column, ...] | list[database.Column]) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=c.name, type=c.type, description=c.description) for c in columns])


def source_relation_spec(relation: SourceRelation) -> dg.AssetSpec:
    """A relation a discovered view reads: described by its catalog comment and columns."""
    return dg.AssetSpec(
        key=list(relation.key),
        group_name=SOURCES_GROUP,
        description=relation.comment or f"Source {relation.kind} `{relation.schema}.{relation.name}`.",
        kinds={"postgres"},
        metadata={"dagster/column_schema": _column_schema(relation.columns), "schema": relation.schema},
    )


def _view_metadata(view: ViewDefinition) -> dict:
    if view.path is not None:
        return {"grain": view.grain, "sql_file": f"sql/views/{view.path.name}"}
    return {
        "schema": view.schema,
        "dagster/column_schema": _column_schema(view.columns),
        "definition": dg.MetadataValue.md(f"```sql\n{view.sql}\n```"),
        "fingerprint": view.fingerprint,
    }


def view_asset(view: ViewDefinition) -> dg.AssetsDefinition:
    key = dg.AssetKey(list(view.asset_key_path))
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

    @dg.asset(
        key=key,
        deps=[dg.AssetKey.from_user_string(dep) for dep in view.deps],
        description=view.description,
        group_name=VIEWS_GROUP,
        kinds={"postgres"},
        tags={"cadence": view.cadence},
        check_specs=check_specs,
        metadata=_view_metadata(view),
        # One refresh of a view at a time across all runs (dagster.yaml: pools default_limit 1).
        pool=f"refresh_{'_'.join(view.asset_key_path)}",
        retry_policy=TRANSIENT_RETRY,
    )
    def refresh(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        with analytics_db.connection(f"analytics-views {view.label} run {context.run_id[:8]}") as conn:
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
                outcome = refresh_view(
                    conn,
                    view.name,
                    analytics_db.refresh_settings,
                    schema=view.schema,
                    skip_if_unchanged_since=last_fingerprint.value if last_fingerprint and analytics_db.skip_unchanged else None,
                )
            except RefreshError as error:
                if error.transient:
                    raise  # the retry policy tries again, with backoff
                raise dg.Failure(str(error), allow_retries=False) from None
            context.log.info(f"{view.label}: {outcome.mode} in {outcome.duration_s:.3f} s")
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
                    "dagster/table_name": database.qualified_name(conn, view.name, view.schema),
                    "dagster/column_schema": _column_schema(database.columns(conn, view.name, view.schema)),
                }
            )

    return refresh


def build_assets(config: ManagedConfig | None = None) -> list[dg.AssetSpec | dg.AssetsDefinition]:
    """Every managed view (views.toml) and the sources they read; discovered ones from the state file only."""
    managed = managed_views(config or load_config())
    project = [view for view in managed.views if view.path is not None]
    discovered_keys = {source.key for source in managed.sources}
    return [
        *(source_table_spec(table) for table in source_tables(tuple(project)) if (table,) not in discovered_keys),
        *map(source_relation_spec, managed.sources),
        *map(view_asset, managed.views),
    ]
