"""The view definitions Python derives from sql/views/: names, headers, cadence and lineage."""

import pytest

from analytics_views.sql_files.views import load_views, parse_view_file, query_dependencies, source_tables

FOUR_VIEWS = {"daily_aggregations", "cohort_aggregations", "campaign_aggregations", "weekly_aggregations"}


def test_the_four_views_are_defined_with_their_cadence():
    cadences = {view.name: view.cadence for view in load_views()}
    assert FOUR_VIEWS <= set(cadences)
    assert {name: cadences[name] for name in FOUR_VIEWS} == {
        "daily_aggregations": "daily",
        "cohort_aggregations": "daily",
        "campaign_aggregations": "daily",
        "weekly_aggregations": "weekly",
    }


def test_every_view_states_what_it_answers_and_its_grain():
    for view in load_views():
        assert view.summary and not view.summary.lower().startswith("grain")
        assert view.grain.lower().startswith("one row per"), view.name


def test_lineage_is_read_from_the_sql():
    assert query_dependencies(
        "WITH recent AS (SELECT user_id FROM events e) "
        "SELECT * FROM recent JOIN public.users u USING (user_id), generate_series(1, 3) AS g(n), "
        "LATERAL (SELECT sum(amount) FROM payments p WHERE p.user_id = u.user_id) AS paid"
    ) == ("events", "payments", "users")
    sources = set(source_tables(load_views()))
    assert {"users", "events", "payments", "campaigns", "campaign_spend"} <= sources


def test_a_view_comes_after_the_views_it_reads():
    order = [view.name for view in load_views()]
    for view in load_views():
        for dep in view.deps:
            if dep in order:
                assert order.index(dep) < order.index(view.name)


def test_a_file_without_a_header_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "bare.sql"
    path.write_text("CREATE MATERIALIZED VIEW bare AS SELECT 1 AS one WITH NO DATA;\n")
    with pytest.raises(ValueError, match="bare.sql: starts without a header"):
        parse_view_file(path)


def write_view(tmp_path, statements: str):
    path = tmp_path / "tiny.sql"
    path.write_text(
        "-- How many users are there?\n-- Grain: one row\n-- Cadence: daily\n"
        "CREATE MATERIALIZED VIEW tiny AS SELECT count(*) AS users FROM users WITH NO DATA;\n" + statements
    )
    return path


def test_column_comments_become_column_descriptions(tmp_path):
    view = parse_view_file(write_view(tmp_path, "COMMENT ON COLUMN tiny.users IS 'Every user, ever.';\n"))
    assert [(c.name, c.description) for c in view.columns] == [("users", "Every user, ever.")]
    assert view.line == 4


def test_a_comment_on_a_missing_column_or_on_the_view_itself_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiny.sql: COMMENT ON COLUMN tiny.user_count names no column of tiny"):
        parse_view_file(write_view(tmp_path, "COMMENT ON COLUMN tiny.user_count IS 'typo';\n"))
    with pytest.raises(ValueError, match="the header comment is the view's description"):
        parse_view_file(write_view(tmp_path, "COMMENT ON MATERIALIZED VIEW tiny IS 'twice';\n"))


HEADER = "-- How many users per generated number.\n-- Grain: one row per n.\n-- Cadence: daily\n"


@pytest.mark.parametrize(
    ("query", "deps"),
    [
        # Valid PostgreSQL sqlglot cannot parse: PostgreSQL runs it.
        ("SELECT r.n, count(u.user_id) AS users FROM users AS u CROSS JOIN LATERAL ROWS FROM (generate_series(1, 2)) AS r (n) GROUP BY r.n", ("users",)),
        # A typo: PostgreSQL names it when migrate runs the file.
        ("SELEC 1 AS n FROM public.events", ("events",)),
        ("WITH recent AS (SELECT user_id FROM events) SELEC user_id FROM recent JOIN payments USING (user_id)", ("events", "payments")),
    ],
    ids=["rows-from", "typo", "typo-with-cte"],
)
def test_a_query_sqlglot_cannot_read_still_defines_its_view_saying_why(tmp_path, query, deps):
    path = tmp_path / "numbers.sql"
    path.write_text(f"{HEADER}CREATE MATERIALIZED VIEW numbers AS\n{query}\nWITH NO DATA;\n")
    view = parse_view_file(path)
    assert (view.name, view.deps, view.columns, dict(view.column_lineage)) == ("numbers", deps, (), {})
    assert view.unparsed.startswith("sqlglot cannot read the query of numbers.sql (")
