"""Materializing the view assets against a real database: refresh modes, metadata and checks."""

import time

import dagster as dg
import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.orchestration.view_checks import UNIQUE_INDEX_CHECK
from analytics_views.definitions import defs
from analytics_views.paths import DEFS_YAML
from analytics_views.sql_files.views import load_views, views_with_cadence

DAILY = [view.name for view in views_with_cadence("daily")]


@pytest.fixture
def database_url(seeded_db, monkeypatch) -> str:
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    return seeded_db


def run_job(name: str, **kwargs) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(name).execute_in_process(raise_on_error=False, **kwargs)


def definition_metadata(key: str) -> dict:
    [spec] = [spec for spec in defs.resolve_all_asset_specs() if spec.key.to_user_string() == key]
    return {name: value.value if isinstance(value, dg.MetadataValue) else value for name, value in spec.metadata.items()}


def materialization_metadata(result: dg.ExecuteInProcessResult, view: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(view)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def check_results(result: dg.ExecuteInProcessResult, name: str = UNIQUE_INDEX_CHECK) -> dict[str, dg.AssetCheckEvaluation]:
    """The evaluations of one check, by asset."""
    return {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations() if e.check_name == name}


def test_row_count_metadata_equals_the_views_real_row_count(database_url):
    result = run_job("daily_refresh_job")
    assert result.success
    with psycopg.connect(database_url) as conn:
        for view in DAILY:
            metadata = materialization_metadata(result, view)
            assert metadata["dagster/row_count"] == conn.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
            assert metadata["dagster/row_count"] > 0
            size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [view]).fetchone()[0]
            assert metadata["analytics_views/size_bytes"] == size
            assert metadata["analytics_views/size"].endswith(("bytes", "kB", "MB"))
            assert metadata["dagster/table_name"].endswith(f".public.{view}")
            assert metadata["analytics_views/refresh_duration_s"] >= 0
            columns = [column.name for column in metadata["dagster/column_schema"].columns]
            assert columns == [
                row[0]
                for row in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
                    [view],
                )
            ]
            # The database's types and comments agree with the schema the definition shows before any refresh.
            declared = definition_metadata(view)["dagster/column_schema"].columns
            recorded = metadata["dagster/column_schema"].columns
            assert [(c.name, c.description) for c in recorded] == [(c.name, c.description) for c in declared]
            assert all(c.type for c in recorded)


def test_unpopulated_view_is_populated_before_concurrent_refresh(database_url):
    first = run_job("weekly_refresh_job")
    second = run_job("weekly_refresh_job")
    assert first.success and second.success
    assert materialization_metadata(first, "weekly_aggregations")["analytics_views/refresh_mode"] == RefreshMode.INITIAL_PLAIN
    assert materialization_metadata(second, "weekly_aggregations")["analytics_views/refresh_mode"] == RefreshMode.CONCURRENT
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'weekly_aggregations'").fetchone()[0]


def test_unique_index_check_passes_with_the_index(database_url):
    result = run_job("daily_refresh_job")
    checks = check_results(result)
    assert set(checks) == set(DAILY)
    for evaluation in checks.values():
        assert evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR


def test_missing_unique_index_fails_its_check_and_step_while_other_views_refresh(database_url):
    assert run_job("daily_refresh_job").success  # populated, so only CONCURRENTLY would be allowed
    broken = "cohort_aggregations"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", [broken]).fetchall():
            conn.execute(f"DROP INDEX {index}")
        before = conn.execute(f"SELECT * FROM {broken} ORDER BY 1").fetchall()

    result = run_job("daily_refresh_job")

    assert not result.success
    checks = check_results(result)
    assert not checks[broken].passed
    assert "CREATE UNIQUE INDEX" in checks[broken].description
    # The cadence's one step fails at the end, naming the view and why; the others were refreshed before.
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_key == "refresh_daily_views"
    not_refreshed = failure.step_failure_data.user_failure_data.metadata["analytics_views/not_refreshed"].value
    assert list(not_refreshed) == [broken]
    assert "no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY" in not_refreshed[broken]
    assert f"{broken}: {broken} has no unique index usable" in failure.step_failure_data.error.message
    refreshed = {event.asset_key.path[-1] for event in result.get_asset_materialization_events()}
    assert refreshed == set(DAILY) - {broken}
    with psycopg.connect(database_url) as conn:
        assert conn.execute(f"SELECT * FROM {broken} ORDER BY 1").fetchall() == before  # old contents kept


def test_every_view_asset_has_description_kind_cadence_and_lineage():
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    for view in load_views():
        spec = specs[view.name]
        assert spec.description.startswith(view.summary)
        # Markdown hard breaks keep "Grain:" and "Cadence:" on lines of their own in the UI.
        assert f"{view.summary}  \nGrain: {view.grain}  \nCadence: {view.cadence}  \n" in spec.description
        assert spec.kinds == {"postgres"}
        assert spec.tags["cadence"] == view.cadence
        assert {dep.asset_key.to_user_string() for dep in spec.deps} == set(view.deps)
        for dep in view.deps:
            assert dep in specs, f"{dep} read by {view.name} is not an asset"


def materialization_tags(result: dg.ExecuteInProcessResult, view: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(view)]
    return dict(event.materialization.tags or {})


def data_version(result: dg.ExecuteInProcessResult, view: str) -> str:
    return materialization_tags(result, view)["dagster/data_version"]


def refresh_mode(result: dg.ExecuteInProcessResult, view: str) -> str:
    return materialization_metadata(result, view)["analytics_views/refresh_mode"]


