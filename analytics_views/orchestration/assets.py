"""One Dagster asset per managed materialized view, and one per source table they read; a cadence's views are
refreshed by one step (a subsettable multi-asset), over a pool of connections.

What an asset is called and shows (key, group, description, owners, tags, kinds, metadata, freshness, code
references) is the translator's (translator.py); here the specs get their refresh, its pool and the checks
evaluated with each refresh (view_checks.py's REFRESH checks, such as `unique_index`, and the data tests). The
checks that follow a view's definition (the static checks, `matches_discovery`) are definition_checks.py's.
"""

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres import database
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration import view_checks
from analytics_views.orchestration.refresh_step import ViewFailed, ViewRefresh, refresh_in_dependency_order
from analytics_views.orchestration.translator import UndeclaredTable, ViewTranslator, table_schema
from analytics_views.sql_files.discovery import managed_views
from analytics_views.sql_files.managed import DEFAULT_CADENCES, Cadence, ManagedConfig
from analytics_views.postgres.refresh import refresh_view
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.source_tables import load_source_tables
from analytics_views.sql_files.views import ViewDefinition, source_tables

def view_asset(
    view: ViewDefinition,
    cadence: Cadence | None = None,
    data_tests_dir: Path | None = None,
    translator: ViewTranslator = ViewTranslator(),
) -> dg.AssetsDefinition:
    """One view's asset alone, refreshed by a step of its own named after the view, in its own pool (as the
    views were before they shared their cadence's step); the definitions use `views_asset`."""
    cadence = cadence or DEFAULT_CADENCES[view.cadence]
    identity = dg.AssetKey(list(view.asset_key_path))  # the view's, whatever key the translator gives it
    [asset] = view_assets([view], {cadence.name: cadence}, translator, data_tests_dir)
    return views_asset(cadence, [asset], name=identity.to_python_identifier(), pool=f"refresh_{'_'.join(identity.path)}")


def refresh_step_name(cadence: Cadence) -> str:
    """The step (and op) refreshing the cadence's views: the CLI and the notices find it by this name."""
    return f"refresh_{cadence.name}_views"


@dataclass(frozen=True)
class ViewAsset:
    """A view as its cadence's multi-asset holds it: the view, its spec (the translator's) and its data tests."""

    view: ViewDefinition
    spec: dg.AssetSpec
    data_tests: tuple = ()

    @property
    def key(self) -> dg.AssetKey:
        return self.spec.key

    @property
    def reads(self) -> list[dg.AssetKey]:
        return [dep.asset_key for dep in self.spec.deps]


# What refreshes a selection of a multi-asset's views: `refresh_views`, or a component's `execute`.
Execute = Callable[[dg.AssetExecutionContext, AnalyticsDatabase, Sequence[ViewAsset]], Iterator]


def view_assets(
    views: Sequence[ViewDefinition],
    cadences: Mapping[str, Cadence],
    translator: ViewTranslator = ViewTranslator(),
    data_tests_dir: Path | None = None,
) -> list[ViewAsset]:
    """Each view with its spec, as `translator` makes it, and its data tests: the one place a view's key is
    decided. A view reading a view whose key the translator changed reads it under that key (its deps and
    column lineage name the relations it reads by their default keys)."""
    assets = []
    for view in views:
        spec = translator.get_asset_spec(view, cadences[view.cadence])
        tests = view_checks.data_tests(view, data_tests_dir)
        assets.append(ViewAsset(view, spec, tests))
    renamed = {
        dg.AssetKey(list(asset.view.asset_key_path)): asset.key
        for asset in assets
        if asset.key.path != list(asset.view.asset_key_path)
    }
    if not renamed:
        return assets
    return [ViewAsset(asset.view, _reading_renamed(asset.spec, renamed), asset.data_tests) for asset in assets]


