"""The numbers of each materialized view in sql/views/, proven on tiny hand-made fixtures.

Every timestamp is placed relative to the start of today (UTC) or of the current ISO week (UTC),
so the expected numbers below are literals computed by hand. "D-n" is the UTC day n days before
today; "W-n" is the ISO week n weeks before the current one.
"""

import datetime
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

SOURCE_TABLES = ("events", "payments", "campaign_spend", "users", "campaigns")
NON_UTC_TIMEZONES = ("Pacific/Kiritimati", "America/Adak")

# An instant given as an offset from today's 00:00 UTC, e.g. '-3 days +10:00'.
DAY_OFFSET = "(date_trunc('day', now() AT TIME ZONE 'UTC') + %s::interval) AT TIME ZONE 'UTC'"
# An instant given as an offset from this week's Monday 00:00 UTC, e.g. '-52 weeks +2 days +10:00'.
WEEK_OFFSET = "(date_trunc('week', now() AT TIME ZONE 'UTC') + %s::interval) AT TIME ZONE 'UTC'"
# A UTC calendar day given as a number of days before today (UTC).
DAYS_AGO = "(now() AT TIME ZONE 'UTC')::date - %s"


def _load(conn, offset_sql, campaigns, spend, users, events, payments):
    """Replace the source tables' rows with a fixture; instants are offsets rendered by offset_sql."""
    conn.execute(
        sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
            sql.SQL(", ").join(sql.Identifier(table) for table in SOURCE_TABLES)
        )
    )
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO campaigns (campaign_id, name, channel, started_on) VALUES (%s, %s, %s, {DAYS_AGO})",
            campaigns,
        )
        cur.executemany(
            f"INSERT INTO campaign_spend (campaign_id, spend_date, amount) VALUES (%s, {DAYS_AGO}, %s)",
            spend,
        )
        cur.executemany(
            "INSERT INTO users (user_id, signed_up_at, campaign_id, country, plan)"
            f" VALUES (%s, {offset_sql}, %s, %s, %s)",
            users,
        )
        cur.executemany(
            f"INSERT INTO events (user_id, event_type, occurred_at) VALUES (%s, %s, {offset_sql})",
            events,
        )
        cur.executemany(
            f"INSERT INTO payments (user_id, amount, paid_at) VALUES (%s, %s, {offset_sql})",
            payments,
        )


def load_day_fixture(conn):
    """Users, events, payments and two campaigns around the last 90 UTC days (see the comments)."""
    _load(
        conn,
        DAY_OFFSET,
        campaigns=[
            (1, "Spring search", "search", 60),
            (2, "Referral pilot", "referral", 200),  # never spends: its ratios divide by zero
        ],
        spend=[
            (1, 100, Decimal("500.00")),  # before the 90-day window
            (1, 10, Decimal("30.00")),
            (1, 5, Decimal("20.00")),
        ],
        users=[
            (1, "-3 days +10:00", 1, "US", "pro"),
            (2, "-3 days +23:30", 1, "NZ", "free"),
            (3, "-10 days +08:00", None, "DE", "free"),
            (4, "-100 days +12:00", 1, "GB", "pro"),  # acquired by campaign 1 before the window
            (5, "-150 days +12:00", 2, "FR", "team"),
            (6, "-8 days +09:00", None, "US", "free"),
            (7, "-7 days +09:00", None, "US", "free"),
            (8, "-40 days +12:00", None, "BR", "free"),
        ],
        events=[
            # user 1: three events on D-3 (and a payment that day), back on D-2 and D-1.
            (1, "signup", "-3 days +10:00"),
            (1, "page_view", "-3 days +10:05"),
            (1, "page_view", "-3 days +10:10"),
            (1, "session_start", "-2 days +09:00"),
            (1, "session_start", "-1 days +08:00"),
            (1, "page_view", "-1 days +08:30"),
            # user 2: last event 30 s before UTC midnight, so it belongs to D-3 (it is D-2 in Kiritimati).
            (2, "signup", "-3 days +23:30"),
            (2, "page_view", "-3 days +23:59:30"),
            (2, "session_start", "-1 days +12:00"),
            # user 3: active on day 1 (D-9) and day 7 (D-3) after signup.
            (3, "signup", "-10 days +08:00"),
            (3, "session_start", "-9 days +07:00"),
            (3, "session_start", "-3 days +11:00"),
            # user 4: once in the window, once before it.
            (4, "session_start", "-120 days +10:00"),
            (4, "session_start", "-2 days +15:00"),
            # user 5: 10 s after UTC midnight, so it belongs to D-1 (it is D-2 in Adak).
            (5, "session_start", "-1 days +00:00:10"),
            # user 6: back on day 7 after signup (D-1), the last completed day.
            (6, "signup", "-8 days +09:00"),
            (6, "session_start", "-1 days +09:00"),
            # user 7: back on day 7 after signup, which is today: not completed, not counted.
            (7, "signup", "-7 days +09:00"),
            (7, "session_start", "+00:30"),
            # user 8: back on day 30 after signup (D-10).
            (8, "signup", "-40 days +12:00"),
            (8, "session_start", "-10 days +18:00"),
        ],
        payments=[
            (1, Decimal("9.99"), "-3 days +10:20"),
            (1, Decimal("20.00"), "-1 days +08:40"),
            (3, Decimal("5.00"), "-3 days +11:05"),
            (4, Decimal("100.00"), "-95 days +10:00"),  # before the window
            (4, Decimal("30.00"), "-2 days +15:10"),
            (5, Decimal("15.00"), "-2 days +18:00"),
        ],
    )


