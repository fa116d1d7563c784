"""`MaterializedViewsComponent`: this project's definitions come from its defs.yaml, and another `dg` project
that installs nothing but this package manages its own views with one defs.yaml."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration import component
from analytics_views.orchestration.component import DEFS_ENV, MaterializedViewsComponent, load_definitions
from analytics_views.paths import DEFS_YAML, SQL_DIR
from analytics_views.sql_files.managed import ManagedConfig

BIN = Path(sys.executable).parent
VIEWS = ["campaign_aggregations", "cohort_aggregations", "daily_aggregations", "weekly_aggregations"]
SOURCES = ["campaign_spend", "campaigns", "events", "payments", "users"]


def summary(defs: dg.Definitions) -> dict:
    """What a deployment sees: asset keys and groups, checks, each job's views, each schedule's timetable."""
    specs = defs.resolve_all_asset_specs()
    return {
        "assets": sorted((spec.key.to_user_string(), spec.group_name) for spec in specs),
        "checks": sorted(key.to_user_string() for key in defs.resolve_asset_graph().asset_check_keys),
        "jobs": {
            job.name: sorted(key.to_user_string() for key in defs.resolve_job_def(job.name).asset_layer.executable_asset_keys)
            for job in defs.jobs
        },
        "schedules": sorted((s.name, s.job_name, s.cron_schedule, s.execution_timezone) for s in defs.schedules),
        "resources": sorted(defs.resources),
    }


def test_the_projects_defs_yaml_builds_what_the_code_defaults_build(monkeypatch):
    monkeypatch.delenv(DEFS_ENV, raising=False)

    from_yaml = summary(load_definitions())

    # The component built in Python with only its SQL folder: every other attribute's default is the defs.yaml's.
    assert from_yaml == summary(MaterializedViewsComponent(sql_folder=str(SQL_DIR)).definitions(None))
    assert from_yaml["assets"] == sorted([*((v, "analytics_views") for v in VIEWS), *((s, "sources") for s in SOURCES)])
    assert from_yaml["jobs"] == {
        "daily_refresh_job": ["campaign_aggregations", "cohort_aggregations", "daily_aggregations"],
        "weekly_refresh_job": ["weekly_aggregations"],
        "definition_checks_job": [],  # the views' definition checks, no asset (definition_checks.py)
        "observe_sources_job": SOURCES,  # observations (observed_sources.py)
    }
    assert from_yaml["schedules"] == [
        ("daily_refresh_schedule", "daily_refresh_job", "0 3 * * *", "UTC"),
        ("weekly_refresh_schedule", "weekly_refresh_job", "0 4 * * 1", "UTC"),
    ]
    assert from_yaml["resources"] == ["analytics_db"]
    assert len(from_yaml["checks"]) == 4 * 5 + 5  # unique_index and the four SQL checks per view, our data tests


def write_defs_yaml(path: Path, attributes: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "type: analytics_views.MaterializedViewsComponent\nattributes:\n"
        + textwrap.indent(textwrap.dedent(attributes).strip() + "\n", "  ")
    )
    return path


def test_translation_overrides_set_group_owners_tags_and_description_of_matching_views(tmp_path, monkeypatch):
    config = write_defs_yaml(
        tmp_path / "defs.yaml",
        f"""
        sql_folder: {SQL_DIR}
        database: {{url_env: ANALYTICS_DB_URL}}
        refresh: {{lock_timeout_s: 5, skip_unchanged: false, work_mem_mb: 64}}
        translation:
          "*_aggregations": {{owners: ["team:growth"], tags: {{tier: "1"}}}}
          "weekly_*": {{group_name: weekly_reports, description: "Weekly numbers for the board."}}
        """,
    )
    monkeypatch.setenv(DEFS_ENV, str(config))

    defs = load_definitions()

    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    weekly, daily = specs["weekly_aggregations"], specs["daily_aggregations"]
    assert (weekly.group_name, weekly.owners, weekly.description) == (
        "weekly_reports", ["team:growth"], "Weekly numbers for the board."
    )
    assert weekly.tags == {"cadence": "weekly", "tier": "1", "dagster/kind/postgres": ""}
    assert (daily.group_name, daily.owners, daily.tags["tier"]) == ("analytics_views", ["team:growth"], "1")
    assert daily.description.startswith("How many users were active")
    assert specs["events"].owners == ["team:analytics"] and "tier" not in specs["events"].tags  # sources as built
    # Jobs select by key: the overrides move no view to another job.
    assert summary(defs)["jobs"]["weekly_refresh_job"] == ["weekly_aggregations"]
    database = defs.resources["analytics_db"]
    assert (database.lock_timeout_s, database.skip_unchanged, database.work_mem_mb) == (5, False, 64)
    assert database.url == dg.EnvVar("ANALYTICS_DB_URL")


def test_a_views_toml_left_behind_is_one_line_naming_the_defs_yaml(tmp_path, monkeypatch):
    (tmp_path / "views.toml").write_text("project_views = true\n")
    monkeypatch.setattr(component, "PROJECT_ROOT", tmp_path)
    with pytest.raises(AnalyticsViewsError) as error:
        load_definitions()
    assert str(error.value).startswith(f"views.toml is no longer read: move its settings to {DEFS_YAML} (attributes: ")
    assert "\n" not in str(error.value)


def test_a_views_toml_named_by_the_old_variable_is_one_line_and_a_non_zero_exit(tmp_path):
    result = subprocess.run(
        [str(BIN / "analytics-views"), "stats"],
        env={**os.environ, "ANALYTICS_VIEWS_CONFIG": str(tmp_path / "views.toml"), "DATABASE_URL": "postgresql://x@127.0.0.1:1/x"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"analytics-views stats: error: {tmp_path / 'views.toml'} (ANALYTICS_VIEWS_CONFIG) is no longer read")
    assert f"set {DEFS_ENV} to that file instead" in line


def test_the_component_is_listed_by_dg_and_loads_without_importing_dagster_with_the_package():
    listed = subprocess.run([str(BIN / "dg"), "list", "components", "--json"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "analytics_views.MaterializedViewsComponent" in {item["key"] for item in json.loads(listed.stdout)["items"]}
    light = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import sys, analytics_views; assert 'dagster' not in sys.modules"],
        capture_output=True,
        text=True,
    )
    assert light.returncode == 0, light.stderr
    assert analytics_views_component() is MaterializedViewsComponent


def analytics_views_component():
    import analytics_views

    return analytics_views.MaterializedViewsComponent


# --- another project: one defs.yaml, its own SQL folder and views made elsewhere ---------------------------

SHOP_SCHEMA = """
CREATE TABLE orders (order_id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(10, 2) NOT NULL);
INSERT INTO orders SELECT g, 'customer ' || (g % 3), g * 10 FROM generate_series(1, 12) AS g;
CREATE SCHEMA legacy;
CREATE MATERIALIZED VIEW legacy.big_orders AS SELECT order_id, amount FROM public.orders WHERE amount >= 100;
CREATE UNIQUE INDEX ON legacy.big_orders (order_id);
"""

ORDER_TOTALS = """\
-- How many orders and how much revenue does each customer bring?
-- Grain: one row per customer
-- Cadence: daily
CREATE MATERIALIZED VIEW order_totals AS
SELECT customer, count(*) AS orders, sum(amount) AS revenue
FROM orders
GROUP BY customer
WITH NO DATA;