def _reading_renamed(spec: dg.AssetSpec, renamed: Mapping[dg.AssetKey, dg.AssetKey]) -> dg.AssetSpec:
    deps = [dg.AssetDep(renamed.get(dep.asset_key, dep.asset_key), partition_mapping=dep.partition_mapping) for dep in spec.deps]
    metadata = dict(spec.metadata)
    if isinstance(lineage := metadata.get(keys.COLUMN_LINEAGE), dg.TableColumnLineage):
        metadata[keys.COLUMN_LINEAGE] = dg.TableColumnLineage(
            deps_by_column={
                column: [dg.TableColumnDep(renamed.get(dep.asset_key, dep.asset_key), dep.column_name) for dep in column_deps]
                for column, column_deps in lineage.deps_by_column.items()
            }
        )
    return spec.replace_attributes(deps=deps, metadata=metadata)


def views_asset(
    cadence: Cadence,
    assets: Sequence[ViewAsset],
    *,
    name: str | None = None,
    pool: str | None = None,
    execute: "Execute | None" = None,
) -> dg.AssetsDefinition:
    """The cadence's views as one subsettable multi-asset: each view its own asset (its spec) with its
    `unique_index` check and data tests, all refreshed by one step, which calls `execute` (default
    `refresh_views`) with the views selected. Materializing one view or a selection (the UI, the CLI) runs the
    step for those views only.

    The static checks and `matches_discovery` are definition_checks.py's: they follow the views' definitions,
    not their rows.
    """
    check_specs = [
        spec
        for asset in assets
        for spec in (
            *(check.spec(asset.key) for check in view_checks.checks_following(view_checks.REFRESH, asset.view)),
            *view_checks.data_test_specs(asset.key, asset.data_tests),
        )
    ]
    execute = execute or refresh_views

    @dg.multi_asset(
        name=name or refresh_step_name(cadence),
        description=f"Refreshes the {cadence.name} materialized views, each once the views it reads are done.",
        specs=[asset.spec for asset in assets],
        check_specs=check_specs,
        can_subset=True,
        # One run of a cadence's step at a time across all runs (dagster.yaml: pools default_limit 1); within
        # and across steps, one refresh of a view at a time is the refresh's advisory lock (postgres/refresh.py),
        # whoever runs it (a run, the CLI, psql).
        pool=pool or f"refresh_{cadence.name}_views",
    )
    def refresh(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase):
        yield from execute(context, analytics_db, [asset for asset in assets if asset.key in context.selected_asset_keys])

    return refresh


def refresh_views(context: dg.AssetExecutionContext, analytics_db: AnalyticsDatabase, views: Sequence[ViewAsset]) -> Iterator:
    """Refreshes `views` in dependency order over a pool of connections (refresh_step.py), each with its
    `unique_index` check, data version, provenance and the data tests the run selected; yields each view's
    events as it is done, then fails naming the views that failed or were left out."""
    checks = set(context.selected_asset_check_keys)
    inputs = InputVersions.read(context.instance, {dep for asset in views for dep in asset.reads})
    by_label = {asset.view.label: asset for asset in views}

    def refresh_one(conn, view: ViewDefinition, last_metadata: dict, options: dict) -> ViewRefresh:
        asset = by_label[view.label]
        versions = Versions(asset.spec.code_version, inputs.tags(asset.reads))
        done = refresh_and_check(conn, view, asset.key, analytics_db, last_metadata, options, asset.data_tests, checks, versions)
        inputs.refreshed(asset.key, done.events)  # a view reading this one in the run reads its new version
        return done

    yield from refresh_in_dependency_order(
        context,
        analytics_db,
        [asset.view for asset in views],
        refresh_one,
        key_of=lambda view: by_label[view.label].key,
        reads_of=lambda view: by_label[view.label].reads,
    )