def load_week_fixture(conn):
    """Users, events and payments around the oldest and newest reported ISO weeks."""
    _load(
        conn,
        WEEK_OFFSET,
        campaigns=[],
        spend=[],
        users=[
            (1, "-54 weeks +10:00", None, "US", "free"),
            (2, "-53 weeks +09:00", None, "US", "free"),
            (3, "-52 weeks", None, "DE", "pro"),  # exactly on the oldest reported week's first instant
            (4, "-2 weeks +2 days +08:00", None, "FR", "pro"),
        ],
        events=[
            # W-53 is read only as the previous week of W-52: users 1 and 2 are active in it.
            (1, "session_start", "-53 weeks +1 days +10:00"),
            (2, "signup", "-53 weeks +09:00"),
            # W-52: users 1 (returning) and 3.
            (1, "session_start", "-52 weeks +2 days +10:00"),
            (3, "signup", "-52 weeks"),
            (3, "page_view", "-52 weeks +4 days +15:00"),
            # W-2: user 4 signs up. W-1: users 4 (returning) and 1, 30 s before the week ends in UTC.
            (4, "signup", "-2 weeks +2 days +08:00"),
            (4, "session_start", "-1 weeks +08:00"),
            (1, "session_start", "-1 days +23:59:30"),
            # The current week is still running: not reported.
            (4, "session_start", "+00:00:10"),
        ],
        payments=[
            (3, Decimal("10.00"), "-52 weeks +4 days +15:05"),
            (4, Decimal("25.00"), "-1 weeks +08:10"),
        ],
    )


def refresh_and_fetch(conn, view, key, timezone="UTC"):
    """Refresh a view in a session with the given TimeZone; return its rows as dicts by key."""
    conn.execute("SELECT set_config('TimeZone', %s, false)", (timezone,))
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.Identifier(view)))
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY {}").format(sql.Identifier(view), sql.Identifier(key)))
        return {row[key]: row for row in cur.fetchall()}


def utc_today(conn):
    return conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()[0]


def utc_week_start(conn):
    return conn.execute("SELECT date_trunc('week', now() AT TIME ZONE 'UTC')::date").fetchone()[0]


def days_ago(today, n):
    return today - datetime.timedelta(days=n)


