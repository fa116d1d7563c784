"""Declared freshness: a cadence with `target_lag` gives its views an automation condition that requests a
refresh once a source they read has a new data version (and a view over a view with it), none when nothing
changed; evaluated with Dagster's public test tool for automation (`dg.evaluate_automation_conditions`)."""

import datetime
from datetime import timedelta

import dagster as dg
import psycopg
import pytest

from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration.cadences import lag_cron
from analytics_views.orchestration.component import DEFS_ENV, discover_views, load_definitions
from analytics_views.orchestration.jobs import AUTOMATION_SENSOR
from analytics_views.orchestration.observed_sources import OBSERVE_SENSOR
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.managed import parse_target_lag
from analytics_views_tests.orchestration.test_assets import wait_until_counted

# busy is written, quiet never; lag.b reads lag.a (a view over a view); lag.q reads quiet.
SCHEMA = """
CREATE TABLE public.busy (id bigint PRIMARY KEY, k integer NOT NULL);
INSERT INTO public.busy SELECT g, g % 10 FROM generate_series(1, 100) AS g;
CREATE TABLE public.quiet (id bigint PRIMARY KEY, k integer NOT NULL);
INSERT INTO public.quiet SELECT g, g % 10 FROM generate_series(1, 100) AS g;
CREATE SCHEMA lag;
CREATE MATERIALIZED VIEW lag.a AS SELECT k, count(*) AS n FROM public.busy GROUP BY k;
CREATE UNIQUE INDEX ON lag.a (k);
CREATE MATERIALIZED VIEW lag.b AS SELECT k, n * 2 AS n FROM lag.a;
CREATE UNIQUE INDEX ON lag.b (k);
CREATE MATERIALIZED VIEW lag.q AS SELECT k, count(*) AS n FROM public.quiet GROUP BY k;
CREATE UNIQUE INDEX ON lag.q (k);
"""
DEFS = """type: analytics_views.MaterializedViewsComponent
attributes:
  schemas: [lag]
  cadences:
    fresh: {target_lag: 10m}
  cadence: {"lag.*": fresh}
"""


@pytest.fixture
def lagged(empty_db, tmp_path, monkeypatch):
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    (tmp_path / "defs.yaml").write_text(DEFS)
    monkeypatch.setenv(DEFS_ENV, str(tmp_path / "defs.yaml"))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    discover_views()
    return load_definitions(), empty_db


