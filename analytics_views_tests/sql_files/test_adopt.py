"""Adopting a database whose materialized views were made by someone else's migrations.

The foreign database differs from ours on purpose: an `events` table with a JSONB payload and `received_at`,
a `daily_aggregations` view defined differently from ours, a view reading that view, a view without a
usable unique index, a view named like a table in another schema, comments on views and columns, and
another team's view that is not selected.
"""

import json
import os

import dagster as dg
import psycopg
import pytest

from analytics_views.operations import cli
from analytics_views.orchestration.view_checks import MATCHES_DISCOVERY_CHECK, UNIQUE_INDEX_CHECK
from analytics_views.orchestration.component import DEFS_ENV, discover_views, load_definitions, load_views
from analytics_views.sql_files.discovery import asset_keys
from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import DEFS_YAML, SQL_DIR
from analytics_views.operations.migrate import migrate
from analytics_views.operations.commands import discovery_warning
from analytics_views.orchestration.view_checks import STATIC_CHECKS

FOREIGN_SCHEMA = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL
);
COMMENT ON TABLE events IS 'Raw events as the ingest service received them.';
COMMENT ON COLUMN events.payload IS 'The event as the client sent it (type, amount, ...).';
INSERT INTO events (user_id, payload, received_at)
SELECT g % 7, jsonb_build_object('type', CASE WHEN g % 3 = 0 THEN 'purchase' ELSE 'view' END, 'amount', g),
       timestamptz '2024-03-01 00:00+00' + g * interval '5 hours'
FROM generate_series(1, 200) AS g;

CREATE MATERIALIZED VIEW daily_aggregations AS
SELECT (received_at AT TIME ZONE 'UTC')::date AS day, count(*) AS events, count(DISTINCT user_id) AS users
FROM events GROUP BY 1;
CREATE UNIQUE INDEX daily_aggregations_day ON daily_aggregations (day);
COMMENT ON MATERIALIZED VIEW daily_aggregations IS 'Events and users per UTC day of receipt.';
COMMENT ON COLUMN daily_aggregations.users IS 'Distinct users that day.';

CREATE SCHEMA reporting;
CREATE MATERIALIZED VIEW reporting.weekly_rollup AS
SELECT date_trunc('week', day)::date AS week, sum(events) AS events FROM public.daily_aggregations GROUP BY 1;
CREATE UNIQUE INDEX ON reporting.weekly_rollup (week);
COMMENT ON MATERIALIZED VIEW reporting.weekly_rollup IS 'Events per ISO week, rolled up from daily_aggregations.';

CREATE MATERIALIZED VIEW reporting.events AS
SELECT payload ->> 'type' AS event_type, count(*) AS events FROM public.events GROUP BY 1;
CREATE UNIQUE INDEX ON reporting.events (event_type);

CREATE MATERIALIZED VIEW reporting.purchases_by_user AS
SELECT user_id, count(*) AS purchases FROM public.events WHERE payload ->> 'type' = 'purchase' GROUP BY user_id;
CREATE INDEX ON reporting.purchases_by_user (user_id);  -- not unique: CONCURRENTLY cannot use it

CREATE SCHEMA other_team;
CREATE MATERIALIZED VIEW other_team.private_counts AS SELECT count(*) AS n FROM public.events;
"""

CONFIG = """
type: analytics_views.MaterializedViewsComponent
attributes:
  schemas: [reporting]
  names: [public.daily_aggregations]
  cadence:
    "purchases_*": weekly
"""

# Every relation outside the system schemas: identity, definition, indexes and comments.
CATALOG_FINGERPRINT = """
SELECT n.nspname, c.relname, c.relkind, c.oid,
       CASE WHEN c.relkind IN ('m', 'v') THEN pg_get_viewdef(c.oid) END,
       obj_description(c.oid, 'pg_class'),
       (SELECT array_agg(pg_get_indexdef(indexrelid) ORDER BY 1) FROM pg_index WHERE indrelid = c.oid),
       (SELECT array_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' ' || coalesce(col_description(c.oid, attnum), '')
                         ORDER BY attnum) FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped)
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""


