"""ViewTranslator on tiny hand-made views and sources: exact keys, groups, tags, kinds, owners, metadata keys
and freshness windows; a subclass's choices reach the built assets. No database needed."""

import dataclasses
import re
from datetime import timedelta

import dagster as dg
import pytest

from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration.assets import view_asset, view_assets
from analytics_views.orchestration.component import MaterializedViewsComponent
from analytics_views.orchestration.translator import UndeclaredTable, ViewTranslator, ViewTranslatorSettings
from analytics_views.paths import PROJECT_ROOT, SQL_DIR
from analytics_views.postgres.database import Column
from analytics_views.sql_files.discovery import SourceRelation
from analytics_views.sql_files.managed import DEFAULT_CADENCES, Cadence
from analytics_views.sql_files.source_tables import ColumnDoc, SourceTable
from analytics_views.sql_files.views import ViewDefinition

DAILY, WEEKLY = DEFAULT_CADENCES["daily"], DEFAULT_CADENCES["weekly"]
EVERY_4_HOURS = Cadence("every_4_hours", "0 */4 * * *")

# A view of ours, from its SQL file (the file need not exist: nothing reads it).
PROJECT_VIEW = ViewDefinition(
    name="daily_signups",
    path=PROJECT_ROOT / "sql" / "views" / "daily_signups.sql",
    sql="-- How many users signed up each day?\nCREATE MATERIALIZED VIEW daily_signups AS SELECT ... WITH NO DATA;",
    summary="How many users signed up each day?",
    description="How many users signed up each day?\nGrain: one row per UTC day\nCadence: daily",
    grain="one row per UTC day",
    cadence="daily",
    deps=("users",),
    columns=(ColumnDoc("day", None, "The UTC day."), ColumnDoc("signups", None, "Users created that day.")),
    line=4,
    column_lineage={"day": (("users", "created_at"),), "signups": (("users", "user_id"),)},
)
# A view made elsewhere, discovered in another schema than the one discovery ran in.
DISCOVERED_VIEW = ViewDefinition(
    name="weekly_rollup",
    path=None,
    sql="CREATE MATERIALIZED VIEW reporting.weekly_rollup AS\n SELECT ...",
    summary="Orders per week.",
    description="Orders per week.\n\nDiscovered in the catalog as reporting.weekly_rollup.",
    grain=None,
    cadence="weekly",
    deps=("reporting/orders",),
    columns=(Column("week", "date", "ISO week"), Column("orders", "bigint", None)),
    schema="reporting",
    key=("reporting", "weekly_rollup"),
    fingerprint="3f2a",
)
# A name Dagster does not accept: its key part is a valid form of it with a hash (discovery.key_part).
WEIRD_VIEW = ViewDefinition(
    name="revenue report",
    path=None,
    sql='CREATE MATERIALIZED VIEW reporting."revenue report" AS\n SELECT ...',
    summary="Materialized view reporting.revenue report, made outside this project.",
    description="Materialized view reporting.revenue report, made outside this project.",
    grain=None,
    cadence="every_4_hours",
    deps=(),
    columns=(Column("amount", "numeric", None),),
    schema="reporting",
    key=("reporting", "revenue_report_c8006c63"),
    fingerprint="9c1d",
)

VIEW_CASES = [
    pytest.param(
        PROJECT_VIEW,
        DAILY,
        {
            "key": ["daily_signups"],
            "step": "daily_signups",
            "pool": "refresh_daily_signups",
            "deps": [["users"]],
            "tags": {"cadence": "daily"},
            "metadata": [
                "dagster/table_name",
                "dagster/storage_kind",
                "analytics_views/grain",
                "analytics_views/sql_file",
                "dagster/column_schema",
                "dagster/column_lineage",
                "analytics_views/column_lineage",
                "dagster/code_references",
            ],
            "fail_window": timedelta(hours=26),
            "owners": ["team:analytics"],
        },
        id="project-view",
    ),
    pytest.param(
        DISCOVERED_VIEW,
        WEEKLY,
        {
            "key": ["reporting", "weekly_rollup"],
            "step": "reporting__weekly_rollup",
            "pool": "refresh_reporting_weekly_rollup",
            "deps": [["reporting", "orders"]],
            "tags": {"cadence": "weekly"},
            "metadata": [
                "dagster/table_name",
                "dagster/storage_kind",
                "analytics_views/schema",
                "dagster/column_schema",
                "analytics_views/definition",
                "analytics_views/fingerprint",
            ],
            "fail_window": timedelta(days=7, hours=2),
            "owners": [],  # made elsewhere: no invented owner
        },
        id="discovered-view-other-schema",
    ),
    pytest.param(
        WEIRD_VIEW,
        EVERY_4_HOURS,
        {
            "key": ["reporting", "revenue_report_c8006c63"],
            "step": "reporting__revenue_report_c8006c63",
            "pool": "refresh_reporting_revenue_report_c8006c63",
            "deps": [],
            "tags": {"cadence": "every_4_hours"},
            "metadata": [
                "dagster/table_name",
                "dagster/storage_kind",
                "analytics_views/schema",
                "dagster/column_schema",
                "analytics_views/definition",
                "analytics_views/fingerprint",
            ],
            "fail_window": timedelta(hours=6),
            "owners": [],
        },
        id="weird-name",
    ),
]


