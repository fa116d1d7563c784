"""The static checks (sql_checks.py) on a schema unlike ours (fixtures/game_schema.sql, issue 25): varchar, char and
domain keys that PostgreSQL stores with casts, a key built by COALESCE over a FULL JOIN, a materialized view read by
another, events partitioned by week, a unique index narrower than its view's GROUP BY. Each view is made in the
test and analysed from its pg_get_viewdef, as a refresh does; each pattern has cases that must be reported and
cases that must not."""

from pathlib import Path

import psycopg
import pytest

from analytics_views.sql_files import sql_checks
from analytics_views.sql_files.sql_checks import FANOUT_CHECK, GROUPING_CHECK, NULL_KEY_CHECK, TIMEZONE_CHECK
from analytics_views_tests.sql_files.test_sql_checks import analyse, fanout_outcome, outcomes

GAME_SCHEMA = Path(__file__).parents[1] / "fixtures" / "game_schema.sql"

# Per player and day, with play or purchases (guests' purchases included: user_id NULL).
PLAYED_PAID = (
    "WITH played AS (SELECT e.user_id, (e.created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS events "
    "FROM game.events AS e GROUP BY e.user_id, 2), "
    "paid AS (SELECT sp.user_id, (sp.purchased_at AT TIME ZONE 'UTC')::date AS day, sum(sp.amount) AS amount "
    "FROM game.store_purchases AS sp {paid_filter} GROUP BY sp.user_id, 2) "
)
DAY = "(e.created_at AT TIME ZONE 'UTC')::date"


@pytest.fixture(autouse=True)
def analysis_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_checks, "CACHE_DIR", tmp_path / "cache")


@pytest.fixture
def conn(empty_db):
    with psycopg.connect(empty_db, autocommit=True) as connection:
        connection.execute(GAME_SCHEMA.read_text())
        yield connection


# (query, aggregates named, the join named, why, joins that must not be named)
FANOUTS = [
    (  # the real fan-out beside two innocent lookups on varchar keys (a domain's primary key, a view's GROUP BY)
        "SELECT a.campaign, sum(a.cost) AS cost, sum(r.revenue) AS revenue FROM game.acquisitions AS a "
        "JOIN game.players AS p ON p.user_id = a.user_id LEFT JOIN game.user_revenue AS r ON r.user_id = a.user_id "
        "JOIN game.events AS e ON e.user_id = a.user_id GROUP BY a.campaign",
        ["sum(a.cost)", "sum(r.revenue)"],
        "game.events AS e",
        "game.events AS e is not unique on (user_id): no primary key, unique index, GROUP BY or DISTINCT makes it unique",
        ["game.players AS p", "game.user_revenue AS r"],
    ),
    (  # a cast that truncates is not seen through: L1, L2 and L3 are all 'L'
        "SELECT e.user_id, sum(e.revenue) AS revenue FROM game.events AS e "
        "JOIN game.levels AS l ON l.level_id::varchar(1) = left(e.level_id, 1) GROUP BY e.user_id",
        ["sum(e.revenue)"],
        "game.levels AS l",
        "game.levels AS l is joined on CAST(l.level_id AS VARCHAR(1)), a cast that can make distinct values equal, so "
        "several of its rows can match each row before it",
        [],
    ),
]


@pytest.mark.parametrize(("query", "aggregates", "join", "reason", "innocent"), FANOUTS)
def test_fanout_on_varchar_keys_names_only_the_join_that_repeats_rows(conn, query, aggregates, join, reason, innocent):
    outcome = fanout_outcome(analyse(conn, query))
    assert [f.expression for f in outcome.findings] == aggregates
    assert outcome.description.count("the join to ") == len(aggregates)
    assert all(f"the join to {join} ON" in f.problem and f"({reason})" in f.problem for f in outcome.findings)
    assert not [name for name in innocent if f"the join to {name}" in outcome.description]


