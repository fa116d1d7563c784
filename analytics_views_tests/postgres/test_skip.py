"""A refresh is skipped only when the view provably did not change: on another team's schema and on ours.

Each test writes to one kind of source (a partition two levels down, an attached or detached partition, an
inheritance child, a table behind a plain view, a materialized view another view reads, a foreign table, a
function reading a table, random()) and checks that the next refresh runs and leaves the view equal to
its query; without a write, the views that may skip do.
"""

import time

import psycopg
import pytest
from psycopg import sql

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres.refresh import SKIP_PROOF, RefreshOutcome, RefreshSettings, refresh_view

PRODUCT_VIEWS = ["campaign_stats", "cohort_stats", "daily_activity", "recent_activity", "refund_totals", "weekly_purchases"]
OUR_VIEWS = ["daily_aggregations", "weekly_aggregations", "campaign_aggregations", "cohort_aggregations"]


def refresh(conn: psycopg.Connection, view: str, since: RefreshOutcome | None = None, **kwargs) -> RefreshOutcome:
    return refresh_view(
        conn, view, schema="product", skip_if_unchanged_since=since.sources_fingerprint if since else None, **kwargs
    )


def sources_part(outcome: RefreshOutcome) -> str:
    """The sources' fingerprint a refresh recorded, without the view's own mark that follows it."""
    return outcome.sources_fingerprint.partition(" view:")[0]


def write_counters(conn: psycopg.Connection) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_all_tables").fetchone()[0]


def write(url: str, statement: str, observer: psycopg.Connection, *, counted: bool = True) -> None:
    """Run `statement` in its own session; wait, looking from `observer` (the test's refreshing connection),
    until PostgreSQL has counted its rows (a session reports its counters when it goes idle) and the session
    has left pg_stat_activity (a closed session is listed a moment longer, and a skip is proven only when no
    other session may hold uncounted writes). `counted=False` for a statement that counts no rows."""
    before = write_counters(observer)
    with psycopg.connect(url, autocommit=True) as writer:
        writer.execute(statement)
        writer.execute("SELECT pg_stat_force_next_flush()")
        pid = writer.info.backend_pid
    deadline = time.monotonic() + 10
    while counted and write_counters(observer) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    while observer.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0]:
        assert time.monotonic() < deadline + 20, f"session {pid} never left"
        time.sleep(0.05)


def rows_differing_from_query(conn: psycopg.Connection, view: str, schema: str = "product") -> int:
    """Rows in the view and not in its query's result, plus the reverse (counted with duplicates), under UTC."""
    query = conn.execute("SELECT pg_get_viewdef(%s::regclass)", [f"{schema}.{view}"]).fetchone()[0].rstrip("; \n")
    relation = sql.Identifier(schema, view)
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        return conn.execute(
            sql.SQL("SELECT (SELECT count(*) FROM (TABLE {v} EXCEPT ALL ({q})) AS extra)"
                    " + (SELECT count(*) FROM (({q}) EXCEPT ALL TABLE {v}) AS missing)").format(
                v=relation, q=sql.SQL(query)
            )
        ).fetchone()[0]


@pytest.fixture
def product(product_db) -> tuple[str, psycopg.Connection]:
    with psycopg.connect(product_db, autocommit=True) as conn:
        yield product_db, conn


def test_without_writes_every_product_view_skips_but_the_six_hour_window_never_does(product):
    _, conn = product
    first = {view: refresh(conn, view) for view in PRODUCT_VIEWS}
    second = {view: refresh(conn, view, first[view]) for view in PRODUCT_VIEWS}
    assert {view: outcome.mode for view, outcome in second.items()} == {
        "campaign_stats": RefreshMode.SKIPPED,
        "cohort_stats": RefreshMode.SKIPPED,
        "daily_activity": RefreshMode.SKIPPED,
        "recent_activity": RefreshMode.CONCURRENT,
        "refund_totals": RefreshMode.SKIPPED,
        "weekly_purchases": RefreshMode.SKIPPED,
    }
    assert first["recent_activity"].sources_fingerprint is None
    assert second["recent_activity"].note == (
        "never skipped: its result follows the clock (CURRENT_TIMESTAMP - CAST('06:00:00' AS INTERVAL)), finer than a day"
    )
    # current_date: the fingerprint holds the day in the refresh's time zone, so it changes at midnight there.
    today = conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date::text").fetchone()[0]
    assert sources_part(first["daily_activity"]).endswith(f" TimeZone={today}")
    assert second["daily_activity"].sources_fingerprint == first["daily_activity"].sources_fingerprint
    assert len(sources_part(first["weekly_purchases"]).split(" ")) == 2  # bucketed in UTC, reads no clock


