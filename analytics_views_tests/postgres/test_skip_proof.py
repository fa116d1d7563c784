"""A skip is a proof: after a write commits, no refresh reports the view unchanged while its rows differ from
its query, however late PostgreSQL counts that write (on another team's schema: weekly partitions, a plain
view over them, views over views, inheritance).

Each write is committed by a session that either stays connected (its counts may still be held back: the
write is its second commit within PostgreSQL's one-second reporting interval) or disconnects. Sessions that
commit and go on working (a procedure, `COMMIT; SELECT pg_sleep(...)`, a transaction left open) hold their
counts for as long as they work. A write by a pg_cron job (a background worker) cannot be had here: neither
server has pg_cron; write_quiescence.py refuses any background worker connected to the database.
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres import write_quiescence
from analytics_views.postgres.refresh import SKIP_PROOF, VIEW_WRITTEN, RefreshOutcome
from analytics_views_tests.postgres.test_skip import refresh, rows_differing_from_query, write_counters

RECENT_PURCHASE = (
    "INSERT INTO product.events (user_id, kind, payload, received_at)"
    " VALUES (7, 'purchase', '{\"amount\": 40}', now() - interval '1 minute')"
)


def copy_a_purchase(conn: psycopg.Connection) -> None:
    with conn.cursor().copy("COPY product.events (user_id, kind, payload, received_at) FROM STDIN") as copy:
        copy.write_row((8, "purchase", '{"amount": 25}', "now"))


# Each write, and the view whose rows it changes.
WRITES: dict[str, tuple[str, Callable[[psycopg.Connection], None] | str]] = {
    "copy": ("weekly_purchases", copy_a_purchase),
    "truncate": ("refund_totals", "TRUNCATE product.refunds_archive"),
    "insert into a leaf partition": (
        "weekly_purchases",
        # The identity reaches partitions only from PostgreSQL 17: the id is given, as loaders do.
        "INSERT INTO product.events_older_purchase (event_id, user_id, kind, payload, received_at)"
        " OVERRIDING SYSTEM VALUE VALUES (-9, 9, 'purchase', '{\"amount\": 60}', now() - interval '300 days')",
    ),
    "insert on conflict do update": (
        "campaign_stats",
        "INSERT INTO product.campaigns VALUES (1, 'search', 5000) ON CONFLICT (campaign_id) DO UPDATE SET cost = EXCLUDED.cost",
    ),
    "insert through a view's instead-of trigger": (
        "weekly_purchases",
        "INSERT INTO product.purchase_entry (user_id, amount) VALUES (11, 75)",
    ),
    "delete": ("refund_totals", "DELETE FROM product.refunds WHERE user_id = 3"),
}

PURCHASE_ENTRY = """
CREATE VIEW product.purchase_entry AS SELECT user_id, amount FROM product.purchases;
CREATE FUNCTION product.enter_purchase() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO product.events (user_id, kind, payload, received_at)
    VALUES (NEW.user_id, 'purchase', jsonb_build_object('amount', NEW.amount), now());
    RETURN NEW;
END $$;
CREATE TRIGGER enter_purchase INSTEAD OF INSERT ON product.purchase_entry
    FOR EACH ROW EXECUTE FUNCTION product.enter_purchase();
CREATE TABLE product.scratch (n int);
"""


@pytest.fixture
def schema(product_db) -> Iterator[tuple[str, psycopg.Connection]]:
    with psycopg.connect(product_db, autocommit=True) as conn:
        conn.execute(PURCHASE_ENTRY)
        yield product_db, conn


def commit_late(writer: psycopg.Connection, change: Callable[[psycopg.Connection], None] | str) -> None:
    """Commit `change` as the session's second write within a second: PostgreSQL holds its counts back."""
    writer.execute("INSERT INTO product.scratch VALUES (1)")
    change(writer) if callable(change) else writer.execute(change)


def assert_not_reported_unchanged(conn: psycopg.Connection, view: str, before: RefreshOutcome) -> RefreshOutcome:
    outcome = refresh(conn, view, before)
    assert outcome.mode != RefreshMode.SKIPPED, outcome
    assert rows_differing_from_query(conn, view) == 0
    return outcome


