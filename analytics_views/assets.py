"""One Dagster asset per materialized view in sql/views/, and one per source table they read.

The translation from a SQL file to an asset happens here and only here: key, group, description, kinds,
tags, lineage and the `unique_index` check all come from the view's `ViewDefinition`.
"""

import re

import dagster as dg

from analytics_views import database
from analytics_views.resources import AnalyticsDatabase
from analytics_views.refresh import RefreshError, refresh_view
from analytics_views.views import ViewDefinition, load_views, source_tables

UNIQUE_INDEX_CHECK = "unique_index"
SOURCES_GROUP = "sources"
VIEWS_GROUP = "analytics_views"

# Transient failures (lost connection, lock timeout, deadlock, ...) are retried; permanent ones raise
# Failure(allow_retries=False) and fail at once.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

_UNIQUE_INDEX_DDL = re.compile(r"CREATE\s+UNIQUE\s+INDEX\s+[^;]+;", re.IGNORECASE)


def unique_index_fix(view: ViewDefinition) -> str:
    """How to repair a missing unique index: the statement from the view's own SQL file."""
    match = _UNIQUE_INDEX_DDL.search(view.sql)
    statement = " ".join(match.group(0).split()) if match else f"CREATE UNIQUE INDEX ON {view.name} (...);"
    return f"run `{statement}` (from {view.path.parent.name}/{view.path.name})"


def source_table_spec(table: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=table,
        group_name=SOURCES_GROUP,
        description=f"Source table `{table}`, written by the product application.",
        kinds={"postgres"},
    )


def view_asset(view: ViewDefinition) -> dg.AssetsDefinition:
    check_spec = dg.AssetCheckSpec(
        UNIQUE_INDEX_CHECK,
        asset=view.name,
        description="The view has a unique index that REFRESH MATERIALIZED VIEW CONCURRENTLY can use "
        "(unique, valid, no WHERE clause, plain columns).",
    )

    @dg.asset(
        key=view.name,
        deps=view.deps,
        description=view.description,
        group_name=VIEWS_GROUP,
        kinds={"postgres"},
        tags={"cadence": view.cadence},
        check_specs=[check_spec],
        metadata={"grain": view.grain, "sql_file": f"sql/views/{view.path.name}"},
        # One refresh of a view at a time across all runs (dagster.yaml: pools default_limit 1).
        pool=f"refresh_{view.name}",
        retry_policy=TRANSIENT_RETRY,
    )
    def refresh(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        with analytics_db.connection(f"analytics-views {view.name} run {context.run_id[:8]}") as conn:
            state = database.view_state(conn, view.name)
            if not state.exists:
                raise dg.Failure(
                    f"materialized view {view.name!r} does not exist: run `analytics-views migrate`",
                    allow_retries=False,
                )
            yield dg.AssetCheckResult(
                check_name=UNIQUE_INDEX_CHECK,
                passed=state.unique_index is not None,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"index": state.unique_index or "none"},
                description=(
                    f"usable unique index: {state.unique_index}"
                    if state.unique_index
                    else f"{view.name} has no usable unique index: {unique_index_fix(view)}"
                ),
            )
            if state.unique_index is None:
                raise dg.Failure(
                    f"{view.name} has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY; "
                    f"{unique_index_fix(view)}, then materialize again",
                    allow_retries=False,
                )
            try:
                outcome = refresh_view(conn, view.name, analytics_db.refresh_settings, view.refresh_strategy)
            except RefreshError as error:
                if error.transient:
                    raise  # the retry policy tries again, with backoff
                raise dg.Failure(str(error), allow_retries=False) from None
            note = f"; {outcome.note}" if outcome.note else ""
            context.log.info(f"refreshed {view.name} ({outcome.mode}{note}) in {outcome.duration_s:.3f} s")
            state = database.view_state(conn, view.name)
            yield dg.MaterializeResult(
                metadata={
                    "dagster/row_count": database.row_count(conn, view.name),
                    "size_bytes": state.size_bytes,
                    "size": state.size_pretty,
                    "refresh_duration_s": dg.MetadataValue.float(round(outcome.duration_s, 4)),
                    "refresh_mode": outcome.mode,
                    **({"refresh_note": outcome.note} if outcome.note else {}),
                    "dagster/table_name": database.qualified_name(conn, view.name),
                    "dagster/column_schema": dg.TableSchema(
                        columns=[
                            dg.TableColumn(name=c.name, type=c.type, description=c.description)
                            for c in database.columns(conn, view.name)
                        ]
                    ),
                }
            )

    return refresh


def build_assets() -> list[dg.AssetSpec | dg.AssetsDefinition]:
    views = load_views()
    return [*map(source_table_spec, source_tables(views)), *map(view_asset, views)]
