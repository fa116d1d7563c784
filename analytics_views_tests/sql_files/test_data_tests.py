"""SQL data tests beside a view (data_tests.py, view_checks.py): the shipped tests pass on the demo data, a
failing test reports its rows, an erroring test is a failed check (not a failed step), and discovered views
get theirs from the folder the defs.yaml names."""

from decimal import Decimal

import dagster as dg
import psycopg
import pytest

from analytics_views.sql_files.data_tests import TESTS_DIR, check_name, load_tests, markdown_table, parse_test, run_test
from analytics_views.orchestration.component import DEFS_ENV, discover_views, load_definitions
from analytics_views.orchestration.view_checks import STATIC_CHECKS, data_test_result

OUR_VIEWS = ("daily_aggregations", "cohort_aggregations", "campaign_aggregations", "weekly_aggregations")


def test_each_of_our_views_ships_data_tests_with_a_severity_and_an_assertion():
    tests = {view: load_tests(TESTS_DIR / view) for view in OUR_VIEWS}
    assert {view: [t.name for t in found] for view, found in tests.items()} == {
        "daily_aggregations": ["revenue_matches_payments", "window_has_every_day"],
        "cohort_aggregations": ["retained_within_cohort"],
        "campaign_aggregations": ["spend_matches_campaign_spend"],
        "weekly_aggregations": ["revenue_matches_daily"],
    }
    severities = {t.name: t.severity for found in tests.values() for t in found}
    assert severities["revenue_matches_daily"] == "warn"
    assert list(severities.values()).count("error") == 4
    assert all(t.asserts and not t.asserts.startswith("Severity") for found in tests.values() for t in found)


def test_shipped_data_tests_pass_on_the_demo_data(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM daily_aggregations WHERE revenue > 0").fetchone()[0] > 0
        for view in OUR_VIEWS:
            for test in load_tests(TESTS_DIR / view):
                result = run_test(conn, test)
                assert (result.error, result.failing_rows) == (None, 0), f"{view}/{test.name}"


def test_a_failing_test_reports_its_row_count_and_first_rows(refreshed_db):
    [test] = [t for t in load_tests(TESTS_DIR / "daily_aggregations") if t.name == "revenue_matches_payments"]
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        # A payment made after the refresh, yesterday noon UTC: the view is now behind its sources that day.
        conn.execute(
            "INSERT INTO payments (user_id, amount, paid_at) "
            "SELECT user_id, 12.34, ((now() AT TIME ZONE 'UTC')::date - 1 + time '12:00') AT TIME ZONE 'UTC' "
            "FROM users LIMIT 1"
        )
        day = conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date - 1").fetchone()[0]
        result = run_test(conn, test)
    assert result.failing_rows == 1
    assert result.columns == ("day", "revenue", "payments")
    [(failing_day, revenue, payments)] = result.sample
    assert failing_day == day and payments - revenue == Decimal("12.34")

    check = data_test_result(result)
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["analytics_views/failing_rows"].value == 1
    table = check.metadata["analytics_views/failing_sample"].value
    assert table.splitlines()[:2] == ["| day | revenue | payments |", "|---|---|---|"]
    assert check.description.startswith("1 failing rows. Each day's revenue equals")


def test_a_test_that_errors_is_a_failed_check_naming_the_error(refreshed_db, tmp_path):
    path = tmp_path / "broken.sql"
    path.write_text("-- Severity: warn\nSELECT no_such_column FROM daily_aggregations\n")
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        result = run_test(conn, parse_test(path))
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is usable afterwards
    check = data_test_result(result)
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert 'column "no_such_column" does not exist' in check.description
    assert check.description.startswith("broken could not run: ")


def test_a_test_cannot_write(refreshed_db, tmp_path):
    path = tmp_path / "writes.sql"
    path.write_text("DELETE FROM payments RETURNING *\n")
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM payments").fetchone()[0]
        result = run_test(conn, parse_test(path))
        assert conn.execute("SELECT count(*) FROM payments").fetchone()[0] == before > 0
    assert "read-only transaction" in result.error


@pytest.mark.parametrize(
    ("stem", "name"),
    [("revenue_matches", "revenue_matches"), ("no-gaps", "no_gaps"), ("umsätze ok", "ums_tze_ok"), ("1st", "test_1st")],
)
def test_file_stems_become_valid_check_names(stem, name):
    assert check_name(stem) == name


def test_header_errors_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "bad.sql").write_text("-- Severity: fatal\nSELECT 1 WHERE false\n")
    with pytest.raises(ValueError, match=r"bad\.sql: severity 'fatal' is not one of error, warn$"):
        load_tests(tmp_path)
    (tmp_path / "bad.sql").write_text("SELECT 1; SELECT 2\n")
    with pytest.raises(ValueError, match=r"bad\.sql: a data test holds exactly one SELECT"):
        load_tests(tmp_path)
    (tmp_path / "bad.sql").write_text("SELECT 1 WHERE false\n")
    (tmp_path / "unique_index.sql").write_text("SELECT 1 WHERE false\n")
    with pytest.raises(ValueError, match=r"'unique_index' is the name of a built-in check"):
        load_tests(tmp_path, reserved=("unique_index", *STATIC_CHECKS))