@pytest.fixture
def day_fixture_db(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        load_day_fixture(conn)
        yield conn


@pytest.fixture
def week_fixture_db(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        load_week_fixture(conn)
        yield conn


def _daily(active_users, new_users, events, revenue, paying_users, arpdau):
    return {
        "active_users": active_users,
        "new_users": new_users,
        "events": events,
        "revenue": Decimal(revenue),
        "paying_users": paying_users,
        "arpdau": None if arpdau is None else Decimal(arpdau),
    }


def test_daily_aggregations_counts_users_events_and_revenue_per_utc_day(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "daily_aggregations", "day")
    expected = {
        40: _daily(1, 1, 1, "0.00", 0, "0.0000"),
        10: _daily(2, 1, 2, "0.00", 0, "0.0000"),
        9: _daily(1, 0, 1, "0.00", 0, "0.0000"),
        8: _daily(1, 1, 1, "0.00", 0, "0.0000"),
        7: _daily(1, 1, 1, "0.00", 0, "0.0000"),
        3: _daily(3, 2, 6, "14.99", 2, "4.9967"),
        2: _daily(2, 0, 2, "45.00", 2, "22.5000"),
        1: _daily(4, 0, 5, "20.00", 1, "5.0000"),
    }
    for n, values in expected.items():
        row = rows[days_ago(today, n)]
        assert {column: row[column] for column in values} == values, f"D-{n}"


def test_daily_aggregations_has_a_zero_row_for_every_day_of_the_90_complete_days(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "daily_aggregations", "day")
    assert sorted(rows) == [days_ago(today, n) for n in range(90, 0, -1)]
    assert rows[days_ago(today, 4)] == {"day": days_ago(today, 4), **_daily(0, 0, 0, "0.00", 0, None)}
    assert sum(row["events"] for row in rows.values()) == 19
    assert sum(row["new_users"] for row in rows.values()) == 6


def test_daily_revenue_is_not_multiplied_by_the_payers_events(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "daily_aggregations", "day")
    # User 1 paid 9.99 on D-3 with three events that day; joined to events it would read 34.97.
    assert rows[days_ago(today, 3)]["revenue"] == Decimal("14.99")
    # User 1 paid 20.00 on D-1 with two events that day; joined to events it would read 40.00.
    assert rows[days_ago(today, 1)]["revenue"] == Decimal("20.00")
    assert sum(row["revenue"] for row in rows.values()) == Decimal("79.99")


@pytest.mark.parametrize("timezone", NON_UTC_TIMEZONES)
@pytest.mark.parametrize(
    ("view", "key"),
    [
        ("daily_aggregations", "day"),
        ("cohort_aggregations", "cohort_day"),
        ("campaign_aggregations", "campaign_id"),
    ],
)
def test_day_views_bucket_in_utc_whatever_the_session_timezone(day_fixture_db, view, key, timezone):
    in_utc = refresh_and_fetch(day_fixture_db, view, key)
    assert refresh_and_fetch(day_fixture_db, view, key, timezone) == in_utc


@pytest.mark.parametrize("timezone", NON_UTC_TIMEZONES)
def test_event_just_before_utc_midnight_counts_on_its_utc_day(day_fixture_db, timezone):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "daily_aggregations", "day", timezone)
    # User 2's event at D-3 23:59:30 UTC is on D-2 in Kiritimati;
    # user 5's at D-1 00:00:10 UTC is on D-2 in Adak.
    assert rows[days_ago(today, 3)]["events"] == 6
    assert rows[days_ago(today, 3)]["active_users"] == 3
    assert rows[days_ago(today, 2)]["active_users"] == 2
    assert rows[days_ago(today, 1)]["active_users"] == 4


def _cohort(size, d1, d1_rate, d7, d7_rate, d30, d30_rate, revenue, ltv):
    def rate(value):
        return None if value is None else Decimal(value)

    return {
        "cohort_size": size,
        "d1_retained_users": d1,
        "d1_retention": rate(d1_rate),
        "d7_retained_users": d7,
        "d7_retention": rate(d7_rate),
        "d30_retained_users": d30,
        "d30_retention": rate(d30_rate),
        "revenue_to_date": Decimal(revenue),
        "ltv_per_user": rate(ltv),
    }


def test_cohort_aggregations_retention_and_revenue_to_date(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "cohort_aggregations", "cohort_day")
    assert sorted(rows) == [days_ago(today, n) for n in range(90, 0, -1)]
    expected = {
        40: _cohort(1, 0, "0.0000", 0, "0.0000", 1, "1.0000", "0.00", "0.0000"),
        10: _cohort(1, 1, "1.0000", 1, "1.0000", None, None, "5.00", "5.0000"),
        8: _cohort(1, 0, "0.0000", 1, "1.0000", None, None, "0.00", "0.0000"),
        7: _cohort(1, 0, "0.0000", None, None, None, None, "0.00", "0.0000"),
        # Users 1 and 2: only user 1 came back on D-2; user 1 paid 9.99 + 20.00.
        3: _cohort(2, 1, "0.5000", None, None, None, None, "29.99", "14.9950"),
    }
    for n, values in expected.items():
        row = rows[days_ago(today, n)]
        assert {column: row[column] for column in values} == values, f"cohort D-{n}"


def test_cohort_retention_is_null_until_day_n_completes(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "cohort_aggregations", "cohort_day")
    # Cohort D-7's day 7 is today: user 7 is already back, but the day has not completed.
    assert rows[days_ago(today, 7)]["d7_retained_users"] is None
    assert rows[days_ago(today, 7)]["d7_retention"] is None
    # Cohort D-1's day 1 is today.
    assert rows[days_ago(today, 1)]["d1_retained_users"] is None
    assert rows[days_ago(today, 1)]["d1_retention"] is None
    # Cohort D-30's day 30 is today; cohort D-31's day 30 (D-1) has completed.
    assert rows[days_ago(today, 30)]["d30_retained_users"] is None
    assert rows[days_ago(today, 31)]["d30_retained_users"] == 0


def test_empty_cohort_has_zero_counts_and_null_rates(day_fixture_db):
    today = utc_today(day_fixture_db)
    rows = refresh_and_fetch(day_fixture_db, "cohort_aggregations", "cohort_day")
    assert rows[days_ago(today, 4)] == {
        "cohort_day": days_ago(today, 4),
        **_cohort(0, 0, None, None, None, None, None, "0.00", None),
    }


def test_campaign_aggregations_spend_revenue_roi_roas_cac(day_fixture_db):
    rows = refresh_and_fetch(day_fixture_db, "campaign_aggregations", "campaign_id")
    assert sorted(rows) == [1, 2]
    campaign = rows[1]
    # Signups: users 1 and 2 (user 4 signed up before the window). Spend: 30.00 + 20.00 (500.00 is older).
    # Revenue: user 1's 9.99 + 20.00 and user 4's 30.00 (user 4's 100.00 is older).
    assert {column: campaign[column] for column in ("signups", "spend", "revenue", "roi", "roas", "cac")} == {
        "signups": 2,
        "spend": Decimal("50.00"),
        "revenue": Decimal("59.99"),
        "roi": Decimal("0.1998"),
        "roas": Decimal("1.1998"),
        "cac": Decimal("25.00"),
    }


def test_campaign_without_spend_or_signups_has_null_ratios(day_fixture_db):
    rows = refresh_and_fetch(day_fixture_db, "campaign_aggregations", "campaign_id")
    campaign = rows[2]
    assert {column: campaign[column] for column in ("signups", "spend", "revenue", "roi", "roas", "cac")} == {
        "signups": 0,
        "spend": Decimal("0.00"),
        "revenue": Decimal("15.00"),
        "roi": None,
        "roas": None,
        "cac": None,
    }


def _weekly(active, new_users, events, revenue, wow):
    return {
        "weekly_active_users": active,
        "new_users": new_users,
        "events": events,
        "revenue": Decimal(revenue),
        "wow_retention": None if wow is None else Decimal(wow),
    }


def test_weekly_aggregations_wau_revenue_and_wow_retention(week_fixture_db):
    week_start = utc_week_start(week_fixture_db)
    rows = refresh_and_fetch(week_fixture_db, "weekly_aggregations", "week_start")
    expected = {
        # W-52: users 1 and 3 active, 1 of W-53's 2 active users came back; user 3 paid 10.00 with 2 events.
        52: _weekly(2, 1, 3, "10.00", "0.5000"),
        51: _weekly(0, 0, 0, "0.00", "0.0000"),
        # Nobody was active in the previous week: no rate.
        50: _weekly(0, 0, 0, "0.00", None),
        2: _weekly(1, 1, 1, "0.00", None),
        1: _weekly(2, 0, 2, "25.00", "1.0000"),
    }
    for n, values in expected.items():
        row = rows[week_start - datetime.timedelta(weeks=n)]
        assert {column: row[column] for column in values} == values, f"W-{n}"


def test_weekly_window_is_52_full_weeks_before_the_current_week(week_fixture_db):
    week_start = utc_week_start(week_fixture_db)
    rows = refresh_and_fetch(week_fixture_db, "weekly_aggregations", "week_start")
    weeks = sorted(rows)
    assert len(weeks) == 52
    assert weeks[0] == week_start - datetime.timedelta(weeks=52)
    assert weeks[0].isoweekday() == 1
    assert weeks[-1] == week_start - datetime.timedelta(weeks=1)
    assert all(week.isoweekday() == 1 for week in weeks)


@pytest.mark.parametrize("timezone", NON_UTC_TIMEZONES)
def test_weekly_view_buckets_in_utc_whatever_the_session_timezone(week_fixture_db, timezone):
    in_utc = refresh_and_fetch(week_fixture_db, "weekly_aggregations", "week_start")
    assert refresh_and_fetch(week_fixture_db, "weekly_aggregations", "week_start", timezone) == in_utc
    # User 1's event 30 s before the current week starts (UTC) stays in W-1.
    assert in_utc[utc_week_start(week_fixture_db) - datetime.timedelta(weeks=1)]["weekly_active_users"] == 2


@pytest.mark.parametrize(
    ("view", "key"),
    [
        ("daily_aggregations", "day"),
        ("cohort_aggregations", "cohort_day"),
        ("campaign_aggregations", "campaign_id"),
        ("weekly_aggregations", "week_start"),
    ],
)
def test_concurrent_refresh_keeps_the_same_rows(day_fixture_db, view, key):
    plain = refresh_and_fetch(day_fixture_db, view, key)
    day_fixture_db.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.Identifier(view)))
    with day_fixture_db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(view)))
        concurrent = {row[key]: row for row in cur.fetchall()}
    assert concurrent == plain
    assert None not in concurrent