@pytest.mark.parametrize(("view", "cadence", "expected"), VIEW_CASES)
def test_a_views_spec_has_its_key_group_owners_tags_kinds_metadata_and_freshness(view, cadence, expected):
    spec = ViewTranslator().get_asset_spec(view, cadence)

    assert spec.key.path == expected["key"]
    assert [dep.asset_key.path for dep in spec.deps] == expected["deps"]
    assert spec.group_name == "analytics_views"
    assert spec.owners == expected["owners"]
    assert spec.tags == {**expected["tags"], "dagster/kind/postgres": ""}
    assert spec.kinds == {"postgres"}
    assert list(spec.metadata) == expected["metadata"]
    assert spec.freshness_policy.fail_window.to_timedelta() == expected["fail_window"]
    assert spec.description.startswith(view.summary)


@pytest.mark.parametrize(("view", "cadence", "expected"), VIEW_CASES)
def test_a_views_asset_keeps_the_translators_spec_and_its_step_and_pool_names(view, cadence, expected):
    asset = view_asset(view, cadence)

    [spec] = asset.specs
    # Subsettable (a view's step may refresh some of its views), so each view may be left out of a run.
    assert spec == ViewTranslator().get_asset_spec(view, cadence).replace_attributes(group_name="analytics_views", skippable=True)
    assert (asset.node_def.name, asset.node_def.pool) == (expected["step"], expected["pool"])
    assert {check.asset_key for check in asset.check_specs} == {spec.key}


def test_a_project_views_metadata_values():
    metadata = ViewTranslator().get_asset_spec(PROJECT_VIEW, DAILY).metadata

    assert metadata["analytics_views/grain"] == "one row per UTC day"
    assert metadata["analytics_views/sql_file"] == "sql/views/daily_signups.sql"
    assert [(c.name, c.type, c.description) for c in metadata["dagster/column_schema"].columns] == [
        ("day", "", "The UTC day."),
        ("signups", "", "Users created that day."),
    ]
    assert metadata["dagster/column_lineage"].deps_by_column["signups"] == [
        dg.TableColumnDep(asset_key=dg.AssetKey("users"), column_name="user_id")
    ]
    assert metadata["analytics_views/column_lineage"].value.splitlines()[2] == "| `day` | `users.created_at` |"


SOURCE_CASES = [
    pytest.param(
        SourceTable(
            name="users",
            description="People who signed up.",
            columns=(ColumnDoc("user_id", "bigint", "Identifies the user."),),
            path=PROJECT_ROOT / "sql" / "migrations" / "001_source_tables.sql",
            line=12,
        ),
        ["users"],
        "People who signed up.",
        ["dagster/table_name", "dagster/storage_kind", "dagster/column_schema", "dagster/code_references"],
        id="declared-table",
    ),
    pytest.param(
        UndeclaredTable("campaign_spend"),
        ["campaign_spend"],
        "Source table `campaign_spend`, not created by sql/migrations.",
        ["dagster/table_name", "dagster/storage_kind"],
        id="undeclared-table",
    ),
    pytest.param(
        SourceRelation(
            key=("reporting", "orders"),
            schema="reporting",
            name="orders",
            kind="table",
            comment=None,
            columns=(Column("order_id", "bigint", None),),
        ),
        ["reporting", "orders"],
        "Source table `reporting.orders`.",
        ["dagster/table_name", "dagster/storage_kind", "dagster/column_schema", "analytics_views/schema"],
        id="catalog-relation",
    ),
]