# (query, the cast pg_get_viewdef writes around the key)
LOOKUPS_ON_CAST_KEYS = [
    (  # issue 25: acquisitions joined to a one-row-per-user subquery on a unique varchar key
        "SELECT a.campaign, sum(a.cost) AS cost, sum(r.revenue) AS revenue FROM game.acquisitions AS a "
        "LEFT JOIN (SELECT e.user_id, sum(e.revenue) AS revenue FROM game.events AS e GROUP BY e.user_id) AS r "
        "ON r.user_id = a.user_id GROUP BY a.campaign",
        "((r.user_id)::text = (a.user_id)::text)",
    ),
    (  # a primary key whose type is a domain over varchar
        "SELECT p.country, sum(a.cost) AS cost FROM game.acquisitions AS a "
        "JOIN game.players AS p ON p.user_id = a.user_id GROUP BY p.country",
        "((p.user_id)::text = (a.user_id)::text)",
    ),
    (  # a char(2) primary key compared with a varchar column
        "SELECT c.region, sum(a.cost) AS cost FROM game.acquisitions AS a "
        "JOIN game.countries AS c ON c.country = a.country GROUP BY c.region",
        "(c.country = (a.country)::bpchar)",
    ),
    (  # a materialized view read by another, unique on its GROUP BY key
        "SELECT a.campaign, sum(a.cost) AS cost, sum(r.revenue) AS revenue FROM game.acquisitions AS a "
        "LEFT JOIN game.user_revenue AS r ON r.user_id = a.user_id GROUP BY a.campaign",
        "((r.user_id)::text = (a.user_id)::text)",
    ),
]


@pytest.mark.parametrize(("query", "stored"), LOOKUPS_ON_CAST_KEYS)
def test_lookup_on_a_unique_key_behind_postgres_casts_is_not_a_fanout(conn, query, stored):
    analysis = analyse(conn, query)
    assert stored in sql_checks.view_query(conn, "v")  # the shape the check reads
    outcome = fanout_outcome(analysis)
    assert (outcome.passed, outcome.findings) == (True, ())


def _with_key(conn: psycopg.Connection, query: str, key: str) -> dict[str, sql_checks.CheckOutcome]:
    analyse(conn, query)
    conn.execute(f"CREATE UNIQUE INDEX v_key ON v ({key})")
    return outcomes(conn, "v")


FULL_JOIN = "SELECT coalesce(pl.user_id, pa.user_id) AS user_id, coalesce(pl.day, pa.day) AS day FROM played AS pl "
ON_USER_DAY = "ON pa.user_id = pl.user_id AND pa.day = pl.day "

# (query, rows with a NULL user_id): the SQL cannot prove user_id NOT NULL
NULLABLE_COALESCE_KEYS = [
    # guests' purchases: the paid side of the FULL JOIN has a NULL user_id
    (PLAYED_PAID.format(paid_filter="") + FULL_JOIN + "FULL JOIN paid AS pa " + ON_USER_DAY, 1),
    # a WHERE on another expression proves nothing of the key
    (PLAYED_PAID.format(paid_filter="") + FULL_JOIN + "FULL JOIN paid AS pa " + ON_USER_DAY
     + "WHERE pl.user_id IS NOT NULL OR pa.amount > 0", 1),
    # over a LEFT JOIN, the preserved side is the only one in an unmatched row, and guests' user_id is NULL
    (PLAYED_PAID.format(paid_filter="") + "SELECT coalesce(pa.user_id, pl.user_id) AS user_id, pa.day FROM paid AS pa "
     "LEFT JOIN played AS pl " + ON_USER_DAY, 1),
]


@pytest.mark.parametrize(("query", "null_rows"), NULLABLE_COALESCE_KEYS)
def test_coalesce_key_over_a_nullable_side_is_reported(conn, query, null_rows):
    outcome = _with_key(conn, query, "user_id, day")[NULL_KEY_CHECK]
    assert not outcome.passed
    assert (outcome.metadata["nullable_columns"], outcome.metadata["null_key_rows"]) == (["user_id"], null_rows)
    assert "user_id can be NULL per the view's SQL" in outcome.description