def wait_until_counted(url: str, table: str, inserted_before: int) -> None:
    """PostgreSQL reports a session's row counts when it goes idle; wait until it has."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(200):
            if conn.execute("SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = %s::regclass", [table]).fetchone()[0] > inserted_before:
                return
            time.sleep(0.05)
    raise AssertionError(f"{table}'s insert was never counted")


def test_a_refresh_is_skipped_while_no_source_changed_and_runs_after_any_change(database_url):
    instance = dg.DagsterInstance.ephemeral()
    weekly = lambda **kwargs: run_job("weekly_refresh_job", instance=instance, **kwargs)  # noqa: E731
    first, second = weekly(), weekly()
    assert refresh_mode(first, "weekly_aggregations") == RefreshMode.INITIAL_PLAIN
    assert refresh_mode(second, "weekly_aggregations") == RefreshMode.SKIPPED
    # A proven skip keeps the view's data version; every real refresh below gives a new one.
    assert data_version(second, "weekly_aggregations") == data_version(first, "weekly_aggregations")
    assert materialization_metadata(second, "weekly_aggregations")["dagster/row_count"] == materialization_metadata(
        first, "weekly_aggregations"
    )["dagster/row_count"]

    with psycopg.connect(database_url, autocommit=True) as conn:
        counted = conn.execute("SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'events'::regclass").fetchone()[0]
        conn.execute(
            "INSERT INTO events (user_id, event_type, occurred_at)"
            " SELECT user_id, 'late_arrival', now() - interval '8 days' FROM users LIMIT 1"
        )
    wait_until_counted(database_url, "events", counted)
    changed = weekly()
    assert refresh_mode(changed, "weekly_aggregations") == RefreshMode.CONCURRENT
    assert data_version(changed, "weekly_aggregations") != data_version(first, "weekly_aggregations")
    quiet = weekly()
    assert refresh_mode(quiet, "weekly_aggregations") == RefreshMode.SKIPPED
    assert data_version(quiet, "weekly_aggregations") == data_version(changed, "weekly_aggregations")
    forced = weekly(
        run_config={"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "skip_unchanged": False}}}}
    )
    assert refresh_mode(forced, "weekly_aggregations") == RefreshMode.CONCURRENT
    assert data_version(forced, "weekly_aggregations") not in {
        data_version(first, "weekly_aggregations"), data_version(changed, "weekly_aggregations")
    }
    # Its provenance: the code version it was refreshed with, and a data version for each relation it reads.
    tags = materialization_tags(forced, "weekly_aggregations")
    [spec] = [spec for spec in defs.resolve_all_asset_specs() if spec.key == dg.AssetKey("weekly_aggregations")]
    assert tags["dagster/code_version"] == spec.code_version
    assert {tag.removeprefix("dagster/input_data_version/") for tag in tags if tag.startswith("dagster/input_data_version/")} == {
        dep.asset_key.to_user_string() for dep in spec.deps
    }


def test_view_assets_show_owner_column_descriptions_lineage_and_their_sql_file():
    for view in load_views():
        metadata = definition_metadata(view.name)
        [spec] = [spec for spec in defs.resolve_all_asset_specs() if spec.key.to_user_string() == view.name]
        assert spec.owners == ["team:analytics"]
        columns = metadata["dagster/column_schema"].columns
        assert [c.name for c in columns] == [c.name for c in view.columns]
        assert all(c.description for c in columns), f"{view.name}: add COMMENT ON COLUMN for every column"
        lineage = metadata["dagster/column_lineage"].deps_by_column
        assert set(lineage) == {c.name for c in view.columns}
        # The SQL file, then (added by Dagster's component loader) the defs.yaml that configures the view.
        [reference, configured_in] = metadata["dagster/code_references"].code_references
        assert (reference.file_path, reference.label) == (str(view.path), f"sql/views/{view.path.name}")
        assert configured_in.file_path == str(DEFS_YAML)
        assert view.path.read_text().splitlines()[reference.line_number - 1].startswith(
            f"CREATE MATERIALIZED VIEW {view.name} AS"
        )
    daily = definition_metadata("daily_aggregations")
    assert daily["dagster/column_lineage"].deps_by_column["arpdau"] == [
        dg.TableColumnDep(asset_key=dg.AssetKey("events"), column_name="occurred_at"),
        dg.TableColumnDep(asset_key=dg.AssetKey("events"), column_name="user_id"),
        dg.TableColumnDep(asset_key=dg.AssetKey("payments"), column_name="amount"),
    ]
    [revenue] = [c for c in daily["dagster/column_schema"].columns if c.name == "revenue"]
    assert revenue.description == "Sum of payments that day."


def test_source_table_assets_show_the_migrations_description_and_typed_columns():
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    events = specs["events"]
    assert events.group_name == "sources" and events.kinds == {"postgres"}
    assert events.description == (
        "Product events emitted by users' clients; any event makes its user active on that UTC day."
    )
    columns = definition_metadata("events")["dagster/column_schema"].columns
    assert [(c.name, c.type) for c in columns] == [
        ("event_id", "bigint"),
        ("user_id", "bigint"),
        ("event_type", "text"),
        ("occurred_at", "timestamptz"),
    ]
    assert columns[3].description == "Instant the event happened on the client."
    [reference, configured_in] = definition_metadata("events")["dagster/code_references"].code_references
    assert reference.label == "sql/migrations/001_source_tables.sql" and reference.line_number == 41
    assert configured_in.file_path == str(DEFS_YAML)

