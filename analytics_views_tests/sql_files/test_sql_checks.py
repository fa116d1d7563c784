"""The static checks of a view's SQL (sql_checks.py): each pattern, its correct rewrite and the safe cases, on
tiny views made in the test; then the product schema another team wrote, and our own four views."""

import psycopg
import pytest

from analytics_views.postgres import database
from analytics_views.sql_files import sql_analysis, sql_checks
from analytics_views.sql_files.sql_checks import FANOUT_CHECK, GROUPING_CHECK, NULL_KEY_CHECK, TIMEZONE_CHECK
from analytics_views.orchestration.view_checks import STATIC_CHECKS

TABLES = """
CREATE TABLE t (id bigint PRIMARY KEY, at timestamptz NOT NULL, day date NOT NULL, grp int, amount numeric);
INSERT INTO t SELECT g, timestamptz '2024-03-01 00:00+00' + g * interval '7 hours', date '2024-03-01' + g,
                     CASE WHEN g % 5 = 0 THEN NULL ELSE g % 3 END, g FROM generate_series(1, 40) AS g;
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, shipping numeric NOT NULL);
CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, price numeric NOT NULL);
CREATE UNIQUE INDEX products_sku ON products (sku);
CREATE TABLE items (id bigint PRIMARY KEY, order_id bigint NOT NULL, product_id bigint NOT NULL, sku text NOT NULL,
                    qty int NOT NULL);
INSERT INTO orders VALUES (1, 'ann', 5), (2, 'bob', 7);
INSERT INTO products VALUES (1, 'a', 10), (2, 'b', 20);
INSERT INTO items VALUES (1, 1, 1, 'a', 1), (2, 1, 2, 'b', 2), (3, 2, 1, 'a', 3);
"""