CREATE UNIQUE INDEX order_totals_customer ON order_totals (customer);
"""

SHOP_DEFS_YAML = """
sql_folder: sql
schemas: [legacy]
database: {url_env: SHOP_DATABASE_URL}
cadences:
  hourly: "0 * * * *"
cadence:
  order_totals: hourly
translation:
  "order_*": {group_name: shop, owners: ["team:shop"]}
"""


@pytest.fixture
def shop(empty_db, tmp_path) -> tuple[Path, dict[str, str]]:
    """A second dg project (package `shop_views`) whose database holds its own table and view and a view made
    elsewhere; returns its folder and the environment `dg` runs in: this venv, the project on PYTHONPATH."""
    root = tmp_path / "shop"
    package = root / "shop_views"
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "shop-views"
            version = "0.1.0"
            dependencies = ["analytics-views"]

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "shop_views"

            [tool.dg.cli]
            suppress_warnings = ["project_and_activated_venv_mismatch"]
            """
        )
    )
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(
        textwrap.dedent(
            """\
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs():
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    defs_yaml = write_defs_yaml(package / "defs" / "views" / "defs.yaml", SHOP_DEFS_YAML)
    view_file = defs_yaml.parent / "sql" / "views" / "order_totals.sql"
    view_file.parent.mkdir(parents=True)
    view_file.write_text(ORDER_TOTALS)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(SHOP_SCHEMA)
        conn.execute(ORDER_TOTALS)  # the project's own migration would create it
    unset = {"DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME", "VIRTUAL_ENV", DEFS_ENV}
    env = {name: value for name, value in os.environ.items() if name not in unset} | {
        "HOME": str(tmp_path),
        "PYTHONPATH": str(root),
        "SHOP_DATABASE_URL": empty_db,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    (tmp_path / "dagster_home").mkdir()
    return root, env


def run_dg(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dg"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dg {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_another_dg_project_manages_its_own_views_with_one_defs_yaml(shop, empty_db, monkeypatch):
    root, env = shop

    # The views made elsewhere are discovered into the component's state by dg, from the database.
    run_dg(root, env, "utils", "refresh-defs-state")
    state = root / "shop_views" / "defs" / ".local_defs_state" / "MaterializedViewsComponent" / "state"
    assert [(v["schema"], v["name"]) for v in json.loads(state.read_text())["views"]] == [("legacy", "big_orders")]

    # From then on, definitions load without the database.
    offline = {**env, "SHOP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/unreachable"}
    assert "All definitions loaded successfully." in run_dg(root, offline, "check", "defs").stdout
    listed = json.loads(run_dg(root, offline, "list", "defs", "--json").stdout)
    assets = {asset["asset_key"]: asset for asset in listed["assets"]}
    assert sorted(assets) == ["legacy/big_orders", "order_totals", "orders"]
    assert (assets["order_totals"]["group_name"], assets["order_totals"]["owners"]) == ("shop", [{"team": "shop"}])
    assert assets["legacy/big_orders"]["dependency_keys"] == ["orders"]
    assert sorted(job["name"] for job in listed["jobs"]) == [
        "daily_refresh_job", "definition_checks_job", "hourly_refresh_job", "observe_sources_job"
    ]
    assert sorted(schedule["name"] for schedule in listed["schedules"]) == ["daily_refresh_schedule", "hourly_refresh_schedule"]

    # Materializing the view populates it, in the shop's own database.
    run_dg(root, env, "launch", "--assets", "order_totals")

    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'order_totals'").fetchone()[0]
        rows = conn.execute("SELECT customer, orders, revenue FROM order_totals ORDER BY customer").fetchall()
    assert [(customer, orders, float(revenue)) for customer, orders, revenue in rows] == [
        ("customer 0", 4, 300.0),
        ("customer 1", 4, 220.0),
        ("customer 2", 4, 260.0),
    ]
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("order_totals"))
    metadata = event.asset_materialization.metadata
    assert metadata["dagster/row_count"].value == 3 and metadata[keys.REFRESH_MODE].value == RefreshMode.INITIAL_PLAIN
