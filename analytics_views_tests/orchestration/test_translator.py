"""ViewTranslator on tiny hand-made views. No database needed."""

from analytics_views.orchestration.translator import ViewTranslator, ViewTranslatorSettings
from analytics_views.paths import PROJECT_ROOT
from analytics_views.postgres.database import Column
from analytics_views.sql_files.managed import DEFAULT_CADENCES
from analytics_views.sql_files.source_tables import ColumnDoc
from analytics_views.sql_files.views import ViewDefinition

DAILY, WEEKLY = DEFAULT_CADENCES["daily"], DEFAULT_CADENCES["weekly"]

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