@pytest.mark.parametrize(("source", "key", "description", "metadata"), SOURCE_CASES)
def test_a_sources_spec_has_its_key_group_owners_kinds_and_metadata(source, key, description, metadata):
    spec = ViewTranslator().get_source_spec(source)

    assert spec.key.path == key
    assert spec.description == description
    assert spec.group_name == "sources"
    assert spec.owners == ["team:analytics"]
    assert spec.kinds == {"postgres"}
    assert list(spec.metadata) == metadata
    assert spec.freshness_policy is None  # the application writes source tables continuously


@pytest.mark.parametrize(
    ("item", "table_name"),
    [
        (PROJECT_VIEW, "public.daily_signups"),
        (DISCOVERED_VIEW, "reporting.weekly_rollup"),
        (WEIRD_VIEW, "reporting.revenue report"),
        (SOURCE_CASES[0].values[0], "public.users"),
        (UndeclaredTable("campaign_spend"), "public.campaign_spend"),
        (SOURCE_CASES[2].values[0], "reporting.orders"),
    ],
)
def test_every_view_and_source_carries_its_table_name_and_storage_kind(item, table_name):
    translator = ViewTranslator()
    spec = translator.get_asset_spec(item, DAILY) if isinstance(item, ViewDefinition) else translator.get_source_spec(item)

    assert spec.metadata["dagster/table_name"] == table_name
    assert spec.metadata["dagster/storage_kind"] == "postgres"
    assert spec.kinds == {"postgres"}


def test_a_views_code_version_follows_its_query_not_its_header():
    from dataclasses import replace

    version = ViewTranslator().get_asset_spec(PROJECT_VIEW, DAILY).code_version
    reworded = replace(PROJECT_VIEW, sql="-- Signups per day, reworded.\n" + PROJECT_VIEW.sql.split("\n", 1)[1])
    changed = replace(PROJECT_VIEW, sql=PROJECT_VIEW.sql.replace("SELECT ...", "SELECT 1"))
    discovered = ViewTranslator().get_asset_spec(DISCOVERED_VIEW, WEEKLY).code_version

    assert len(version) == 16
    assert ViewTranslator().get_asset_spec(reworded, DAILY).code_version == version
    assert ViewTranslator().get_asset_spec(changed, DAILY).code_version != version
    assert PROJECT_VIEW.query == "SELECT ..."
    assert discovered != ViewTranslator().get_asset_spec(replace(DISCOVERED_VIEW, sql=DISCOVERED_VIEW.sql + " 2"), WEEKLY).code_version


class FinanceTranslator(ViewTranslator):
    def get_group_name(self, view, cadence):
        return "finance_reporting"

    def get_owners(self, view, cadence):
        return ["team:finance", "dana@example.com"]

    def get_tags(self, view, cadence):
        return {**super().get_tags(view, cadence), "domain": "finance"}

    def get_source_owners(self, source):
        return ["team:platform"]


def test_a_subclass_changes_group_owners_and_tags_of_the_built_asset():
    asset = view_asset(DISCOVERED_VIEW, WEEKLY, translator=FinanceTranslator())

    [spec] = asset.specs
    assert spec.key == dg.AssetKey(["reporting", "weekly_rollup"])  # the key stays
    assert spec.group_name == "finance_reporting"
    assert spec.owners == ["team:finance", "dana@example.com"]
    assert spec.tags == {"cadence": "weekly", "domain": "finance", "dagster/kind/postgres": ""}
    assert (asset.node_def.name, asset.node_def.pool) == ("reporting__weekly_rollup", "refresh_reporting_weekly_rollup")


def project_views(**attributes) -> dg.Definitions:
    """This project's views through a component built in Python, as a defs.yaml with these attributes would."""
    return MaterializedViewsComponent(sql_folder=str(SQL_DIR), **attributes).definitions(None)