def test_fifty_purchases_into_a_weekly_partition_reach_the_view_over_the_plain_view(product):
    url, conn = product
    before = refresh(conn, "weekly_purchases")
    purchases = conn.execute("SELECT sum(purchases) FROM product.weekly_purchases").fetchone()[0]
    write(
        url,
        "INSERT INTO product.events (user_id, kind, payload, received_at)"
        " SELECT g, 'purchase', jsonb_build_object('amount', 10), now() - interval '1 minute' FROM generate_series(1, 50) AS g",
        conn,
    )
    after = refresh(conn, "weekly_purchases", before)
    assert after.mode == RefreshMode.CONCURRENT
    assert conn.execute("SELECT sum(purchases) FROM product.weekly_purchases").fetchone()[0] == purchases + 50
    assert rows_differing_from_query(conn, "weekly_purchases") == 0
    assert refresh(conn, "weekly_purchases", after).mode == RefreshMode.SKIPPED


def test_a_write_to_a_leaf_partition_two_levels_down_is_seen(product):
    url, conn = product
    before = {view: refresh(conn, view) for view in ("weekly_purchases", "cohort_stats")}
    write(
        url,
        "INSERT INTO product.events (user_id, kind, payload, received_at)"
        " VALUES (7, 'purchase', '{\"amount\": 99}', now() - interval '300 days')",
        conn,
    )
    leaf = conn.execute(
        "SELECT tableoid::regclass::text FROM product.events WHERE received_at < now() - interval '299 days'"
    ).fetchone()[0]
    assert leaf == "product.events_older_purchase"
    for view, outcome in before.items():
        assert refresh(conn, view, outcome).mode == RefreshMode.CONCURRENT, view
        assert rows_differing_from_query(conn, view) == 0, view


def test_an_attached_partition_and_a_detached_one_change_the_fingerprint(product):
    url, conn = product
    before = refresh(conn, "weekly_purchases")
    # Rows written before the attach are counted on a table that was no source then: only the attach shows.
    conn.execute("CREATE TABLE product.events_future (LIKE product.events INCLUDING DEFAULTS)")
    write(
        url,
        "INSERT INTO product.events_future (event_id, user_id, kind, payload, received_at)"
        " VALUES (-1, 1, 'purchase', '{\"amount\": 5}', now() + interval '400 days')",
        conn,
    )
    assert refresh(conn, "weekly_purchases", before).mode == RefreshMode.SKIPPED
    conn.execute(
        "ALTER TABLE product.events ATTACH PARTITION product.events_future"
        " FOR VALUES FROM (now() + interval '300 days') TO (now() + interval '500 days')"
    )
    attached = refresh(conn, "weekly_purchases", before)
    assert attached.mode == RefreshMode.CONCURRENT
    assert rows_differing_from_query(conn, "weekly_purchases") == 0
    weeks = conn.execute("SELECT count(*) FROM product.weekly_purchases").fetchone()[0]

    this_week = conn.execute(
        "SELECT tableoid::regclass::text FROM product.events WHERE kind = 'purchase' ORDER BY received_at DESC LIMIT 1"
    ).fetchone()[0]
    conn.execute(sql.SQL("ALTER TABLE product.events DETACH PARTITION {}").format(sql.SQL(this_week)))
    detached = refresh(conn, "weekly_purchases", attached)
    assert detached.mode == RefreshMode.CONCURRENT
    assert rows_differing_from_query(conn, "weekly_purchases") == 0
    assert conn.execute("SELECT count(*) FROM product.weekly_purchases").fetchone()[0] == weeks - 1


def test_a_write_to_an_inheritance_child_is_seen(product):
    url, conn = product
    before = refresh(conn, "refund_totals")
    write(url, "INSERT INTO product.refunds_archive VALUES (3, 5, 2.50, now() - interval '40 days')", conn)
    assert refresh(conn, "refund_totals", before).mode == RefreshMode.CONCURRENT
    assert conn.execute("SELECT refunded FROM product.refund_totals WHERE user_id = 5").fetchone()[0] == 10
    assert rows_differing_from_query(conn, "refund_totals") == 0