def test_markdown_table_escapes_pipes_and_shows_nulls():
    assert markdown_table(("a", "b"), (("x|y", None),)) == "| a | b |\n|---|---|\n| x\\|y | NULL |"


def test_discovered_views_run_their_data_tests_and_report_the_sql_checks(product_db, tmp_path, monkeypatch):
    (tmp_path / "defs.yaml").write_text(
        "type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [product]\n  data_tests: tests\n"
    )
    tests = tmp_path / "tests" / "product.campaign_stats"
    tests.mkdir(parents=True)
    (tests / "signups_positive.sql").write_text(
        "-- Every campaign has signups.\n-- Severity: error\nSELECT campaign_id FROM product.campaign_stats WHERE signups <= 0\n"
    )
    (tests / "no_organic.sql").write_text(
        "-- Organic users are left out.\n-- Severity: warn\nSELECT campaign_id, signups FROM product.campaign_stats "
        "WHERE campaign_id IS NULL\n"
    )
    monkeypatch.setenv(DEFS_ENV, str(tmp_path / "defs.yaml"))
    monkeypatch.setenv("DATABASE_URL", product_db)
    discover_views()
    defs = load_definitions()

    result = defs.resolve_job_def("daily_refresh_job").execute_in_process(raise_on_error=False)

    assert result.success  # WARN checks fail without failing the run
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert checks[("product/campaign_stats", "signups_positive")].passed
    organic = checks[("product/campaign_stats", "no_organic")]
    assert (organic.passed, organic.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert organic.metadata["analytics_views/failing_rows"].value == 1
    assert "| campaign_id | signups |\n|---|---|\n| NULL | 30 |" == organic.metadata["analytics_views/failing_sample"].value
    assert {key for key, e in checks.items() if not e.passed} == {("product/campaign_stats", "no_organic")}
    # The SQL checks follow the definitions: their own job (definition_checks.py).
    definition = defs.resolve_job_def("definition_checks_job").execute_in_process(raise_on_error=False)
    assert definition.success
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in definition.get_asset_check_evaluations()}
    failing = {key for key, e in checks.items() if not e.passed}
    assert failing == {
        ("product/campaign_stats", "unique_key_not_null"),
        ("product/cohort_stats", "no_join_fanout"),
        ("product/daily_activity", "timezone_independent"),
    }
    fanout = checks[("product/cohort_stats", "no_join_fanout")]
    assert fanout.severity == dg.AssetCheckSeverity.WARN
    assert "sum(r.revenue)" in fanout.description and "user_days AS d" in fanout.description
    assert checks[("product/campaign_stats", "unique_key_not_null")].metadata["analytics_views/null_key_rows"].value == 1