def refresh_and_check(
    conn,
    view: ViewDefinition,
    key: dg.AssetKey,
    analytics_db: AnalyticsDatabase,
    last_metadata: dict,
    options: dict,
    tests: tuple,
    checks: set[dg.AssetCheckKey],
    versions: "Versions | None" = None,
) -> ViewRefresh:
    """One view's refresh on a pool thread: its REFRESH checks on the catalog (view_checks.py; a failing ERROR
    one stops it), the refresh, its materialization's metadata, data version and provenance (`versions`), and
    its data tests, as events for the step to yield. A permanent failure raises ViewFailed."""
    events: list = []
    state = database.view_state(conn, view.name, view.schema)
    if not state.exists:
        fix = "run `analytics-views migrate`" if view.path else "run `analytics-views discover` and reload"
        raise ViewFailed(f"materialized view {view.label!r} does not exist: {fix}")
    before = view_checks.CheckInput(conn, view, key, state)
    for check in view_checks.checks_following(view_checks.REFRESH, view):
        result = check.evaluate(before)
        if dg.AssetCheckKey(key, check.name) in checks:
            events.append(result)
        if not result.passed and check.severity == dg.AssetCheckSeverity.ERROR:
            raise ViewFailed(f"{result.description}, then materialize again", events)
    outcome = refresh_view(conn, view.name, analytics_db.refresh_settings, view.refresh_strategy, schema=view.schema, **options)
    state = database.view_state(conn, view.name, view.schema)
    versions = versions or Versions(None, {})
    events.append(
        dg.MaterializeResult(
            asset_key=key,
            metadata=refresh_metadata(conn, view, outcome, state, last_metadata, analytics_db.timezone),
            data_version=data_version(outcome, last_metadata),
            tags=versions.tags(),
        )
    )
    for test in tests:
        if dg.AssetCheckKey(key, test.name) in checks:
            events.append(view_checks.data_test_check_result(conn, key, test, analytics_db.timezone))
    return ViewRefresh(outcome, events)


def data_version(outcome, last_metadata: dict) -> dg.DataVersion:
    """The view's data version after `outcome`: a proven skip keeps the last refresh's (the rows are those
    it wrote), any real refresh gives a new one, so the views reading it, Dagster's staleness and declarative
    automation see exactly the refreshes that may have changed its rows.

    The new one digests what the refresh recorded (its sources' fingerprint with the view's own mark just
    after it) with the time: two refreshes never share a version, though their fingerprints may (a view over
    relations the catalog cannot vouch for records none). A skip whose last materialization predates data
    versions takes the digest of the fingerprint it kept."""
    fingerprint = outcome.sources_fingerprint or ""
    if outcome.mode == RefreshMode.SKIPPED:
        kept = last_metadata.get(keys.DATA_VERSION_TAG)
        return dg.DataVersion(kept or hashlib.sha256(fingerprint.encode()).hexdigest()[:16])
    return dg.DataVersion(hashlib.sha256(f"{fingerprint}@{time.time_ns()}".encode()).hexdigest()[:16])


class Versions:
    """The tags that make a materialization's provenance in Dagster's terms (its data_version.py): the code
    version it was refreshed with and the data version of each relation it read. Without them Dagster calls
    every view stale ("has a new dependency on ...") once it records a code version."""

    def __init__(self, code_version: str | None, inputs: dict[str, str]):
        self._code_version, self._inputs = code_version, inputs

    def tags(self) -> dict[str, str]:
        return {**({keys.CODE_VERSION_TAG: self._code_version} if self._code_version else {}), **self._inputs}


# Dagster's provenance tags of one input (dagster/_core/definitions/data_version.py names them; their helpers are
# not public API): its data version and the storage id of the event that recorded it ("NULL": none known).
def _input_version_tag(key: dg.AssetKey) -> str:
    return f"dagster/input_data_version/{key.to_user_string()}"


def _input_pointer_tag(key: dg.AssetKey) -> str:
    return f"dagster/input_event_pointer/{key.to_user_string()}"


