"""Observed sources: every source relation is an observable source asset; the sensor observes all of them in
one look and records an observation only for a source whose data version changed; one that cannot be observed
says why, with a new version at each look."""

import time

import dagster as dg
import psycopg

from analytics_views.definitions import defs
from analytics_views.orchestration.observed_sources import (
    OBSERVATION_NOTE,
    OBSERVE_JOB,
    OBSERVE_SENSOR,
    observe,
)
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views_tests.orchestration.test_assets import wait_until_counted

SOURCES = {"campaign_spend", "campaigns", "events", "payments", "users"}


CURSOR: dict = {}


def evaluate(instance: dg.DagsterInstance, url: str):
    sensor = defs.get_sensor_def(OBSERVE_SENSOR)
    context = dg.build_sensor_context(
        instance=instance, cursor=CURSOR.get(url), resources={"analytics_db": AnalyticsDatabase(url=url)}
    )
    return sensor(context)


def recorded(instance: dg.DagsterInstance, result, url: str) -> dict[str, str]:
    """Records the sensor's observations and cursor as the daemon does; {source: data version}."""
    if isinstance(result, dg.SkipReason):
        return {}
    CURSOR[url] = result.cursor
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return {event.asset_key.to_user_string(): event.tags["dagster/data_version"] for event in result.asset_events}


def test_every_source_is_an_observable_asset_of_one_step_with_its_own_job_and_running_sensor():
    graph = defs.resolve_asset_graph()
    observable = {key.to_user_string() for key in graph.get_all_asset_keys() if graph.get(key).is_observable}
    assert observable == SOURCES
    job = defs.resolve_job_def(OBSERVE_JOB)
    assert [node.name for node in job.graph.nodes] == ["observe_sources"]
    sensor = defs.get_sensor_def(OBSERVE_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 60


def test_the_sensor_records_a_source_only_when_its_version_changed(seeded_db):
    instance = dg.DagsterInstance.ephemeral()
    first = recorded(instance, evaluate(instance, seeded_db), seeded_db)
    assert set(first) == SOURCES  # never observed: every source

    # Nothing written: no observation at all (the seed's sessions are gone, so every version is settled).
    deadline = time.monotonic() + 20
    while not isinstance(result := evaluate(instance, seeded_db), dg.SkipReason) and time.monotonic() < deadline:
        recorded(instance, result, seeded_db)
        time.sleep(1)
    assert isinstance(result, dg.SkipReason) and result.skip_message.startswith("no source changed (5 sources observed in")

    with psycopg.connect(seeded_db, autocommit=True) as conn:
        counted = conn.execute("SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'payments'::regclass").fetchone()[0]
        conn.execute("INSERT INTO payments (user_id, amount, paid_at) SELECT user_id, 1.00, now() FROM users LIMIT 1")
    wait_until_counted(seeded_db, "payments", counted)
    changed = recorded(instance, evaluate(instance, seeded_db), seeded_db)
    assert set(changed) == {"payments"}
    assert changed["payments"] != first["payments"]


def test_a_source_that_cannot_be_observed_says_why_and_gets_a_new_version_at_each_look(seeded_db):
    relations = {dg.AssetKey("users"): '"users"', dg.AssetKey("gone"): '"no_such_table"'}
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        first = {o.asset_key.to_user_string(): o for o in observe(conn, relations)}
        time.sleep(0.01)
        again = {o.asset_key.to_user_string(): o for o in observe(conn, relations, {k: "x" for k in relations})}
    assert first["gone"].metadata[OBSERVATION_NOTE].text == (
        "cannot be observed: it does not exist (dropped or renamed); a new version at each look"
    )
    assert first["gone"].tags["dagster/data_version"].startswith("unobserved@")
    assert again["gone"].tags["dagster/data_version"] != first["gone"].tags["dagster/data_version"]
    # users' version is its digest once no session may hold uncounted writes (the seed's, on a loaded machine,
    # can take a few seconds to count as idle: until then it is unsettled, new at each look, as it must be).
    deadline = time.monotonic() + 20
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        while (users := observe(conn, {dg.AssetKey("users"): '"users"'})[0]).tags["dagster/data_version"].startswith("unsettled@"):
            assert time.monotonic() < deadline, users.metadata[OBSERVATION_NOTE]
            time.sleep(0.5)
    assert len(users.tags["dagster/data_version"]) == 32


def test_the_observation_job_observes_every_source_in_one_step(seeded_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    result = defs.resolve_job_def(OBSERVE_JOB).execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    observed = {e.asset_key.to_user_string() for e in result.get_asset_observation_events()}
    assert observed == SOURCES


def test_a_refresh_records_the_observed_version_of_each_source_it_read(seeded_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    instance = dg.DagsterInstance.ephemeral()
    observed = recorded(instance, evaluate(instance, seeded_db), seeded_db)

    result = defs.resolve_job_def("weekly_refresh_job").execute_in_process(instance=instance)

    [event] = result.get_asset_materialization_events()
    tags = event.materialization.tags
    inputs = {tag.removeprefix("dagster/input_data_version/"): v for tag, v in tags.items() if "input_data_version" in tag}
    assert inputs and inputs == {source: observed[source] for source in inputs}