NOT_NULL_COALESCE_KEYS = [
    # each side of the FULL JOIN non-NULL: whichever is missing, the other is there
    PLAYED_PAID.format(paid_filter="WHERE sp.user_id IS NOT NULL") + FULL_JOIN + "FULL JOIN paid AS pa " + ON_USER_DAY,
    # a nullable side, and a WHERE on the same expression
    PLAYED_PAID.format(paid_filter="") + FULL_JOIN + "FULL JOIN paid AS pa " + ON_USER_DAY
    + "WHERE coalesce(pl.user_id, pa.user_id) IS NOT NULL AND coalesce(pl.day, pa.day) IS NOT NULL",
    # three relations FULL JOINed: one of them is always there
    PLAYED_PAID.format(paid_filter="WHERE sp.user_id IS NOT NULL")
    + "SELECT coalesce(pl.user_id, pa.user_id, r.user_id) AS user_id, coalesce(pl.day, pa.day, DATE '2026-01-01') AS day "
    "FROM played AS pl FULL JOIN paid AS pa " + ON_USER_DAY + "FULL JOIN game.user_revenue AS r ON r.user_id = pl.user_id",
]


@pytest.mark.parametrize("query", NOT_NULL_COALESCE_KEYS)
def test_coalesce_key_over_the_sides_of_a_full_join_passes(conn, query):
    analyse(conn, query)
    assert "FULL JOIN" in sql_checks.view_query(conn, "v")
    outcome = _with_key(conn, query, "user_id, day")[NULL_KEY_CHECK]
    assert outcome.passed, outcome.description
    assert outcome.metadata == {"key_columns": ["user_id", "day"], "nullable_columns": [], "unproven_columns": [],
                                "null_key_rows": 0}


LEVEL_ZONE = f"SELECT {DAY} AS day, e.level_id, e.zone_id, count(*) AS events FROM game.events AS e "

# (query, unique index, expressions named, the grouping, the index that would cover it)
NARROW_INDEXES = [
    (LEVEL_ZONE + "GROUP BY 1, e.level_id, e.zone_id", "day, level_id", ["e.zone_id"],
     ["day", "level_id", "zone_id"], "(day, level_id, zone_id)"),
    ("SELECT DISTINCT e.level_id, e.zone_id FROM game.events AS e", "level_id", ["e.zone_id"],
     ["level_id", "zone_id"], "(level_id, zone_id)"),
    # a join on a key that is not unique determines nothing (each player bought on one level so far)
    ("SELECT a.user_id, e.level_id, count(*) AS events FROM game.acquisitions AS a "
     "JOIN game.events AS e ON e.user_id = a.user_id WHERE e.kind = 'purchase' GROUP BY a.user_id, e.level_id",
     "user_id", ["e.level_id"],
     ["user_id", "level_id"], "(user_id, level_id)"),
    # grouped by an expression the view does not select: no index can hold it (one player per level so far)
    ("SELECT e.level_id, count(*) AS events FROM game.events AS e WHERE e.kind = 'play' GROUP BY e.level_id, e.user_id",
     "level_id",
     ["e.user_id"], ["level_id", "e.user_id"], None),
]


@pytest.mark.parametrize(("query", "index", "named", "grouping", "covering"), NARROW_INDEXES)
def test_unique_index_narrower_than_the_grouping_is_named_with_the_fix(conn, query, index, named, grouping, covering):
    outcome = _with_key(conn, query, index)[GROUPING_CHECK]
    assert not outcome.passed
    assert outcome.metadata == {"key_columns": index.split(", "), "grouping": grouping, "uncovered": named}
    assert f"the unique index ({index}) of v is narrower than its grouping ({', '.join(grouping)})" in outcome.description
    if covering:
        assert f"fix: CREATE UNIQUE INDEX ON v {covering}, then drop the narrower index" in outcome.description
    else:
        assert f"select {named[0]} as a column and add it to the unique index" in outcome.description


