"""Column lineage derived from each view's SQL, checked by hand on a few columns of every view."""

import pytest

from analytics_views.sql_files.lineage import column_lineage
from analytics_views.sql_files.source_tables import lineage_schema, load_source_tables
from analytics_views.sql_files.views import load_views

VIEWS = {view.name: view for view in load_views()}


def lineage(view: str) -> dict[str, tuple[tuple[str, str], ...]]:
    return dict(VIEWS[view].column_lineage)


def test_daily_aggregations_columns_come_from_events_users_and_payments():
    columns = lineage("daily_aggregations")
    # count(*) over the (UTC day of occurred_at, user_id) pairs, in each half (UNION ALL) of the window
    assert columns["active_users"] == (("events", "occurred_at"), ("events", "user_id"))
    assert columns["new_users"] == (("users", "signed_up_at"),)  # count(*) per signup day
    assert columns["revenue"] == (("payments", "amount"),)
    assert columns["arpdau"] == (  # revenue / active_users
        ("events", "occurred_at"),
        ("events", "user_id"),
        ("payments", "amount"),
    )
    assert columns["day"] == ()  # the calendar comes from generate_series and now(), not a table


def test_cohort_aggregations_retention_comes_from_signups_and_events():
    columns = lineage("cohort_aggregations")
    assert columns["cohort_size"] == (("users", "signed_up_at"),)
    # EXISTS (an event of the user on day N): the user's events and the cohort's users.
    assert columns["d7_retained_users"] == (
        ("events", "occurred_at"),
        ("events", "user_id"),
        ("users", "signed_up_at"),
        ("users", "user_id"),
    )
    assert columns["revenue_to_date"] == (("payments", "amount"),)
    assert columns["ltv_per_user"] == (("payments", "amount"), ("users", "signed_up_at"))


def test_campaign_aggregations_money_columns_come_from_spend_and_payments():
    columns = lineage("campaign_aggregations")
    assert columns["campaign_name"] == (("campaigns", "name"),)  # renamed, still traced
    assert columns["spend"] == (("campaign_spend", "amount"),)
    assert columns["roi"] == (("campaign_spend", "amount"), ("payments", "amount"))
    assert columns["cac"] == (("campaign_spend", "amount"), ("users", "campaign_id"))  # spend / signups


def test_weekly_aggregations_counts_follow_the_lateral_grouped_subquery():
    columns = lineage("weekly_aggregations")
    # count(*) of a week's users, in a LATERAL subquery: the users' key its grouped subquery counts (the
    # week only picks which events are read, so it is a filter, not lineage).
    assert columns["weekly_active_users"] == (("events", "user_id"),)
    assert columns["wow_retention"] == (("events", "user_id"),)
    assert columns["revenue"] == (("payments", "amount"),)
    assert columns["week_start"] == ()


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_every_output_column_has_lineage_into_known_tables_and_columns(view):
    tables = {table.name: {column.name for column in table.columns} for table in load_source_tables().values()}
    assert list(lineage(view)) == [column.name for column in VIEWS[view].columns]
    for column, deps in lineage(view).items():
        for table, name in deps:
            assert name in tables[table], f"{view}.{column} <- {table}.{name} is not a column of the migrations"


def test_a_view_reading_another_view_and_unqualified_columns_are_traced():
    schema = {**lineage_schema(load_source_tables()), "daily_aggregations": {"day": "date", "revenue": "numeric"}}
    query = (
        "SELECT d.day, sum(d.revenue) OVER (ORDER BY d.day) AS running_revenue, "
        "(SELECT max(amount) FROM payments) AS largest_payment "
        "FROM daily_aggregations AS d"
    )
    assert column_lineage(query, schema) == {
        "day": (("daily_aggregations", "day"),),
        "running_revenue": (("daily_aggregations", "day"), ("daily_aggregations", "revenue")),
        "largest_payment": (("payments", "amount"),),
    }