class InputVersions:
    """The data version of every relation a run's views read, as the instance last recorded it (a source's
    last observation, a view's last materialization), read in one query; a view refreshed in the run replaces
    its own with the new one before the views reading it start (refresh_step.py starts them after it)."""

    def __init__(self, versions: dict[dg.AssetKey, tuple[str, str]]):
        self._versions = versions
        self._lock = threading.Lock()

    @classmethod
    def read(cls, instance: dg.DagsterInstance, asset_keys: set[dg.AssetKey]) -> "InputVersions":
        """Views' versions from their asset records, in one query; each source's from its last observation,
        a query per source read (asset records do not carry observations: their `last_observation_record`
        stays empty for runless ones)."""
        versions, unmaterialized = {}, []
        for record in instance.get_asset_records(sorted(asset_keys, key=lambda k: k.path)) if asset_keys else ():
            latest = record.asset_entry.last_materialization_record
            if latest is None:
                unmaterialized.append(record.asset_entry.asset_key)
            elif version := (latest.event_log_entry.tags or {}).get(keys.DATA_VERSION_TAG):
                versions[record.asset_entry.asset_key] = (version, str(latest.storage_id))
        for key in unmaterialized:
            for latest in instance.fetch_observations(key, limit=1).records:
                if version := (latest.event_log_entry.tags or {}).get(keys.DATA_VERSION_TAG):
                    versions[key] = (version, str(latest.storage_id))
        return cls(versions)

    def tags(self, reads: list[dg.AssetKey]) -> dict[str, str]:
        """The provenance tags of a view reading `reads`; a relation never versioned counts as Dagster's
        initial version, as Dagster's own steps record it."""
        with self._lock:
            known = {key: self._versions.get(key, ("INITIAL", "NULL")) for key in reads}
        return {
            tag: value
            for key, (version, pointer) in known.items()
            for tag, value in ((_input_version_tag(key), version), (_input_pointer_tag(key), pointer))
        }

    def refreshed(self, key: dg.AssetKey, events: list) -> None:
        for event in events:
            if isinstance(event, dg.MaterializeResult) and event.data_version is not None:
                with self._lock:
                    self._versions[key] = (event.data_version.value, "NULL")


def refresh_metadata(conn, view: ViewDefinition, outcome, state, last_metadata: dict, timezone: str) -> dict:
    """What a refresh's materialization records: rows, size, mode and timing, the fingerprint the next refresh
    compares (refresh.py), the table and its columns. `last_metadata`: the last materialization's, as values."""
    return {
        # Unchanged sources mean unchanged rows: a skip costs catalog look-ups only.
        keys.ROW_COUNT: last_metadata[keys.ROW_COUNT]
        if outcome.mode == RefreshMode.SKIPPED and keys.ROW_COUNT in last_metadata
        else database.row_count(conn, view.name, view.schema),
        keys.SOURCES_FINGERPRINT: outcome.sources_fingerprint or "",
        keys.SIZE_BYTES: state.size_bytes,
        keys.SIZE: state.size_pretty,
        keys.REFRESH_DURATION_S: dg.MetadataValue.float(round(outcome.duration_s, 4)),
        keys.REFRESH_MODE: str(outcome.mode),  # the text, as every materialization so far recorded it
        **({keys.REFRESH_NOTE: outcome.note} if outcome.note else {}),
        keys.REFRESH_TIMEZONE: timezone,
        keys.TABLE_NAME: database.qualified_name(conn, view.name, view.schema),
        keys.COLUMN_SCHEMA: table_schema(database.columns(conn, view.name, view.schema)),
    }


def build_sources(config: ManagedConfig, translator: ViewTranslator = ViewTranslator()) -> dict[dg.AssetKey, tuple]:
    """Every relation the managed views read that is not itself a managed view: {key: (source, its spec)}."""
    managed = managed_views(config)
    project = [view for view in managed.views if view.path is not None]
    discovered_keys = {source.key for source in managed.sources}
    declared = load_source_tables(config.migrations_dir) if config.migrations_dir else {}
    sources = [
        *(declared.get(table) or UndeclaredTable(table) for table in source_tables(tuple(project)) if (table,) not in discovered_keys),
        *managed.sources,
    ]
    return {translator.get_source_key(source): (source, translator.get_source_spec(source)) for source in sources}


def build_assets(
    config: ManagedConfig, assets: Sequence[ViewAsset], execute: "Execute | None" = None
) -> list[dg.AssetsDefinition]:
    """Every managed view, one multi-asset per cadence with views. The sources they read are observed_sources.py's."""
    return [
        views_asset(cadence, on_it, execute=execute)
        for cadence in config.cadences
        if (on_it := [asset for asset in assets if asset.view.cadence == cadence.name])
    ]


def managed_view_assets(config: ManagedConfig, translator: ViewTranslator = ViewTranslator()) -> list[ViewAsset]:
    """Every managed view of `config` (default: this project's) as a ViewAsset; discovered ones from the
    state file only."""
    return view_assets(managed_views(config).views, {c.name: c for c in config.cadences}, translator, config.data_tests)