def catalog(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(CATALOG_FINGERPRINT).fetchall()


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


@pytest.fixture
def foreign_db(empty_db, tmp_path, monkeypatch) -> str:
    """A database built by someone else's SQL, with a defs.yaml selecting its views, DATABASE_URL set."""
    execute(empty_db, FOREIGN_SCHEMA)
    config = tmp_path / "defs.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv(DEFS_ENV, str(config))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    return empty_db


@pytest.fixture
def adopted(foreign_db) -> dg.Definitions:
    discover_views()
    return load_definitions()


def specs_by_key(defs: dg.Definitions) -> dict[str, dg.AssetSpec]:
    return {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}


def checks(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def test_discovered_views_become_assets_with_lineage_from_the_catalog(adopted):
    specs = specs_by_key(adopted)
    views = {key for key, spec in specs.items() if spec.group_name == "analytics_views"}
    # Named in the schema discovery ran in (public), [schema, name] in the others.
    assert views == {"daily_aggregations", "reporting/weekly_rollup", "reporting/events", "reporting/purchases_by_user"}
    assert "other_team/private_counts" not in specs and "private_counts" not in specs  # not selected
    deps = {key: {dep.asset_key.to_user_string() for dep in specs[key].deps} for key in views}
    assert deps == {
        "daily_aggregations": {"events"},
        "reporting/weekly_rollup": {"daily_aggregations"},  # a view reading a view
        "reporting/events": {"events"},
        "reporting/purchases_by_user": {"events"},
    }
    assert specs["events"].group_name == "sources"
    assert specs["reporting/weekly_rollup"].tags["cadence"] == "daily"
    assert specs["reporting/purchases_by_user"].tags["cadence"] == "weekly"


def test_column_schema_and_descriptions_come_from_the_catalog_comments(adopted):
    specs = specs_by_key(adopted)
    daily = specs["daily_aggregations"]
    assert daily.description.startswith("Events and users per UTC day of receipt.")
    columns = {c.name: c for c in daily.metadata["dagster/column_schema"].columns}
    assert [(name, c.type) for name, c in columns.items()] == [("day", "date"), ("events", "bigint"), ("users", "bigint")]
    assert columns["users"].description == "Distinct users that day."
    assert columns["day"].description is None
    source = specs["events"]
    assert source.description == "Raw events as the ingest service received them."
    source_columns = {c.name: c for c in source.metadata["dagster/column_schema"].columns}
    assert source_columns["payload"].type == "jsonb"
    assert source_columns["payload"].description == "The event as the client sent it (type, amount, ...)."
    assert source_columns["received_at"].type == "timestamp with time zone"


def test_definitions_load_from_the_state_file_without_the_database(foreign_db, monkeypatch):
    discover_views()
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/unreachable")

    def no_connection(*args, **kwargs):
        raise AssertionError("definitions must not connect to the database")

    monkeypatch.setattr(psycopg, "connect", no_connection)
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    assert "reporting/weekly_rollup" in specs_by_key(defs)


def test_missing_state_file_is_one_line_naming_discover(foreign_db):
    with pytest.raises(AnalyticsViewsError, match=r"never discovered: run `analytics-views discover`") as error:
        load_definitions()
    assert "\n" not in str(error.value)


def test_discovery_state_is_stable_and_holds_no_connection_details(foreign_db):
    state_file, _, _, _ = discover_views()
    first = state_file.read_text()
    assert discover_views()[0] == state_file
    assert state_file.read_text() == first
    database = psycopg.conninfo.conninfo_to_dict(foreign_db)["dbname"]
    assert database not in first
    state = json.loads(first)
    assert [(v["schema"], v["name"]) for v in state["views"]] == [
        ("public", "daily_aggregations"),
        ("reporting", "events"),
        ("reporting", "purchases_by_user"),
        ("reporting", "weekly_rollup"),
    ]


def test_jobs_refresh_in_dependency_order_and_checks_tell_the_truth(adopted, foreign_db):
    before = catalog(foreign_db)
    # New rows: only a refresh of daily_aggregations followed by one of weekly_rollup shows them in the rollup.
    execute(
        foreign_db,
        "INSERT INTO events (user_id, payload, received_at) "
        "SELECT 1, '{\"type\": \"purchase\"}', timestamptz '2024-04-01 12:00+00' FROM generate_series(1, 50)",
    )

    daily = adopted.resolve_job_def("daily_refresh_job").execute_in_process(raise_on_error=False)

    assert daily.success
    refreshed = [event.asset_key.to_user_string() for event in daily.get_asset_materialization_events()]
    assert set(refreshed) == {"daily_aggregations", "reporting/weekly_rollup", "reporting/events"}
    assert refreshed.index("daily_aggregations") < refreshed.index("reporting/weekly_rollup")
    with psycopg.connect(foreign_db) as conn:
        assert conn.execute("SELECT sum(events) FROM reporting.weekly_rollup").fetchone()[0] == 250
        assert conn.execute("SELECT events FROM reporting.events WHERE event_type = 'purchase'").fetchone()[0] == 116
    daily_checks = checks(daily)
    assert {key for key, check in daily_checks.items() if not check.passed} == set()
    assert set(daily_checks) == {
        (view, UNIQUE_INDEX_CHECK) for view in ("daily_aggregations", "reporting/weekly_rollup", "reporting/events")
    }
    definition = adopted.resolve_job_def("definition_checks_job").execute_in_process(raise_on_error=False)
    # The checks that follow the views' definitions, not their rows: a job of their own.
    assert set(checks(definition)) == {
        (view, check)
        for view in ("daily_aggregations", "reporting/weekly_rollup", "reporting/events", "reporting/purchases_by_user")
        for check in (MATCHES_DISCOVERY_CHECK, *STATIC_CHECKS)
    }
    assert all(check.passed for (view, name), check in checks(definition).items() if name == MATCHES_DISCOVERY_CHECK)
    [events] = [e for e in daily.get_asset_materialization_events() if e.asset_key == dg.AssetKey(["reporting", "events"])]
    metadata = {k: v.value for k, v in events.materialization.metadata.items()}
    assert metadata["dagster/row_count"] == 2
    assert metadata["dagster/table_name"].endswith(".reporting.events")

    weekly = adopted.resolve_job_def("weekly_refresh_job").execute_in_process(raise_on_error=False)

    assert not weekly.success
    unindexed = checks(weekly)[("reporting/purchases_by_user", UNIQUE_INDEX_CHECK)]
    assert not unindexed.passed
    assert "reporting.purchases_by_user has no unique index usable by REFRESH" in unindexed.description
    [failure] = [event for event in weekly.all_events if event.is_step_failure]
    assert failure.step_key == "refresh_weekly_views"
    assert list(failure.step_failure_data.user_failure_data.metadata["analytics_views/not_refreshed"].value) == [
        "reporting.purchases_by_user"
    ]
    # Refreshing changed contents only: no foreign object was redefined, re-created, re-indexed or re-commented.
    assert catalog(foreign_db) == before


def test_migrate_refuses_to_overwrite_a_foreign_table_and_changes_nothing(foreign_db):
    before = catalog(foreign_db)
    with pytest.raises(AnalyticsViewsError) as error:
        migrate(foreign_db)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith('relation "events" already exists and was not created by analytics-views')
    # It names the defs.yaml in use (the fixture's, by ANALYTICS_VIEWS_DEFS), not the project's own.
    assert "use another schema" in message and f"and no `sql_folder`, like {os.environ[DEFS_ENV]})" in message
    assert "analytics_views/orchestration/defs/views/defs.yaml" not in message
    assert catalog(foreign_db) == before


def test_migrate_refuses_a_view_of_the_same_name_defined_differently(empty_db):
    execute(
        empty_db,
        "CREATE SCHEMA legacy; CREATE TABLE legacy.hits (at timestamptz);"
        "CREATE MATERIALIZED VIEW daily_aggregations AS SELECT at::date AS day, count(*) AS hits FROM legacy.hits GROUP BY 1",
    )
    before = catalog(empty_db)
    with pytest.raises(AnalyticsViewsError, match=r'^relation "daily_aggregations" already exists .*views/daily_aggregations\.sql'):
        migrate(empty_db)
    assert catalog(empty_db) == before


def test_migrate_cli_says_it_in_one_line(foreign_db, capsys):
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith('analytics-views migrate: error: relation "events" already exists')


def test_stats_reports_a_stale_state_after_views_are_added_dropped_or_redefined(adopted, foreign_db, tmp_path, capsys):
    assert discovery_warning(foreign_db) is None
    execute(
        foreign_db,
        "CREATE MATERIALIZED VIEW reporting.new_view AS SELECT 1 AS one;"
        "DROP MATERIALIZED VIEW reporting.events;"
        "DROP MATERIALIZED VIEW reporting.weekly_rollup;"
        "CREATE MATERIALIZED VIEW reporting.weekly_rollup AS"
        " SELECT date_trunc('week', day)::date AS week, sum(users) AS users FROM public.daily_aggregations GROUP BY 1;"
        "CREATE UNIQUE INDEX ON reporting.weekly_rollup (week);",
    )
    warning = discovery_warning(foreign_db)
    assert warning == (
        f"the discovery state of {tmp_path / 'defs.yaml'} is out of date (added reporting.new_view; dropped "
        "reporting.events; redefined reporting.weekly_rollup): run `analytics-views discover` and reload the definitions"
    )
    assert cli.main(["stats"]) == 1  # reporting.events is gone
    err = capsys.readouterr().err
    assert f"analytics-views stats: warning: {warning}" in err
    assert "error: view reporting.events is missing: the discovery state of" in err

    result = adopted.resolve_job_def("definition_checks_job").execute_in_process(raise_on_error=False)
    assert not checks(result)[("reporting/weekly_rollup", MATCHES_DISCOVERY_CHECK)].passed

    discover_views()
    assert discovery_warning(foreign_db) is None


def test_stats_lists_discovered_views_schema_qualified(adopted, foreign_db, capsys):
    assert cli.main(["stats", "--json"]) == 0
    rows = {row["view"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"public.daily_aggregations", "reporting.weekly_rollup", "reporting.events", "reporting.purchases_by_user"}
    assert rows["reporting.purchases_by_user"]["unique_index_usable"] is False
    assert rows["reporting.events"]["rows"] == 2


def test_refresh_command_refreshes_discovered_views_by_schema_qualified_name(adopted, foreign_db, dagster_instance, capsys):
    assert cli.main(["refresh", "reporting.events", "public.daily_aggregations"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["public.daily_aggregations", "reporting.events"]
    assert all("refreshed (" in line for line in lines)
    # A bare name finds the one view bearing it, whatever its schema; a name no view bears is refused.
    assert cli.main(["refresh", "events"]) == 0
    assert capsys.readouterr().out.startswith("reporting.events: ")
    assert cli.main(["refresh", "event"]) == 1
    assert "unknown view 'event'" in capsys.readouterr().err


def test_config_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    config = tmp_path / "defs.yaml"
    monkeypatch.setenv(DEFS_ENV, str(config))
    config.write_text(CONFIG.replace('"purchases_*": weekly', '"x*": hourly'))
    with pytest.raises(AnalyticsViewsError) as error:
        load_definitions()
    assert str(error.value) == (
        f"{config}: attributes.cadence 'x*': 'hourly' names no cadence; use one of daily, weekly or define it "
        "under attributes.cadences"
    )
    config.write_text(CONFIG.replace("schemas:", "schema:"))
    with pytest.raises(AnalyticsViewsError) as error:
        load_definitions()
    assert str(error.value) == f"{config}: attributes.schema: Extra inputs are not permitted: remove it or fix its name"


def test_default_config_manages_the_project_views_only(monkeypatch):
    monkeypatch.delenv(DEFS_ENV, raising=False)
    config = load_views().config
    assert config.source == DEFS_YAML and config.sql_dir == SQL_DIR
    assert config.project_views and not config.discovers
    assert config.selects("reporting", "anything") is False
    assert config.cadence_of("reporting", "anything") == "daily"


def test_a_relations_key_is_its_name_in_the_schema_discovery_ran_in_and_schema_qualified_elsewhere():
    state = {
        "current_schema": "public",
        "views": [{"schema": "legacy", "name": "daily_aggregations"}, {"schema": "legacy", "name": "rollup"}],
        "relations": [{"schema": "public", "name": "events"}, {"schema": "legacy", "name": "users"}],
    }
    keys = asset_keys(state)
    assert keys == {
        ("legacy", "daily_aggregations"): ("legacy", "daily_aggregations"),  # ours is public.daily_aggregations
        ("legacy", "rollup"): ("legacy", "rollup"),
        ("public", "events"): ("events",),  # the project's own source table: the same relation, the same asset
        ("legacy", "users"): ("legacy", "users"),
    }
    # Whatever else is discovered later, the keys of these relations stay.
    state["views"].append({"schema": "public", "name": "rollup"})
    state["relations"].append({"schema": "other", "name": "events"})
    assert {relation: key for relation, key in asset_keys(state).items() if relation in keys} == keys