def observe(defs: dg.Definitions, instance: dg.DagsterInstance, url: str, cursor: str | None) -> str | None:
    """One tick of the sources' sensor, its observations recorded as the daemon records them."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"analytics_db": AnalyticsDatabase(url=url)})
    result = defs.get_sensor_def(OBSERVE_SENSOR)(context)
    if isinstance(result, dg.SkipReason):
        return cursor
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result.cursor


def write_busy_and_observe(defs: dg.Definitions, instance: dg.DagsterInstance, url: str, cursor: str | None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        counted = conn.execute("SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'busy'::regclass").fetchone()[0]
        conn.execute("INSERT INTO public.busy VALUES (1000, 3)")
    wait_until_counted(url, "busy", counted)
    observe(defs, instance, url, cursor)


def requested(result, views=("lag/a", "lag/b", "lag/q")) -> set[str]:
    return {view for view in views if result.get_requested_partitions(dg.AssetKey.from_user_string(view))}


def test_a_lag_cadence_has_no_schedule_its_own_running_automation_sensor_and_a_lag_freshness(lagged):
    defs, _ = lagged
    assert [s.name for s in defs.schedules] == []
    sensor = defs.get_sensor_def(AUTOMATION_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    for view in ("lag/a", "lag/b", "lag/q"):
        assert specs[view].automation_condition is not None
        assert specs[view].freshness_policy.warn_window.to_timedelta() == timedelta(minutes=10)
    assert specs["busy"].automation_condition is None


def test_a_view_is_requested_when_its_source_changed_with_the_view_over_it_and_not_when_nothing_changed(lagged):
    defs, url = lagged
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def("fresh_refresh_job").execute_in_process(instance=instance).success
    cursor = observe(defs, instance, url, None)  # every source's first observation
    start = datetime.datetime.now(datetime.timezone.utc)

    # Nothing changed after the sources' first observation: nothing is requested, tick after tick.
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=start)
    second = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=first.cursor, evaluation_time=start + timedelta(minutes=6)
    )
    quiet = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=second.cursor, evaluation_time=start + timedelta(minutes=12)
    )
    assert (first.total_requested, second.total_requested, quiet.total_requested) == (0, 0, 0)

    write_busy_and_observe(defs, instance, url, cursor)
    changed = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=quiet.cursor, evaluation_time=start + timedelta(minutes=18)
    )
    assert requested(changed) == {"lag/a", "lag/b"}  # the view over the source, the view over it; not the one over quiet
    again = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=changed.cursor, evaluation_time=start + timedelta(minutes=24)
    )
    assert again.total_requested == 0  # requested once per change


@pytest.mark.parametrize(
    ("lag", "cron"),
    [(timedelta(minutes=2), "* * * * *"), (timedelta(minutes=15), "*/6 * * * *"), (timedelta(hours=3), "0 * * * *"),
     (timedelta(hours=5), "0 */2 * * *"), (timedelta(days=3), "0 0 * * *")],
)
def test_the_lag_ticks_at_most_every_half_lag(lag, cron):
    assert lag_cron(lag) == cron


@pytest.mark.parametrize("text", ["1m", "15", "fast", "0m", "90"])
def test_a_target_lag_is_a_number_and_a_unit_of_at_least_two_minutes(text):
    with pytest.raises(AnalyticsViewsError, match="target_lag .* is not a lag of at least 2 minutes"):
        parse_target_lag(text, "defs.yaml: attributes.cadences.fresh")


def test_a_cron_cadence_stays_as_it_was_and_a_lag_beside_a_cron_adds_automation_and_a_warning():
    from analytics_views.orchestration.cadences import freshness_policy, lag_condition
    from analytics_views.sql_files.managed import DEFAULT_CADENCES, Cadence

    daily = DEFAULT_CADENCES["daily"]
    assert lag_condition(daily) is None
    assert freshness_policy(daily).fail_window.to_timedelta() == timedelta(hours=26)
    assert freshness_policy(daily).warn_window is None

    both = Cadence("both", "0 3 * * *", target_lag=timedelta(minutes=15))
    assert lag_condition(both).label == "within its target lag (0:15:00)"
    policy = freshness_policy(both)
    assert (policy.fail_window.to_timedelta(), policy.warn_window.to_timedelta()) == (timedelta(hours=26), timedelta(minutes=15))
    lag_only = Cadence("lag_only", None, target_lag=timedelta(minutes=15))
    assert freshness_policy(lag_only).fail_window.to_timedelta() == timedelta(days=7)


def test_a_view_whose_read_view_failed_a_blocking_check_is_not_requested(empty_db, tmp_path, monkeypatch):
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    (tmp_path / "tests" / "lag.a").mkdir(parents=True)
    (tmp_path / "tests" / "lag.a" / "big_groups.sql").write_text(
        "-- Every group holds a thousand rows.\n-- Severity: error\nSELECT k FROM lag.a WHERE n < 1000\n"
    )
    (tmp_path / "defs.yaml").write_text(DEFS + "  data_tests: tests\n")
    monkeypatch.setenv(DEFS_ENV, str(tmp_path / "defs.yaml"))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    discover_views()
    defs = load_definitions()
    instance = dg.DagsterInstance.ephemeral()
    run = defs.resolve_job_def("fresh_refresh_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not run.success  # lag.a failed its blocking data test: lag.b was not refreshed
    cursor = observe(defs, instance, empty_db, None)
    start = datetime.datetime.now(datetime.timezone.utc)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=start)

    write_busy_and_observe(defs, instance, empty_db, cursor)
    changed = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=first.cursor, evaluation_time=start + timedelta(minutes=6)
    )
    assert requested(changed) == {"lag/a"}  # lag.b reads lag.a, whose blocking check failed