@pytest.fixture(autouse=True)
def analysis_cache(tmp_path, monkeypatch):
    """Each test analyses afresh, in a cache of its own."""
    monkeypatch.setattr(sql_checks, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def conn(empty_db):
    with psycopg.connect(empty_db, autocommit=True) as connection:
        connection.execute(TABLES)
        yield connection


def analyse(conn: psycopg.Connection, query: str, name: str = "v") -> sql_analysis.QueryAnalysis:
    conn.execute(f"DROP MATERIALIZED VIEW IF EXISTS {name}")
    conn.execute(f"CREATE MATERIALIZED VIEW {name} AS {query}")
    return sql_analysis.QueryAnalysis(sql_checks.view_query(conn, name), sql_analysis.Catalog(conn))


def timezone_outcome(analysis: sql_analysis.QueryAnalysis) -> sql_checks.CheckOutcome:
    findings, undecided = sql_analysis.timezone_findings(analysis)
    return sql_checks.timezone_outcome(tuple(findings), tuple(undecided), "v")


def fanout_outcome(analysis: sql_analysis.QueryAnalysis) -> sql_checks.CheckOutcome:
    return sql_checks.fanout_outcome(tuple(sql_analysis.fanout_findings(analysis)), "v")


def outcomes(conn: psycopg.Connection, view: str, schema: str | None = None) -> dict[str, sql_checks.CheckOutcome]:
    state = database.view_state(conn, view, schema)
    label = f"{schema}.{view}" if schema else view
    return {o.name: o for o in sql_checks.static_checks(conn, view, schema, label, state.unique_index)}


def test_check_names_are_the_ones_the_assets_declare():
    assert set(STATIC_CHECKS) == {TIMEZONE_CHECK, NULL_KEY_CHECK, FANOUT_CHECK, GROUPING_CHECK}
    assert TIMEZONE_CHECK == "timezone_independent" and NULL_KEY_CHECK == "unique_key_not_null"
    assert FANOUT_CHECK == "no_join_fanout" and GROUPING_CHECK == "unique_key_covers_grouping"


# (bucket expression over t, expression the check names)
SESSION_TIME_ZONE = [
    ("date(t.at)", "date(t.at)"),
    ("t.at::date", "CAST(t.at AS DATE)"),
    ("CAST(t.at AS date)", "CAST(t.at AS DATE)"),
    ("date_trunc('day', t.at)", "date_trunc('day', t.at)"),
    ("to_char(t.at, 'YYYY-MM')", "to_char(t.at, 'YYYY-MM')"),
    ("extract(hour FROM t.at)", "EXTRACT(HOUR FROM t.at)"),
    ("date_part('dow', t.at)", "EXTRACT('dow' FROM t.at)"),
    ("t.at::time", "CAST(t.at AS TIME)"),
    ("t.at::timestamp", "CAST(t.at AS TIMESTAMP)"),
    ("t.day::timestamptz", "CAST(t.day AS TIMESTAMPTZ)"),
    ("current_date - t.day", "CURRENT_DATE"),
    ("localtimestamp - t.at::timestamp", "LOCALTIMESTAMP"),
    ("t.at + interval '1 day'", "t.at + CAST('1 day' AS INTERVAL)"),
    ("t.at >= t.day", "t.at >= t.day"),  # the date is converted to timestamptz in the session's zone
]


@pytest.mark.parametrize(("bucket", "named"), SESSION_TIME_ZONE)
def test_expression_following_the_session_time_zone_is_named_with_its_fix(conn, bucket, named):
    outcome = timezone_outcome(analyse(conn, f"SELECT {bucket} AS k, count(*) AS n FROM t GROUP BY 1"))
    assert not outcome.passed
    assert named in [f.expression for f in outcome.findings]
    assert "AT TIME ZONE 'UTC'" in outcome.description or "'UTC')" in outcome.description
    assert outcome.metadata["expressions"] == [f.expression for f in outcome.findings]


SAFE_TIME_ZONE = [
    "(t.at AT TIME ZONE 'UTC')::date",  # the rewrite of date(t.at) and t.at::date
    "date_trunc('day', t.at, 'UTC')",  # date_trunc's zone argument
    "date_trunc('day', t.at AT TIME ZONE 'UTC')",
    "to_char(t.at AT TIME ZONE 'UTC', 'YYYY-MM')",
    "extract(hour FROM t.at AT TIME ZONE 'UTC')",
    "extract(epoch FROM t.at)",  # seconds since 1970 UTC, whatever the zone
    "(now() AT TIME ZONE 'UTC')::date - t.day",  # the rewrite of current_date
    "t.day::timestamp AT TIME ZONE 'UTC'",  # the rewrite of t.day::timestamptz
    "date_trunc('week', t.day)::date",  # a whole date in and out
    "t.at + interval '6 hours'",
    "t.day + 1",
]


@pytest.mark.parametrize("bucket", SAFE_TIME_ZONE)
def test_expression_independent_of_the_session_time_zone_passes(conn, bucket):
    outcome = timezone_outcome(analyse(conn, f"SELECT {bucket} AS k, count(*) AS n FROM t GROUP BY 1"))
    assert (outcome.passed, outcome.findings, outcome.undecided) == (True, (), ())


def test_types_are_followed_through_ctes_and_subqueries(conn):
    flagged = analyse(
        conn,
        "WITH c AS (SELECT t.at AS moment FROM t) "
        "SELECT date(s.moment) AS k, count(*) AS n FROM (SELECT c.moment FROM c) AS s GROUP BY 1",
    )
    assert [f.expression for f in timezone_outcome(flagged).findings] == ["date(s.moment)"]
    # AT TIME ZONE in the CTE gives a timestamp without time zone: its date is the UTC date.
    rewritten = analyse(
        conn,
        "WITH c AS (SELECT t.at AT TIME ZONE 'UTC' AS moment FROM t) "
        "SELECT s.moment::date AS k, count(*) AS n FROM (SELECT c.moment FROM c) AS s GROUP BY 1",
    )
    assert timezone_outcome(rewritten).passed


def test_an_operand_of_unknown_type_is_reported_as_undecided_not_passed(conn):
    outcome = timezone_outcome(analyse(conn, "SELECT date(u.x) AS k, count(*) AS n FROM unnest(ARRAY[now()]) AS u (x) GROUP BY 1"))
    assert not outcome.passed
    assert outcome.findings == ()
    assert outcome.undecided == ("date(u.x): the type of u.x is unknown",)
    assert outcome.description.startswith("cannot decide whether v depends on the session's TimeZone")


# (query, aggregates the check names, relation named in the join)
FANOUTS = [
    (  # the shipping of each order summed once per item
        "SELECT o.customer, sum(o.shipping) AS shipping, count(*) AS n FROM orders AS o "
        "JOIN items AS i ON i.order_id = o.id GROUP BY o.customer",
        ["sum(o.shipping)"],
        "public.items AS i",
    ),
    (  # an outer join repeats just as well; avg and count(x) are weighted by the repeats
        "SELECT o.customer, avg(o.shipping) AS shipping, count(o.id) AS orders FROM orders AS o "
        "LEFT JOIN items AS i ON i.order_id = o.id GROUP BY o.customer",
        ["avg(o.shipping)", "count(o.id)"],
        "public.items AS i",
    ),
    (  # a CTE grouped by (order_id, sku) is not unique on order_id alone
        "WITH per_sku AS (SELECT i.order_id, i.sku, sum(i.qty) AS qty FROM items AS i GROUP BY i.order_id, i.sku) "
        "SELECT o.customer, sum(o.shipping) AS shipping FROM orders AS o "
        "JOIN per_sku AS p ON p.order_id = o.id GROUP BY o.customer",
        ["sum(o.shipping)"],
        "per_sku AS p",
    ),
]


@pytest.mark.parametrize(("query", "aggregates", "join"), FANOUTS)
def test_aggregate_over_rows_a_one_to_many_join_repeats_is_named_with_the_join_and_fix(conn, query, aggregates, join):
    outcome = fanout_outcome(analyse(conn, query))
    assert not outcome.passed
    assert [f.expression for f in outcome.findings] == aggregates
    assert outcome.metadata["aggregates"] == aggregates
    assert f"the join to {join} ON" in outcome.description
    assert "in its own CTE" in outcome.description


SAFE_JOINS = [
    # the rewrite: items aggregated in their own CTE per order, then joined on that CTE's GROUP BY key
    "WITH per_order AS (SELECT i.order_id, sum(i.qty) AS qty FROM items AS i GROUP BY i.order_id) "
    "SELECT o.customer, sum(o.shipping) AS shipping, sum(p.qty) AS qty FROM orders AS o "
    "JOIN per_order AS p ON p.order_id = o.id GROUP BY o.customer",
    # count(DISTINCT), min and max are unchanged by repeated rows; count(*) counts the joined rows
    "SELECT o.customer, count(DISTINCT o.id) AS orders, max(o.shipping) AS top, min(o.shipping) AS low, "
    "count(*) AS items FROM orders AS o JOIN items AS i ON i.order_id = o.id GROUP BY o.customer",
    # a join on the primary key looks one row up: each item's price
    "SELECT i.order_id, sum(i.qty * p.price) AS revenue FROM items AS i JOIN products AS p ON p.id = i.product_id "
    "GROUP BY i.order_id",
    # a join on a unique index
    "SELECT i.order_id, sum(i.qty * p.price) AS revenue FROM items AS i JOIN products AS p ON p.sku = i.sku "
    "GROUP BY i.order_id",
    # DISTINCT makes a subquery unique on its columns
    "SELECT o.customer, sum(o.shipping) AS shipping FROM orders AS o "
    "JOIN (SELECT DISTINCT i.order_id FROM items AS i) AS d ON d.order_id = o.id GROUP BY o.customer",
    # a one-row subquery joined to every row repeats none
    "SELECT o.customer, sum(o.shipping / s.total) AS share FROM orders AS o "
    "CROSS JOIN (SELECT sum(shipping) AS total FROM orders) AS s GROUP BY o.customer",
    # IS NOT DISTINCT FROM on a GROUP BY key: one group per value, NULL included
    "WITH g AS (SELECT t.grp, count(*) AS n FROM t GROUP BY t.grp) "
    "SELECT t.day, sum(t.amount) AS amount FROM t LEFT JOIN g ON g.grp IS NOT DISTINCT FROM t.grp GROUP BY t.day",
]


@pytest.mark.parametrize("query", SAFE_JOINS)
def test_aggregates_joins_cannot_repeat_pass(conn, query):
    outcome = fanout_outcome(analyse(conn, query))
    assert (outcome.passed, outcome.findings) == (True, ())


def test_is_not_distinct_from_on_a_nullable_unique_index_can_repeat_rows(conn):
    # A unique index allows several NULLs, and IS NOT DISTINCT FROM matches each of them.
    conn.execute("CREATE TABLE groups (grp int, label text); CREATE UNIQUE INDEX ON groups (grp)")
    outcome = fanout_outcome(analyse(conn, "SELECT t.day, sum(t.amount) AS amount FROM t "
                      "LEFT JOIN groups AS g ON g.grp IS NOT DISTINCT FROM t.grp GROUP BY t.day"))
    assert [f.expression for f in outcome.findings] == ["sum(t.amount)"]


NULLABLE_KEYS = [
    # (query, nullable key columns, rows with a NULL key)
    ("SELECT t.grp, count(*) AS n FROM t GROUP BY t.grp", ["grp"], 1),
    # the nullable side of an outer join, though every order has items today
    ("SELECT o.id AS order_id, i.id AS item_id FROM orders AS o LEFT JOIN items AS i ON i.order_id = o.id",
     ["item_id"], 0),
    ("SELECT sum(t.amount) AS total FROM t", ["total"], 0),
]


@pytest.mark.parametrize(("query", "nullable", "null_rows"), NULLABLE_KEYS)
def test_nullable_unique_key_column_fails_with_the_count_and_the_fix(conn, query, nullable, null_rows):
    analyse(conn, query)
    conn.execute(f"CREATE UNIQUE INDEX v_key ON v ({', '.join(c for c in nullable)})")
    outcome = outcomes(conn, "v")[NULL_KEY_CHECK]
    assert not outcome.passed
    assert outcome.metadata["nullable_columns"] == nullable
    assert outcome.metadata["null_key_rows"] == null_rows
    assert f"{null_rows} rows have a NULL key now" in outcome.description
    assert "deletes and re-inserts" in outcome.description and "coalesce the key" in outcome.description


NOT_NULL_KEYS = [
    # the rewrites: a sentinel for the NULL group, or the NULLs filtered out
    ("SELECT coalesce(t.grp, -1) AS grp, count(*) AS n FROM t GROUP BY 1", "grp"),
    ("SELECT t.grp, count(*) AS n FROM t WHERE t.grp IS NOT NULL GROUP BY t.grp", "grp"),
    # NOT NULL table columns through an inner join and a CTE
    ("WITH o AS (SELECT id, customer FROM orders) SELECT i.id AS item_id, o.customer FROM items AS i "
     "JOIN o ON o.id = i.order_id", "item_id"),
    # a calendar from generate_series, as our views build theirs
    ("SELECT (now() AT TIME ZONE 'UTC')::date - d.n AS day FROM generate_series(1, 5) AS d (n)", "day"),
    ("SELECT t.day, count(*) AS n FROM t GROUP BY t.day", "day"),
]


@pytest.mark.parametrize(("query", "key"), NOT_NULL_KEYS)
def test_unique_key_the_sql_proves_not_null_passes(conn, query, key):
    analyse(conn, query)
    conn.execute(f"CREATE UNIQUE INDEX v_key ON v ({key})")
    outcome = outcomes(conn, "v")[NULL_KEY_CHECK]
    assert outcome.passed, outcome.description
    assert outcome.metadata == {"key_columns": [key], "nullable_columns": [], "unproven_columns": [], "null_key_rows": 0}


def test_a_key_the_sql_cannot_prove_is_counted_and_says_so(conn):
    analyse(conn, "SELECT u.x AS k FROM unnest(ARRAY[1, 2]) AS u (x)")
    conn.execute("CREATE UNIQUE INDEX v_key ON v (k)")
    outcome = outcomes(conn, "v")[NULL_KEY_CHECK]
    assert outcome.passed
    assert outcome.metadata["unproven_columns"] == ["k"]
    assert "does not prove k NOT NULL, so the rows were counted" in outcome.description


def test_product_views_report_fanout_nullable_key_and_session_time_zone(product_db):
    with psycopg.connect(product_db, autocommit=True) as conn:
        found = {view: outcomes(conn, view, "product") for view in
                 ("cohort_stats", "campaign_stats", "daily_activity", "weekly_purchases", "refund_totals", "recent_activity")}

    fanout = found["cohort_stats"][FANOUT_CHECK]
    assert not fanout.passed
    assert fanout.metadata["aggregates"] == ["sum(r.revenue)", "sum((cs.cost / CAST(cs.signups AS DECIMAL)))"]
    assert "the join to user_days AS d ON (d.user_id = u.user_id)" in fanout.description
    assert "campaign_stats AS cs ON" not in fanout.description  # IS NOT DISTINCT FROM on its GROUP BY key

    key = found["campaign_stats"][NULL_KEY_CHECK]
    assert not key.passed
    assert (key.metadata["nullable_columns"], key.metadata["null_key_rows"]) == (["campaign_id"], 1)

    zone = found["daily_activity"][TIMEZONE_CHECK]
    assert not zone.passed
    assert {"date(events.received_at)", "CURRENT_DATE"} <= set(zone.metadata["expressions"])
    assert "(events.received_at AT TIME ZONE 'UTC')::date" in zone.description

    failing = {(view, name) for view, checks in found.items() for name, o in checks.items() if not o.passed}
    assert failing == {
        ("cohort_stats", FANOUT_CHECK),
        ("campaign_stats", NULL_KEY_CHECK),
        ("daily_activity", TIMEZONE_CHECK),
    }


def test_our_four_views_pass_every_check(refreshed_db):
    with psycopg.connect(refreshed_db, autocommit=True) as conn:
        for view in ("daily_aggregations", "cohort_aggregations", "campaign_aggregations", "weekly_aggregations"):
            for outcome in outcomes(conn, view).values():
                assert outcome.passed, f"{view} {outcome.name}: {outcome.description}"
                assert outcome.undecided == ()


ODD_SHAPES = [
    # recursive CTE, window function, VALUES, UNION, LATERAL, set-returning function, JSONB, FILTER, DISTINCT ON
    "WITH RECURSIVE r (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT n AS k FROM r",
    "SELECT t.id AS k, sum(t.amount) OVER (ORDER BY t.id) AS running FROM t",
    "SELECT v.k, v.label FROM (VALUES (1, 'a'), (2, 'b')) AS v (k, label)",
    "SELECT t.id AS k FROM t UNION SELECT o.id FROM orders AS o",
    "SELECT o.id AS k, l.n FROM orders AS o, LATERAL (SELECT count(*) AS n FROM items AS i WHERE i.order_id = o.id) AS l",
    "SELECT e.key AS k, count(*) AS n FROM t, jsonb_each(jsonb_build_object('a', t.id)) AS e GROUP BY e.key",
    "SELECT t.day AS k, count(*) FILTER (WHERE t.grp = 1) AS n, max(t.at) AS last FROM t GROUP BY t.day",
    "SELECT DISTINCT ON (t.grp) t.grp, t.id AS k FROM t ORDER BY t.grp, t.id",
    "SELECT t.id AS k, (SELECT max(i.qty) FROM items AS i WHERE i.order_id = t.id) AS top FROM t",
]


@pytest.mark.parametrize("query", ODD_SHAPES)
def test_unusual_sql_gets_an_outcome_for_every_check_never_an_exception(conn, query):
    analyse(conn, query)
    conn.execute("CREATE UNIQUE INDEX v_key ON v (k)")
    found = outcomes(conn, "v")
    assert set(found) == {TIMEZONE_CHECK, NULL_KEY_CHECK, FANOUT_CHECK, GROUPING_CHECK}
    assert all(outcome.description for outcome in found.values())
    assert not [o.description for o in found.values() if "does not handle" in o.description]


def test_analysis_is_kept_until_the_definition_or_a_catalog_fact_it_read_changes(conn, analysis_cache, monkeypatch):
    conn.execute("CREATE TABLE shipments (order_id bigint NOT NULL, carrier text)")
    conn.execute("INSERT INTO shipments VALUES (1, 'post'), (2, 'dhl')")
    analyse(conn, "SELECT o.customer, sum(o.shipping) AS shipping FROM orders AS o "
                  "JOIN shipments AS s ON s.order_id = o.id GROUP BY o.customer")
    conn.execute("CREATE UNIQUE INDEX v_key ON v (customer)")
    assert not outcomes(conn, "v")[FANOUT_CHECK].passed  # shipments may hold several rows per order
    analysed = []
    real = sql_analysis.analyse_view
    monkeypatch.setattr(sql_analysis, "analyse_view", lambda *args: analysed.append(args) or real(*args))

    assert not outcomes(conn, "v")[FANOUT_CHECK].passed
    assert analysed == []  # nothing changed: from the cache
    conn.execute("CREATE UNIQUE INDEX ON shipments (order_id)")
    assert outcomes(conn, "v")[FANOUT_CHECK].passed  # a new fact of a relation the view reads: analysed again
    assert len(analysed) == 1
    assert len(list((analysis_cache / "sql-checks").glob("*.pickle"))) == 2