def test_a_plain_view_redefined_between_refreshes_is_seen(product):
    _, conn = product
    before = refresh(conn, "weekly_purchases")
    conn.execute(
        "CREATE OR REPLACE VIEW product.purchases AS SELECT user_id, (payload ->> 'amount')::numeric AS amount,"
        " received_at FROM product.events WHERE kind = 'purchase' AND user_id IS NOT NULL"
    )
    assert refresh(conn, "weekly_purchases", before).mode == RefreshMode.CONCURRENT
    assert rows_differing_from_query(conn, "weekly_purchases") == 0


@pytest.mark.parametrize("concurrently", [False, True], ids=["plain", "concurrently"])
def test_a_refreshed_materialized_view_makes_the_view_reading_it_refresh(product, concurrently):
    url, conn = product
    before = refresh(conn, "cohort_stats")
    cost = conn.execute("SELECT sum(campaign_cost) FROM product.cohort_stats").fetchone()[0]
    # campaigns is read by campaign_stats only: until campaign_stats is refreshed, cohort_stats is current.
    write(url, "UPDATE product.campaigns SET cost = cost * 2", conn)
    assert refresh(conn, "cohort_stats", before).mode == RefreshMode.SKIPPED
    # CONCURRENTLY applies its diff as counted deletes and inserts; a plain REFRESH gives a new file node.
    write(
        url,
        f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY' if concurrently else ''} product.campaign_stats",
        conn,
        counted=concurrently,
    )
    after = refresh(conn, "cohort_stats", before)
    assert after.mode == RefreshMode.CONCURRENT
    doubled = conn.execute("SELECT sum(campaign_cost) FROM product.cohort_stats").fetchone()[0]
    assert round(doubled, 9) == round(2 * cost, 9)
    assert rows_differing_from_query(conn, "cohort_stats") == 0


def create_view(conn: psycopg.Connection, name: str, query: str, key: str) -> None:
    conn.execute(sql.SQL("CREATE MATERIALIZED VIEW product.{} AS {}").format(sql.Identifier(name), sql.SQL(query)))
    conn.execute(sql.SQL("CREATE UNIQUE INDEX ON product.{} ({})").format(sql.Identifier(name), sql.Identifier(key)))


def test_a_view_calling_a_function_that_reads_a_table_is_never_skipped(product):
    url, conn = product
    conn.execute(
        "CREATE FUNCTION product.refund_count() RETURNS bigint STABLE LANGUAGE sql AS 'SELECT count(*) FROM product.refunds'"
    )
    create_view(conn, "refund_count", "SELECT product.refund_count() AS refunds", "refunds")
    first = refresh(conn, "refund_count")
    assert first.sources_fingerprint is None
    write(url, "INSERT INTO product.refunds VALUES (4, 9, 1.00, now())", conn)
    second = refresh(conn, "refund_count", first)
    assert second.mode == RefreshMode.CONCURRENT
    assert second.note == (
        "never skipped: it calls the function product.refund_count(), which may read tables the catalog does not show"
    )
    assert conn.execute("SELECT refunds FROM product.refund_count").fetchone()[0] == 3


def test_a_view_over_random_is_never_skipped(product):
    _, conn = product
    create_view(conn, "sample", "SELECT 1 AS k, random() AS r", "k")
    first = refresh(conn, "sample")
    second = refresh(conn, "sample", first)
    assert second.mode == RefreshMode.CONCURRENT
    assert second.note == "never skipped: it calls the volatile function random(), whose result may change any time"


def test_a_view_over_a_foreign_table_is_never_skipped(product):
    _, conn = product
    available = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'file_fdw'").fetchone()[0]
    if not available or not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        pytest.skip("file_fdw is not installed on this server, or the test role may not create it")
    conn.execute("CREATE EXTENSION file_fdw")
    conn.execute("CREATE SERVER files FOREIGN DATA WRAPPER file_fdw")
    conn.execute(
        "CREATE FOREIGN TABLE product.rates (currency text, rate numeric) SERVER files"
        " OPTIONS (program 'printf \"EUR,1.1\\nGBP,1.3\\n\"', format 'csv')"
    )
    create_view(conn, "rates_copy", "SELECT currency, rate FROM product.rates", "currency")
    first = refresh(conn, "rates_copy")
    second = refresh(conn, "rates_copy", first)
    assert (first.sources_fingerprint, second.mode) == (None, RefreshMode.CONCURRENT)
    assert second.note == "never skipped: it reads the foreign table product.rates, whose changes PostgreSQL does not count"
    assert conn.execute("SELECT count(*) FROM product.rates_copy").fetchone()[0] == 2