def test_the_components_translator_class_reaches_every_view_and_source():
    defs = project_views(translator_class=f"{__name__}.FinanceTranslator")

    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    views = {key for key, spec in specs.items() if spec.group_name == "finance_reporting"}
    assert views == {"daily_aggregations", "cohort_aggregations", "campaign_aggregations", "weekly_aggregations"}
    assert specs["daily_aggregations"].tags["domain"] == "finance"
    assert (specs["events"].group_name, specs["events"].owners) == ("sources", ["team:platform"])
    # Jobs select the views by key, so they hold the same steps whatever the translator.
    assert [node.name for node in defs.resolve_job_def("weekly_refresh_job").graph.nodes] == ["refresh_weekly_views"]


class PrefixedTranslator(ViewTranslator):
    """A team's key rule: every view under its prefix."""

    def get_asset_key(self, view):
        return super().get_asset_key(view).with_prefix("finance")


def test_a_subclass_may_change_a_views_key_and_the_views_reading_it_follow():
    reader = dataclasses.replace(
        PROJECT_VIEW,
        name="signup_trend",
        deps=("daily_signups", "users"),
        column_lineage={"day": (("daily_signups", "day"),), "signups": (("daily_signups", "signups"), ("users", "user_id"))},
    )

    signups, trend = view_assets([PROJECT_VIEW, reader], {"daily": DAILY}, PrefixedTranslator())

    assert (signups.key, trend.key) == (dg.AssetKey(["finance", "daily_signups"]), dg.AssetKey(["finance", "signup_trend"]))
    assert trend.reads == [dg.AssetKey(["finance", "daily_signups"]), dg.AssetKey("users")]  # a source keeps its key
    lineage = trend.spec.metadata["dagster/column_lineage"].deps_by_column
    assert [(dep.asset_key.to_user_string(), dep.column_name) for dep in lineage["signups"]] == [
        ("finance/daily_signups", "signups"),
        ("users", "user_id"),
    ]


def test_a_views_new_key_reaches_its_job_checks_and_sources_and_its_step_keeps_its_name():
    defs = project_views(translator_class=f"{__name__}.PrefixedTranslator")

    specs = {spec.key.to_user_string() for spec in defs.resolve_all_asset_specs()}
    views = sorted(key for key in specs if key.startswith("finance/"))
    assert views == ["finance/campaign_aggregations", "finance/cohort_aggregations", "finance/daily_aggregations", "finance/weekly_aggregations"]
    assert "events" in specs
    weekly_job = defs.resolve_job_def("weekly_refresh_job")
    assert [key.to_user_string() for key in weekly_job.asset_layer.executable_asset_keys] == ["finance/weekly_aggregations"]
    assert [node.name for node in weekly_job.graph.nodes] == ["refresh_weekly_views"]
    assert {key.asset_key.to_user_string() for key in defs.resolve_asset_graph().asset_check_keys} == set(views)


def test_a_subclass_may_not_change_a_sources_key():
    with pytest.raises(TypeError, match="overrides ViewTranslator.get_source_key"):

        class PrefixedSources(ViewTranslator):
            def get_source_key(self, source):
                return dg.AssetKey(["raw", source.name])


@pytest.mark.parametrize(
    ("translator_class", "message"),
    [
        ("no_such_module.Translator", "cannot import no_such_module (No module named 'no_such_module'): fix the module's name or install it"),
        (f"{__name__}.NoSuchTranslator", f"{__name__} has no NoSuchTranslator: fix the class's name"),
        ("dagster.AssetSpec", "'dagster.AssetSpec' is not a ViewTranslator subclass: name one as module.Class"),
        ("FinanceTranslator", "'FinanceTranslator' is not a ViewTranslator subclass: name one as module.Class"),
    ],
)
def test_a_translator_class_that_does_not_load_is_one_line_naming_the_entry(translator_class, message):
    with pytest.raises(AnalyticsViewsError) as raised:
        project_views(translator_class=translator_class)

    assert str(raised.value).endswith(f"attributes.translator_class: {message}")


def test_every_metadata_key_of_the_definitions_is_dagsters_or_namespaced_ours():
    defs = project_views()
    for spec in defs.resolve_all_asset_specs():
        assert all(key.startswith(("dagster/", "analytics_views/")) for key in spec.metadata), spec.key


def test_code_references_link_to_the_repository_when_the_settings_name_one():
    translator = ViewTranslator(ViewTranslatorSettings(git_url="https://github.com/acme/analytics-views", git_branch="release"))

    [reference] = translator.get_code_references(PROJECT_VIEW, DAILY).code_references

    assert reference.url == "https://github.com/acme/analytics-views/blob/release/sql/views/daily_signups.sql#L4"
    assert reference.label == "sql/views/daily_signups.sql"


