"""Build-and-swap computes the new contents with the view owner's rights, as REFRESH does, never the
connecting role's: row-level security and privileges on the sources decide; a role that may refresh but
not build beside the view (the least-privilege role of sql/roles/refresher.sql) falls back to CONCURRENTLY."""

import uuid

import psycopg
import pytest
from psycopg import sql

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres import swap
from analytics_views.postgres.refresh import RefreshError, refresh_view
from analytics_views_tests.postgres.test_security import refresher  # noqa: F401 (a fixture)

TENANT_VIEW = """
CREATE TABLE tenant_events (id int PRIMARY KEY, tenant text NOT NULL);
INSERT INTO tenant_events SELECT g, CASE WHEN g % 3 = 0 THEN 'ours' ELSE 'theirs' END FROM generate_series(1, 30) AS g;
ALTER TABLE tenant_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_sees_ours ON tenant_events FOR SELECT TO {owner} USING (tenant = 'ours');
GRANT SELECT ON tenant_events TO {owner};
GRANT CREATE ON SCHEMA public TO {owner};
CREATE MATERIALIZED VIEW visible_events AS SELECT e.id, e.tenant FROM tenant_events AS e WITH NO DATA;
CREATE UNIQUE INDEX visible_events_key ON visible_events (id);
ALTER MATERIALIZED VIEW visible_events OWNER TO {owner};
REFRESH MATERIALIZED VIEW visible_events;
"""


@pytest.fixture
def owned_view(empty_db):
    """A view owned by a non-superuser role that row-level security limits to a third of its source, and
    a login role that is a member of the owner; returns (admin url, member url)."""
    owner = f"av_owner_{uuid.uuid4().hex[:8]}"
    member = f"{owner}_member"
    with psycopg.connect(empty_db, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(member), sql.Identifier(owner)))
    try:  # roles outlive the test's database: drop them even when the setup fails
        with psycopg.connect(empty_db, autocommit=True) as admin:
            admin.execute(sql.SQL(TENANT_VIEW).format(owner=sql.Identifier(owner)))
        yield empty_db, psycopg.conninfo.make_conninfo(empty_db, user=member)
    finally:
        with psycopg.connect(empty_db, autocommit=True) as admin:
            for name in (member, owner):
                admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def ids(conn: psycopg.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM visible_events ORDER BY id")]


@pytest.mark.parametrize("refreshing", ["superuser", "member of the owner"])
def test_swap_stores_exactly_the_rows_the_owners_row_security_allows(owned_view, refreshing):
    admin_url, member_url = owned_view
    with psycopg.connect(admin_url, autocommit=True) as admin:
        assert ids(admin) == list(range(3, 31, 3))  # the owner's 10 of 30
        admin.execute("INSERT INTO tenant_events VALUES (31, 'theirs'), (33, 'ours')")
    with psycopg.connect(admin_url if refreshing == "superuser" else member_url, autocommit=True) as conn:
        outcome = refresh_view(conn, "visible_events", strategy="swap")
        assert (outcome.mode, outcome.note) == (RefreshMode.SWAP, "")
        swapped = ids(conn)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        assert swapped == list(range(3, 34, 3))
        admin.execute("REFRESH MATERIALIZED VIEW visible_events")
        assert ids(admin) == swapped  # what a plain REFRESH stores


def test_swap_fails_as_refresh_does_when_the_owner_may_not_read_a_source(owned_view):
    admin_url, _ = owned_view
    with psycopg.connect(admin_url, autocommit=True) as admin:
        owner = admin.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'visible_events'").fetchone()[0]
        admin.execute(sql.SQL("REVOKE SELECT ON tenant_events FROM {}").format(sql.Identifier(owner)))
        admin.execute("INSERT INTO tenant_events VALUES (33, 'ours')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), admin.transaction():
            admin.execute("REFRESH MATERIALIZED VIEW visible_events")

        with pytest.raises(RefreshError, match="permission denied for table tenant_events"):
            refresh_view(admin, "visible_events", strategy="swap")

        assert ids(admin) == list(range(3, 31, 3))  # its previous contents
        assert admin.execute("SELECT count(*) FROM pg_class WHERE relname LIKE '%%__swap'").fetchone()[0] == 0


def test_the_least_privilege_refresher_falls_back_to_concurrently_on_the_swap_path(refresher, monkeypatch):  # noqa: F811
    monkeypatch.setattr(swap, "SWAP_MIN_ROWS", 1)  # every view is large enough for `auto`
    with psycopg.connect(refresher, autocommit=True) as conn:
        pg17 = conn.execute("SELECT current_setting('server_version_num')::int >= 170000").fetchone()[0]
        # Before 17 the role owns the views and lacks CREATE on the schema; from 17 it has MAINTAIN, not ownership.
        reason = "an owner whose rights the refreshing role does not have" if pg17 else "a schema the refreshing role may not create in"
        for strategy in ("auto", "swap"):
            outcome = refresh_view(conn, "daily_aggregations", strategy=strategy)
            assert outcome.mode == RefreshMode.CONCURRENT
            assert outcome.note.startswith("build-and-swap does not apply: ") and reason in outcome.note


def test_the_refresher_swaps_once_it_may_create_in_the_schema_where_it_owns_the_views(refresher, seeded_db):  # noqa: F811
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        if admin.execute("SELECT current_setting('server_version_num')::int >= 170000").fetchone()[0]:
            pytest.skip("from PostgreSQL 17 the refresher has MAINTAIN and does not own the views")
        role = admin.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'daily_aggregations'").fetchone()[0]
        admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        plain = admin.execute("SELECT * FROM daily_aggregations ORDER BY day").fetchall()
    with psycopg.connect(refresher, autocommit=True) as conn:
        outcome = refresh_view(conn, "daily_aggregations", strategy="swap")
        assert (outcome.mode, outcome.note) == (RefreshMode.SWAP, "")
        assert conn.execute("SELECT * FROM daily_aggregations ORDER BY day").fetchall() == plain
        assert conn.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'daily_aggregations'").fetchone()[0] == role