# (query, unique index)
COVERING_INDEXES = [
    # the rewrite: zone_id in the index, and never NULL
    (f"SELECT {DAY} AS day, e.level_id, coalesce(e.zone_id, '-') AS zone_id, count(*) AS events FROM game.events AS e "
     "GROUP BY 1, e.level_id, 3", "day, level_id, zone_id"),
    # world follows level_id through the levels' primary key
    (f"SELECT {DAY} AS day, e.level_id, l.world, count(*) AS events FROM game.events AS e "
     "JOIN game.levels AS l ON l.level_id = e.level_id GROUP BY 1, e.level_id, l.world", "day, level_id"),
    # the week is a function of the day
    (f"SELECT {DAY} AS day, date_trunc('week', {DAY})::date AS week, count(*) AS events FROM game.events AS e "
     "GROUP BY 1, 2", "day"),
    # kind is the constant the WHERE sets
    (f"SELECT {DAY} AS day, e.kind, count(*) AS events FROM game.events AS e WHERE e.kind = 'purchase' "
     "GROUP BY 1, e.kind", "day"),
    # revenue follows user_id through the GROUP BY of the view it reads
    ("SELECT r.user_id, r.revenue, count(*) AS events FROM game.user_revenue AS r "
     "JOIN game.events AS e ON e.user_id = r.user_id GROUP BY r.user_id, r.revenue", "user_id"),
    # a domain's primary key behind a cast: country follows user_id
    ("SELECT a.user_id, p.country, sum(a.cost) AS cost FROM game.acquisitions AS a "
     "JOIN game.players AS p ON p.user_id = a.user_id GROUP BY a.user_id, p.country", "user_id"),
]


@pytest.mark.parametrize(("query", "index"), COVERING_INDEXES)
def test_unique_index_that_holds_or_determines_the_grouping_passes(conn, query, index):
    outcome = _with_key(conn, query, index)[GROUPING_CHECK]
    assert outcome.passed, outcome.description
    assert (outcome.findings, outcome.metadata["uncovered"]) == ((), [])
    assert outcome.description.startswith(f"the unique index ({index}) of v covers its grouping (")


def test_view_without_grouping_has_nothing_to_compare(conn):
    outcome = _with_key(conn, "SELECT p.user_id, p.country FROM game.players AS p", "user_id")[GROUPING_CHECK]
    assert (outcome.passed, outcome.metadata["grouping"]) == (True, [])
    assert outcome.description == "v has no GROUP BY or DISTINCT to compare its unique index (user_id) with"


def test_game_views_report_the_fanout_and_the_narrow_index_and_nothing_else(conn):
    views = ("user_revenue", "campaign_revenue", "campaign_revenue_per_event", "player_days", "level_zone_daily")
    found = {view: outcomes(conn, view, "game") for view in views}

    failing = {(view, name) for view, checks in found.items() for name, o in checks.items() if not o.passed}
    assert failing == {("campaign_revenue_per_event", FANOUT_CHECK), ("level_zone_daily", GROUPING_CHECK)}
    assert all(o.undecided == () for checks in found.values() for o in checks.values())
    assert set(found["player_days"]) == {TIMEZONE_CHECK, NULL_KEY_CHECK, FANOUT_CHECK, GROUPING_CHECK}

    fanout = found["campaign_revenue_per_event"][FANOUT_CHECK]
    assert fanout.metadata["aggregates"] == ["sum(a.cost)", "sum(r.revenue)"]
    assert "the join to game.events AS e ON (CAST(e.user_id AS TEXT) = CAST(a.user_id AS TEXT))" in fanout.description
    assert "game.players AS p ON" not in fanout.description and "game.user_revenue AS r ON" not in fanout.description

    narrow = found["level_zone_daily"][GROUPING_CHECK]
    assert narrow.metadata["uncovered"] == ["e.zone_id"]
    assert "coalesce(e.zone_id, <a value no row has>) AS zone_id" in narrow.description
    assert "CREATE UNIQUE INDEX ON game.level_zone_daily (day, level_id, zone_id)" in narrow.description

    # what the check foresaw: one more zone for a level on a day, and the refresh fails
    conn.execute("INSERT INTO game.events (user_id, level_id, zone_id, kind, created_at) "
                 "VALUES ('u-3', 'L1', 'z9', 'play', '2026-01-05 12:00+00')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("REFRESH MATERIALIZED VIEW game.level_zone_daily")
