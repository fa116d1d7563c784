"""Every refresh runs under the configured TimeZone (default UTC), whatever the client's session settings."""

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from analytics_views.postgres.refresh import RefreshError, RefreshSettings, refresh_view
from analytics_views_tests.orchestration.test_assets import materialization_metadata, run_job

VIEW = "daily_activity"  # buckets with date(received_at) and current_date: the session's zone decides its days


def contents(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT day, active_users, events FROM product.daily_activity ORDER BY day").fetchall()


def client(url: str, timezone: str | None = None) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, **({"options": f"-c TimeZone={timezone}"} if timezone else {}))


def differing_days(left: list[tuple], right: list[tuple]) -> int:
    return len(set(left) ^ set(right))


def test_clients_with_different_time_zone_options_store_identical_contents(product_db):
    with client(product_db) as utc:
        refresh_view(utc, VIEW, schema="product")
        expected = contents(utc)
    with client(product_db, "America/Los_Angeles") as los_angeles:
        # What a refresh did before: the client's zone decided the days.
        los_angeles.execute("REFRESH MATERIALIZED VIEW product.daily_activity")
        assert differing_days(contents(los_angeles), expected) > 0
        assert refresh_view(los_angeles, VIEW, schema="product").note == ""
        assert contents(los_angeles) == expected
        assert los_angeles.execute("SHOW TimeZone").fetchone()[0] == "America/Los_Angeles"  # SET LOCAL ended
    with client(product_db, "Asia/Tokyo") as tokyo:
        refresh_view(tokyo, VIEW, schema="product")
        assert contents(tokyo) == expected
    assert sum(events for _, _, events in expected) > 0


def test_the_roles_and_the_databases_time_zone_settings_do_not_change_the_contents(product_db):
    with client(product_db) as utc:
        refresh_view(utc, VIEW, schema="product")
        expected = contents(utc)
        database = sql.Identifier(utc.info.dbname)
        utc.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Tokyo'").format(database))
        utc.execute(sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET TimeZone = 'Pacific/Honolulu'").format(database))
    with client(product_db) as honolulu:
        assert honolulu.execute("SHOW TimeZone").fetchone()[0] == "Pacific/Honolulu"
        honolulu.execute("REFRESH MATERIALIZED VIEW product.daily_activity")
        assert differing_days(contents(honolulu), expected) > 0
        refresh_view(honolulu, VIEW, schema="product")
        assert contents(honolulu) == expected


def test_the_configured_zone_decides_the_days(product_db):
    with client(product_db, "America/Los_Angeles") as conn:
        refresh_view(conn, VIEW, RefreshSettings(timezone="Asia/Tokyo"), schema="product")
        stored = contents(conn)
        with conn.transaction():
            conn.execute("SET LOCAL TimeZone = 'Asia/Tokyo'")
            query = conn.execute("SELECT pg_get_viewdef('product.daily_activity'::regclass)").fetchone()[0].rstrip(";")
            expected = conn.execute(sql.SQL("SELECT * FROM ({}) AS q ORDER BY day").format(sql.SQL(query))).fetchall()
        assert stored == expected


def test_an_unknown_zone_is_one_line_naming_the_setting_and_the_fix(product_db):
    with client(product_db) as conn, pytest.raises(RefreshError) as raised:
        refresh_view(conn, VIEW, RefreshSettings(timezone="Mars/Olympus_Mons"), schema="product")
    assert str(raised.value) == (
        "timezone 'Mars/Olympus_Mons' of the analytics_db resource is not a time zone PostgreSQL knows: "
        "set it to a name from pg_timezone_names, such as 'UTC' or 'Europe/Berlin'"
    )
    assert not raised.value.transient


def test_the_refresh_zone_is_recorded_in_the_materialization(seeded_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    configured = {"resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "timezone": "Asia/Tokyo"}}}}
    default, tokyo = run_job("daily_refresh_job"), run_job("daily_refresh_job", run_config=configured)
    assert default.success and tokyo.success
    assert materialization_metadata(default, "daily_aggregations")["analytics_views/refresh_timezone"] == "UTC"
    assert materialization_metadata(tokyo, "daily_aggregations")["analytics_views/refresh_timezone"] == "Asia/Tokyo"
    # Another zone is another fingerprint: the first refresh in it runs.
    assert materialization_metadata(tokyo, "daily_aggregations")["analytics_views/refresh_mode"] != "skipped (sources unchanged)"
    wrong = run_job("daily_refresh_job", run_config={
        "resources": {"analytics_db": {"config": {"url": {"env": "DATABASE_URL"}, "timezone": "Nowhere/Land"}}}
    })
    assert not wrong.success
    failure = next(event for event in wrong.all_events if event.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "timezone 'Nowhere/Land' of the analytics_db resource is not a time zone" in failure.step_failure_data.error.message