@pytest.mark.parametrize("writer_stays", [True, False], ids=["writer stays connected", "writer disconnects"])
@pytest.mark.parametrize("write", WRITES)
def test_a_committed_write_is_never_reported_unchanged(schema, write, writer_stays):
    url, conn = schema
    view, change = WRITES[write]
    before = refresh(conn, view)
    with psycopg.connect(url, autocommit=True) as writer:
        commit_late(writer, change)
        assert rows_differing_from_query(conn, view) > 0  # the write made the view stale
        if writer_stays:
            assert_not_reported_unchanged(conn, view, before)
    if not writer_stays:
        assert_not_reported_unchanged(conn, view, before)


def test_a_deferred_report_is_not_taken_for_no_write(schema):
    url, conn = schema
    before = refresh(conn, "weekly_purchases")
    counted = write_counters(conn)
    with psycopg.connect(url, autocommit=True) as writer:
        commit_late(writer, RECENT_PURCHASE)
        assert write_counters(conn) == counted  # committed and visible, not yet counted
        outcome = assert_not_reported_unchanged(conn, "weekly_purchases", before)
        pid = writer.info.backend_pid
        assert f"client backend pid {pid}" in outcome.note and "went idle" in outcome.note


@contextmanager
def working_session(url: str, statement: str) -> Iterator[int]:
    """A session running `statement` in a thread until the block ends (then cancelled); yields its pid."""
    session = psycopg.connect(url, autocommit=True)
    pid = session.info.backend_pid
    worker = threading.Thread(target=lambda: _run_until_cancelled(session, statement))
    worker.start()
    try:
        yield pid
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_cancel_backend(%s)", [pid])
        worker.join(timeout=30)
        session.close()


def _run_until_cancelled(session: psycopg.Connection, statement: str) -> None:
    try:
        session.execute(statement)
    except errors.QueryCanceled:
        pass


def wait_for_rows(conn: psycopg.Connection, query: str, rows: int) -> None:
    deadline = time.monotonic() + 20
    while conn.execute(query).fetchone()[0] < rows:
        assert time.monotonic() < deadline, f"never saw {rows} rows: {query}"
        time.sleep(0.05)


COUNT_OF_USER_7 = "SELECT count(*) FROM product.events WHERE user_id = 7 AND received_at > now() - interval '1 hour'"


@pytest.mark.parametrize(
    "statement",
    [
        f"CALL product.slow_etl()",
        f"{RECENT_PURCHASE}; COMMIT; SELECT pg_sleep(60)",
    ],
    ids=["procedure committing per batch", "commit then sleep in one query string"],
)
def test_a_session_still_working_after_its_commit_keeps_the_view_refreshed(schema, statement):
    url, conn = schema
    conn.execute(
        "CREATE PROCEDURE product.slow_etl() LANGUAGE plpgsql AS $$ BEGIN "
        f"{RECENT_PURCHASE}; COMMIT; PERFORM pg_sleep(60); END $$"
    )
    before = refresh(conn, "weekly_purchases")
    counted = write_counters(conn)
    with working_session(url, statement) as pid:
        wait_for_rows(conn, COUNT_OF_USER_7, 1)
        assert write_counters(conn) == counted  # its counts wait for the session to go idle
        outcome = assert_not_reported_unchanged(conn, "weekly_purchases", before)
        assert f"client backend pid {pid} is active" in outcome.note


def test_a_session_idle_in_transaction_after_a_commit_keeps_the_view_refreshed(schema):
    url, conn = schema
    before = refresh(conn, "weekly_purchases")
    with psycopg.connect(url) as writer:  # not autocommit: every statement opens a transaction, as drivers do
        writer.execute("INSERT INTO product.scratch VALUES (1)")
        writer.commit()
        writer.execute(RECENT_PURCHASE)
        writer.commit()
        writer.execute("SELECT 1")  # a new transaction, left open
        outcome = assert_not_reported_unchanged(conn, "weekly_purchases", before)
        assert f"client backend pid {writer.info.backend_pid} is idle in transaction" in outcome.note
        writer.rollback()


