"""Observing sources (source_versions.py) on another team's schema: a version changes when what the views read
may have changed, stays when nothing did on a quiet database, and is never claimed where it cannot be known."""

import time

import psycopg
import pytest

from analytics_views.postgres import write_quiescence
from analytics_views.postgres.source_versions import source_versions

SOURCES = ["product.events", "product.refunds", "product.purchases", "product.campaign_stats"]


@pytest.fixture
def product(product_db):
    with psycopg.connect(product_db, autocommit=True) as conn:
        yield product_db, conn


def versions(conn, relations=SOURCES) -> dict:
    return {v.relation: v for v in source_versions(conn, relations)}


def settled(conn, relations=SOURCES) -> dict:
    """The versions once every one is settled: sessions that just closed are listed a moment longer."""
    deadline = time.monotonic() + 30
    while not all((found := versions(conn, relations))[r].settled for r in relations):
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    return found


def test_a_write_to_a_partition_changes_the_table_and_the_view_over_it_only(product):
    url, conn = product
    before = settled(conn)
    with psycopg.connect(url, autocommit=True) as writer:
        writer.execute(
            "INSERT INTO product.events (user_id, kind, payload, received_at) VALUES (1, 'purchase', '{\"amount\": 3}', now())"
        )
    after = settled(conn)  # the writer's counts are in once it has gone
    changed = {r for r in SOURCES if after[r].version != before[r].version}
    assert changed == {"product.events", "product.purchases"}  # the plain view reads the partitioned table
    assert all(v.settled for v in after.values())


def test_while_a_session_may_hold_uncounted_writes_every_version_is_new_at_each_look(product):
    url, conn = product
    with psycopg.connect(url, autocommit=True) as bystander:
        bystander.execute("SELECT 1")
        first, second = versions(conn), versions(conn)
    assert all(not v.settled and "may have changed: the client backend" in v.reason for v in first.values())
    assert all(first[r].version != second[r].version for r in SOURCES)


def test_unchanged_sources_keep_their_version_on_a_quiet_database(product):
    _, conn = product
    time.sleep(write_quiescence.QUIET_AFTER_S + 0.5)  # the fixture's sessions are gone and reported
    first = settled(conn)
    assert {r: v.version for r, v in first.items()} == {r: v.version for r, v in versions(conn).items()}


def test_what_cannot_be_observed_says_why(product):
    _, conn = product
    conn.execute("CREATE SEQUENCE product.ticket")
    got = versions(conn, ["product.ticket", "product.gone"])
    assert (got["product.ticket"].version, got["product.ticket"].reason) == (
        None, "it is a sequence, whose changes PostgreSQL does not count"
    )
    assert (got["product.gone"].version, got["product.gone"].reason) == (None, "it does not exist (dropped or renamed)")