def test_with_track_counts_off_no_view_is_skipped(product):
    _, conn = product
    first = refresh(conn, "refund_totals")
    conn.execute("SET track_counts = off")
    second = refresh(conn, "refund_totals", first)
    assert second.mode == RefreshMode.CONCURRENT
    assert second.note == "never skipped: track_counts is off, so PostgreSQL does not count writes to its sources"


def test_a_session_time_zone_view_fingerprints_the_day_in_the_refresh_zone(product):
    _, conn = product
    utc = refresh(conn, "daily_activity")
    kiritimati = refresh(conn, "daily_activity", utc, settings=RefreshSettings(timezone="Pacific/Kiritimati"))
    assert kiritimati.mode == RefreshMode.CONCURRENT  # another zone, other days: refreshed
    day = conn.execute("SELECT (now() AT TIME ZONE 'Pacific/Kiritimati')::date::text").fetchone()[0]
    assert sources_part(kiritimati).endswith(f" TimeZone={day}")
    assert kiritimati.sources_fingerprint != utc.sources_fingerprint


def test_our_views_skip_without_writes_and_each_refreshes_after_a_payment(seeded_db):
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        first = {view: refresh_view(conn, view) for view in OUR_VIEWS}
        second = {view: refresh_view(conn, view, skip_if_unchanged_since=first[view].sources_fingerprint) for view in OUR_VIEWS}
        assert {outcome.mode for outcome in second.values()} == {RefreshMode.SKIPPED}
        assert all(outcome.note == SKIP_PROOF for outcome in second.values())
        write(
            seeded_db,
            "INSERT INTO payments (user_id, amount, paid_at) SELECT user_id, 1.00, now() - interval '3 days' FROM users LIMIT 1",
            conn,
        )
        third = {view: refresh_view(conn, view, skip_if_unchanged_since=first[view].sources_fingerprint) for view in OUR_VIEWS}
        assert {view: outcome.mode for view, outcome in third.items()} == {view: RefreshMode.CONCURRENT for view in OUR_VIEWS}
        for view in OUR_VIEWS:
            assert rows_differing_from_query(conn, view, "public") == 0, view


def test_a_skip_waits_for_no_lock_on_the_sources(product):
    url, conn = product
    before = refresh(conn, "refund_totals")
    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE product.refunds IN ACCESS EXCLUSIVE MODE")
        # Waiting for that lock would end in a lock_timeout error, not a skip. The locker, idle in a transaction,
        # could hold counts of earlier commits: named as one of the run's own sessions, only its lock is in the way.
        settings = RefreshSettings(lock_timeout_s=0.1)
        own = [locker.info.backend_pid]
        assert refresh(conn, "refund_totals", before, settings=settings, own_sessions=own).mode == RefreshMode.SKIPPED
        locker.rollback()


def test_a_clock_read_in_a_plain_view_below_is_never_skipped_and_named(product):
    _, conn = product
    conn.execute("CREATE VIEW product.last_hour AS SELECT kind, received_at FROM product.events WHERE received_at > now() - interval '1 hour'")
    create_view(conn, "last_hour_kinds", "SELECT kind, count(*) AS events FROM product.last_hour GROUP BY kind", "kind")
    first = refresh(conn, "last_hour_kinds")
    second = refresh(conn, "last_hour_kinds", first)
    assert (first.sources_fingerprint, second.mode) == (None, RefreshMode.CONCURRENT)
    assert second.note == (
        "never skipped: its result follows the clock (CURRENT_TIMESTAMP - CAST('01:00:00' AS INTERVAL)), finer than a day"
        " in the view product.last_hour it reads"
    )


def test_a_view_reading_a_sequence_is_never_skipped(product):
    _, conn = product
    conn.execute("CREATE SEQUENCE product.ticket")
    create_view(conn, "ticket_state", "SELECT 1 AS k, last_value FROM product.ticket", "k")
    second = refresh(conn, "ticket_state", refresh(conn, "ticket_state"))
    assert second.mode == RefreshMode.CONCURRENT
    assert second.note == "never skipped: it reads the sequence product.ticket, whose changes PostgreSQL does not count"