@pytest.mark.parametrize("concurrently", [False, True], ids=["plain", "concurrently"])
def test_a_view_refreshed_by_another_session_in_another_time_zone_is_refreshed_again(schema, concurrently):
    url, conn = schema
    before = refresh(conn, "daily_activity")
    with psycopg.connect(url, autocommit=True) as old_cron:
        old_cron.execute("SET TimeZone = 'Pacific/Kiritimati'")
        old_cron.execute(f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY' if concurrently else ''} product.daily_activity")
    assert rows_differing_from_query(conn, "daily_activity") > 0  # its days are Kiritimati's, not UTC's
    outcome = assert_not_reported_unchanged(conn, "daily_activity", before)
    assert outcome.note == f"not skipped: {VIEW_WRITTEN}"


def test_on_a_quiet_database_an_unchanged_view_is_skipped_on_proof(schema):
    url, conn = schema
    first = refresh(conn, "weekly_purchases")
    with psycopg.connect(url, autocommit=True) as bystander:
        bystander.execute(RECENT_PURCHASE)
        second = refresh(conn, "weekly_purchases", first)
        time.sleep(write_quiescence.QUIET_AFTER_S + 0.5)  # the bystander, idle since its write, has reported it
        # Counted after the second refresh read the counters: they moved since, so the third refreshes too.
        third = refresh(conn, "weekly_purchases", second)
        fourth = refresh(conn, "weekly_purchases", third)
    assert second.mode != RefreshMode.SKIPPED  # the bystander went idle under QUIET_AFTER_S ago
    assert (fourth.mode, fourth.note, fourth.sources_fingerprint) == (RefreshMode.SKIPPED, SKIP_PROOF, third.sources_fingerprint)
    assert rows_differing_from_query(conn, "weekly_purchases") == 0


def test_the_run_s_own_sessions_do_not_prevent_a_skip(schema):
    url, conn = schema
    first = refresh(conn, "refund_totals")
    with psycopg.connect(url, autocommit=True) as sibling:
        sibling.execute("SELECT 1")
        assert refresh(conn, "refund_totals", first).mode != RefreshMode.SKIPPED
        assert refresh(conn, "refund_totals", first, own_sessions=[sibling.info.backend_pid]).mode == RefreshMode.SKIPPED


@contextmanager
def parallel_scan(conn: psycopg.Connection, leader: psycopg.Connection) -> Iterator[list[int]]:
    """A parallel scan running in `leader` (in a thread, cancelled on exit): the pids of its workers."""
    leader.execute("CREATE TABLE product.spread AS SELECT g FROM generate_series(1, 50000) AS g")
    for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_table_scan_size"):
        leader.execute(f"SET {setting} = 0")
    leader.execute("SET max_parallel_workers_per_gather = 2")

    def scan() -> None:  # the workers scan; the leader sleeps on each row, so they wait on their full queues
        with contextlib.suppress(errors.QueryCanceled):
            leader.execute("SELECT count(*) FROM product.spread WHERE pg_sleep(0.0001) IS NOT NULL")

    scanning = threading.Thread(target=scan)
    scanning.start()
    try:
        for _ in range(100):
            workers = [pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE leader_pid = %s AND pid <> leader_pid", [leader.info.backend_pid]
            )]
            if workers:
                break
            time.sleep(0.05)
        else:
            pytest.skip("the server started no parallel worker (max_worker_processes taken?)")
        yield workers
    finally:
        leader.cancel_safe()
        scanning.join()


def test_the_parallel_workers_of_the_run_s_own_sessions_do_not_prevent_a_skip_and_others_do(schema):
    url, conn = schema
    with psycopg.connect(url, autocommit=True) as leader, parallel_scan(conn, leader) as workers:
        mine = write_quiescence.look(conn, own_sessions=[leader.info.backend_pid])
        theirs = write_quiescence.look(conn)
    assert not [busy for busy in mine.busy if busy[0] in workers]
    assert {busy[0] for busy in theirs.busy if busy[1] == "parallel worker"} & set(workers)


@pytest.mark.parametrize(
    ("version", "busy", "expected"),
    [
        (140011, [], "PostgreSQL 14 sends its statistics over a channel that may drop them"),
        (150004, [[42, "pg_cron scheduler", "active", "", 3]], "the pg_cron scheduler pid 42 is connected to the database"),
        (180001, [[7, "client backend", None, "", None]], "grant it pg_read_all_stats"),
        (180001, [], None),
    ],
)
def test_what_proves_nothing(version, busy, expected):
    before = write_quiescence.Look("100", None, version, busy)
    reason = write_quiescence.unproven(before, write_quiescence.Look("100", None, version, []))
    assert reason is None if expected is None else expected in reason