def test_code_references_are_local_files_by_default_and_none_for_a_discovered_view(monkeypatch):
    monkeypatch.delenv("ANALYTICS_VIEWS_GIT_URL", raising=False)

    [reference] = ViewTranslator().get_code_references(PROJECT_VIEW, DAILY).code_references

    assert (reference.file_path, reference.line_number) == (str(PROJECT_VIEW.path), 4)
    assert ViewTranslator().get_code_references(DISCOVERED_VIEW, WEEKLY) is None


def test_code_references_follow_the_git_environment_variables_unless_settings_are_given(monkeypatch):
    monkeypatch.setenv("ANALYTICS_VIEWS_GIT_URL", "https://github.com/acme/analytics-views/")
    monkeypatch.setenv("ANALYTICS_VIEWS_GIT_BRANCH", "release")

    [from_env] = ViewTranslator().get_code_references(PROJECT_VIEW, DAILY).code_references
    [local] = ViewTranslator(ViewTranslatorSettings()).get_code_references(PROJECT_VIEW, DAILY).code_references

    assert from_env.url == "https://github.com/acme/analytics-views/blob/release/sql/views/daily_signups.sql#L4"
    assert local.file_path == str(PROJECT_VIEW.path)


def test_the_docs_translator_class_and_component_subclass_compose_with_their_defs_yaml(tmp_path, monkeypatch):
    """The docs' examples (docs/adopting.md, *Translator*), as written: a translator changing group, owners and
    tags, named by `translator_class`, and a component subclass named by `type:`, in a defs.yaml whose other
    settings (here a per-view `translation:`) still apply."""
    guide = (PROJECT_ROOT / "docs" / "adopting.md").read_text()
    for code in re.findall(r"```python\n(.*?)```", guide[guide.index("## Translator") :], re.S):
        (tmp_path / re.match(r"# (\w+\.py);", code)[1]).write_text(code)  # each example names its module
    monkeypatch.syspath_prepend(str(tmp_path))
    project_yaml = (PROJECT_ROOT / "analytics_views/orchestration/defs/views/defs.yaml").read_text()
    defs_yaml = tmp_path / "defs.yaml"
    defs_yaml.write_text(
        project_yaml.replace("type: analytics_views.MaterializedViewsComponent", "type: audited_views.AuditedViews")
        .replace("sql_folder: ../../../../sql", f"sql_folder: {PROJECT_ROOT / 'sql'}")
        .replace("translation: {}", "translation:\n    daily_aggregations: {description: Daily numbers for finance.}")
        .replace("# translator_class: finance_views.FinanceTranslator", "translator_class: finance_views.FinanceTranslator")
    )

    component = MaterializedViewsComponent.from_defs_yaml(defs_yaml)
    defs = component.definitions(None)

    assert type(component).__name__ == "AuditedViews"
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    daily = specs[dg.AssetKey("daily_aggregations")]
    assert daily.group_name == "finance_reporting"
    assert daily.owners == ["team:finance", "dana@example.com"]
    assert daily.tags["domain"] == "finance"
    assert daily.description == "Daily numbers for finance."
    assert specs[dg.AssetKey("weekly_aggregations")].group_name == "finance_reporting"
    prefixed = project_views(translator_class="finance_keys.FinanceKeys")
    assert dg.AssetKey(["finance", "daily_aggregations"]) in {spec.key for spec in prefixed.resolve_all_asset_specs()}


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        ("dagster.AssetSpec", "type must be analytics_views.MaterializedViewsComponent or a subclass of it"),
        ("no_such_module.Views", "type must be analytics_views.MaterializedViewsComponent or a subclass of it"),
        ("broken_views.Views", "type: cannot import broken_views (ZeroDivisionError: division by zero): fix it"),
    ],
)
def test_a_defs_yaml_type_that_is_not_the_component_is_one_line(tmp_path, monkeypatch, type_name, message):
    (tmp_path / "broken_views.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    defs_yaml = tmp_path / "defs.yaml"
    defs_yaml.write_text(f"type: {type_name}\nattributes: {{}}\n")

    with pytest.raises(AnalyticsViewsError, match=re.escape(message)):
        MaterializedViewsComponent.from_defs_yaml(defs_yaml)
