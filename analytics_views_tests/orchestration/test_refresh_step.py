"""A cadence's one step over many views (refresh_step.py): dependency order, a failed view failing alone and
naming the views it held back, skips, retries, and the definition checks' own job and sensor."""

import contextlib
from unittest import mock
import json
import threading
import time

import dagster as dg
import psycopg
import pytest

from analytics_views.postgres.modes import RefreshMode
from analytics_views.operations import commands
from analytics_views.orchestration.component import DEFS_ENV, MaterializedViewsComponent, discover_views, load_definitions, load_views
from analytics_views.orchestration.translator import ViewTranslator
from analytics_views.orchestration.definition_checks import SENSOR_NAME
from analytics_views.orchestration.refresh_step import NOT_REFRESHED
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.orchestration import view_checks
from analytics_views.orchestration.view_checks import STATIC_CHECKS

# A chain a -> b -> c (each reads the one before) and two views reading the source alone.
CHAIN = """
CREATE TABLE public.source (id bigint PRIMARY KEY, k integer NOT NULL);
INSERT INTO public.source SELECT g, g % 10 FROM generate_series(1, 1000) AS g;
CREATE SCHEMA mv;
CREATE MATERIALIZED VIEW mv.a AS SELECT k, count(*) AS n FROM public.source GROUP BY k;
CREATE UNIQUE INDEX ON mv.a (k);
CREATE MATERIALIZED VIEW mv.b AS SELECT k, n * 2 AS n FROM mv.a;
CREATE UNIQUE INDEX ON mv.b (k);
CREATE MATERIALIZED VIEW mv.c AS SELECT k, n + 1 AS n FROM mv.b;
CREATE UNIQUE INDEX ON mv.c (k);
CREATE MATERIALIZED VIEW mv.d AS SELECT k, max(id) AS top FROM public.source GROUP BY k;
CREATE UNIQUE INDEX ON mv.d (k);
CREATE MATERIALIZED VIEW mv.e AS SELECT k, min(id) AS bottom FROM public.source GROUP BY k;
CREATE UNIQUE INDEX ON mv.e (k);
"""
VIEWS = ["mv/a", "mv/b", "mv/c", "mv/d", "mv/e"]


@pytest.fixture
def chain(empty_db, tmp_path, monkeypatch) -> tuple[dg.Definitions, str]:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(CHAIN)
    config = tmp_path / "defs.yaml"
    config.write_text("type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [mv]\n")
    monkeypatch.setenv(DEFS_ENV, str(config))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    discover_views()
    return load_definitions(), empty_db


def run_daily(defs: dg.Definitions, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def("daily_refresh_job").execute_in_process(instance=instance, raise_on_error=False, **kwargs)


def materialized(result: dg.ExecuteInProcessResult) -> list[str]:
    return [event.asset_key.to_user_string() for event in result.get_asset_materialization_events()]


def notes(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Why each view refreshed as it did (its refresh note), for an assertion's message."""
    return {
        event.asset_key.to_user_string(): event.materialization.metadata.get("analytics_views/refresh_note", "")
        for event in result.get_asset_materialization_events()
    }


def modes(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {
        event.asset_key.to_user_string(): event.materialization.metadata["analytics_views/refresh_mode"].value
        for event in result.get_asset_materialization_events()
    }


def test_a_cadences_views_refresh_in_one_step_each_after_the_views_it_reads(chain):
    defs, _ = chain
    job = defs.resolve_job_def("daily_refresh_job")
    assert [node.name for node in job.graph.nodes] == ["refresh_daily_views"]

    result = run_daily(defs, dg.DagsterInstance.ephemeral())

    assert result.success
    order = materialized(result)
    assert sorted(order) == VIEWS
    assert order.index("mv/a") < order.index("mv/b") < order.index("mv/c")
    # Each view has its own materialization and unique_index result, not the definition checks.
    checks = {(e.asset_key.to_user_string(), e.check_name) for e in result.get_asset_check_evaluations()}
    assert checks == {(view, "unique_index") for view in VIEWS}


def test_a_failed_view_fails_alone_and_the_views_reading_it_say_why(chain):
    defs, url = chain
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP INDEX mv.a_k_idx")

    result = run_daily(defs, dg.DagsterInstance.ephemeral())

    assert not result.success
    assert sorted(materialized(result)) == ["mv/d", "mv/e"]
    [failure] = [event for event in result.all_events if event.is_step_failure]
    not_refreshed = failure.step_failure_data.user_failure_data.metadata[NOT_REFRESHED].value
    assert list(not_refreshed) == ["mv.a", "mv.b", "mv.c"]
    assert not_refreshed["mv.a"].startswith("mv.a has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY")
    assert not_refreshed["mv.b"] == "not refreshed: it reads mv.a, which failed"
    assert not_refreshed["mv.c"] == "not refreshed: it reads mv.a, which failed"
    message = failure.step_failure_data.error.message
    assert "mv.a: mv.a has no unique index" in message and "mv.c: not refreshed: it reads mv.a, which failed" in message


def test_a_selection_refreshes_only_the_selected_views(chain):
    defs, _ = chain
    result = run_daily(defs, dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(["mv", "c"]), dg.AssetKey(["mv", "d"])])
    assert result.success
    assert sorted(materialized(result)) == ["mv/c", "mv/d"]


SEEN_BY_EXECUTE: list[list[str]] = []


class AuditedViews(MaterializedViewsComponent):
    """A team's subclass wrapping the component's `execute`, named by its defs.yaml's `type:`."""

    def execute(self, context, analytics_db, views):
        SEEN_BY_EXECUTE.append([view.key.to_user_string() for view in views])
        yield from super().execute(context, analytics_db, views)


def test_a_component_subclass_named_by_the_defs_yaml_wraps_execute_for_the_selected_views(chain, tmp_path):
    (tmp_path / "defs.yaml").write_text(f"type: {__name__}.AuditedViews\nattributes:\n  schemas: [mv]\n")  # the chain's DEFS_ENV
    discover_views()  # the subclass keeps its state under its own name, as Dagster's loader would
    SEEN_BY_EXECUTE.clear()

    result = run_daily(load_definitions(), dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(["mv", "b"]), dg.AssetKey(["mv", "c"])])

    assert result.success
    assert SEEN_BY_EXECUTE == [["mv/b", "mv/c"]]
    assert materialized(result) == ["mv/b", "mv/c"]  # in dependency order, by the default execute


class TeamKeys(ViewTranslator):
    """A team's key rule: its views under its own prefix."""

    def get_asset_key(self, view):
        return super().get_asset_key(view).with_prefix("team")


def test_views_under_keys_a_translator_changed_refresh_in_dependency_order_and_the_stats_find_them(chain, tmp_path):
    (tmp_path / "defs.yaml").write_text(
        f"type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [mv]\n  translator_class: {__name__}.TeamKeys\n"
    )
    loaded = load_views()

    with dg.instance_for_test() as instance:
        result = run_daily(loaded.defs, instance)
        assert result.success
        order = materialized(result)
        assert sorted(order) == [f"team/{view}" for view in VIEWS]
        assert order.index("team/mv/a") < order.index("team/mv/b") < order.index("team/mv/c")
        # The command's stats read each view's last refresh and checks under its new key.
        with mock.patch.object(commands, "instance", lambda **_: contextlib.nullcontext(instance)):
            stats = {row.view: row for row in commands.view_stats(chain[1], loaded)}
    assert stats["mv.c"].last_refreshed is not None and stats["mv.c"].failing_checks == ()


def test_a_view_reading_a_view_refreshed_in_the_run_is_never_skipped(chain):
    defs, url = chain
    instance = dg.DagsterInstance.ephemeral()
    assert run_daily(defs, instance).success
    again = run_daily(defs, instance)
    assert set(modes(again).values()) == {RefreshMode.SKIPPED}, notes(again)  # nothing changed

    # Only mv.a's source changes; mv.b and mv.c read it through mv.a, refreshed earlier in the same run.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO public.source VALUES (5000, 3)")
    from analytics_views_tests.orchestration.test_assets import wait_until_counted

    wait_until_counted(url, "public.source", 1000)
    refreshed = modes(run_daily(defs, instance))
    assert refreshed["mv/a"] != RefreshMode.SKIPPED and refreshed["mv/b"] != RefreshMode.SKIPPED and refreshed["mv/c"] != RefreshMode.SKIPPED
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT n FROM mv.c WHERE k = 3").fetchone()[0] == 101 * 2 + 1


def test_a_transient_failure_is_retried_for_that_view_alone(chain, monkeypatch):
    from analytics_views.orchestration import refresh_step
    from analytics_views.postgres.refresh import RefreshError

    defs, _ = chain
    monkeypatch.setattr(refresh_step, "TRANSIENT_RETRY", dg.RetryPolicy(max_retries=3, delay=0.01))
    failures = {"mv.d": 2}
    original = refresh_step.refresh_in_dependency_order

    def flaky(context, analytics_db, views, refresh_one, **keys):
        def first_fails(conn, view, last_metadata, options):
            if failures.get(view.label, 0):
                failures[view.label] -= 1
                raise RefreshError(f"refresh of {view.label} interrupted (server restarting)", transient=True)
            return refresh_one(conn, view, last_metadata, options)

        return original(context, analytics_db, views, first_fails, **keys)

    monkeypatch.setattr("analytics_views.orchestration.assets.refresh_in_dependency_order", flaky)
    with dg.instance_for_test() as instance:
        result = run_daily(defs, instance)
        retries = [e.user_message for e in instance.all_logs(result.run_id) if "; retry " in e.user_message]
    assert result.success and sorted(materialized(result)) == VIEWS
    assert [line.split("; retry ")[1].split(" in ")[0] for line in retries] == ["1 of 3", "2 of 3"]
    assert all(line.startswith("mv.d: refresh of mv.d interrupted") for line in retries)


def test_a_failure_that_keeps_coming_back_names_its_cause_and_the_fix(chain, monkeypatch):
    from analytics_views.orchestration import refresh_step
    from analytics_views.postgres.refresh import RefreshError

    defs, _ = chain
    monkeypatch.setattr(refresh_step, "TRANSIENT_RETRY", dg.RetryPolicy(max_retries=3, delay=0.01))
    original = refresh_step.refresh_in_dependency_order

    def always_terminated(context, analytics_db, views, refresh_one, **keys):
        def fails(conn, view, last_metadata, options):
            if view.label == "mv.d":
                raise RefreshError(f"refresh of {view.label} interrupted (terminating connection due to administrator command)", transient=True)
            return refresh_one(conn, view, last_metadata, options)

        return original(context, analytics_db, views, fails, **keys)

    monkeypatch.setattr("analytics_views.orchestration.assets.refresh_in_dependency_order", always_terminated)
    with dg.instance_for_test() as instance:
        result = run_daily(defs, instance)
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    reasons = failure.step_failure_data.user_failure_data.metadata[refresh_step.NOT_REFRESHED].value
    assert reasons["mv.d"] == (
        "refresh of mv.d interrupted (terminating connection due to administrator command); "
        + refresh_step.GAVE_UP.format(attempts=4)
    )
    assert "max_retries" not in str(reasons)


def test_the_definition_checks_run_when_a_definition_changes_and_not_in_refresh_runs(chain):
    defs, url = chain
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    resources = {"analytics_db": AnalyticsDatabase(url=url)}
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None):
            context = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
            return sensor(context), context.cursor

        request, cursor = tick(None)
        assert {(key.asset_key.to_user_string(), key.name) for key in request.asset_check_keys} == {
            (view, check) for view in VIEWS for check in ("matches_discovery", *STATIC_CHECKS)
        }
        # Nothing changed: nothing to evaluate.
        skipped, cursor = tick(cursor)
        assert isinstance(skipped, dg.SkipReason)
        # A new index on mv.b changes what the checks of mv.b (its own indexes) and mv.c (what it reads) read.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE UNIQUE INDEX ON mv.b (n, k)")
        request, cursor = tick(cursor)
        assert {key.asset_key.to_user_string() for key in request.asset_check_keys} == {"mv/b", "mv/c"}
        assert set(json.loads(cursor)) == {"mv.a", "mv.b", "mv.c", "mv.d", "mv.e"}

        # The job the sensor asks for evaluates exactly those checks; on demand, every view's.
        result = defs.resolve_job_def("definition_checks_job").execute_in_process(
            instance=instance, raise_on_error=False, tags={}
        )
        evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
        assert set(evaluations) == {(view, check) for view in VIEWS for check in ("matches_discovery", *STATIC_CHECKS)}
        assert evaluations[("mv/b", "matches_discovery")].passed


def populated_by_refresh(check: view_checks.CheckInput) -> dg.AssetCheckResult:
    """A team's catalog check: the view is not a plain view's copy made by hand (here: it is populated)."""
    return dg.AssetCheckResult(asset_key=check.key, check_name="populated", passed=check.state.populated)


def owned_by_the_connecting_role(check: view_checks.CheckInput) -> dg.AssetCheckResult:
    owner = check.conn.execute("SELECT pg_get_userbyid(relowner) = current_user FROM pg_class WHERE oid = %s::regclass", [check.view.label]).fetchone()[0]
    return dg.AssetCheckResult(asset_key=check.key, check_name="owned_by_refresher", passed=owner)


def test_a_catalog_check_is_one_entry_of_the_list_evaluated_when_it_says(chain, monkeypatch):
    """Adding a check is one ViewCheck in view_checks.CHECKS: a REFRESH one is declared on every view and
    evaluated before each refresh (an ERROR one failing stops the view and the views reading it); a DEFINITION
    one joins the definition checks' job."""
    _, url = chain
    extra = (
        view_checks.ViewCheck("populated", "The view holds rows.", view_checks.REFRESH, populated_by_refresh, severity=dg.AssetCheckSeverity.ERROR),
        view_checks.ViewCheck("owned_by_refresher", "The refreshing role owns the view.", view_checks.DEFINITION, owned_by_the_connecting_role),
    )
    monkeypatch.setattr(view_checks, "CHECKS", (*view_checks.CHECKS, *extra))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP MATERIALIZED VIEW mv.c; CREATE MATERIALIZED VIEW mv.c AS SELECT k, n + 1 AS n FROM mv.b WITH NO DATA")
        conn.execute("CREATE UNIQUE INDEX ON mv.c (k)")
    defs = load_definitions()

    graph = defs.resolve_asset_graph()
    assert {key.name for key in graph.asset_check_keys if key.asset_key == dg.AssetKey(["mv", "c"])} == {
        "unique_index", "populated", *(name for name in ("matches_discovery", *STATIC_CHECKS)), "owned_by_refresher"
    }
    result = run_daily(defs, dg.DagsterInstance.ephemeral())
    populated = {e.asset_key.to_user_string(): e.passed for e in result.get_asset_check_evaluations() if e.check_name == "populated"}
    assert populated == {"mv/a": True, "mv/b": True, "mv/c": False, "mv/d": True, "mv/e": True}
    assert sorted(materialized(result)) == ["mv/a", "mv/b", "mv/d", "mv/e"]  # mv.c stopped by its ERROR check

    checks = defs.resolve_job_def("definition_checks_job").execute_in_process(raise_on_error=False)
    owned = {e.asset_key.to_user_string(): e.passed for e in checks.get_asset_check_evaluations() if e.check_name == "owned_by_refresher"}
    assert owned == {view: True for view in VIEWS}


def test_a_failed_blocking_check_stops_the_views_reading_its_view_naming_the_check(empty_db, tmp_path, monkeypatch):
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(CHAIN)
    for folder, test in (
        ("mv.a", "-- Every group holds a thousand rows.\n-- Severity: error\nSELECT k FROM mv.a WHERE n < 1000\n"),
        ("mv.d", "-- Every top id is over a thousand.\n-- Severity: warn\nSELECT k FROM mv.d WHERE top < 1000\n"),
    ):
        (tmp_path / "tests" / folder).mkdir(parents=True)
        (tmp_path / "tests" / folder / "big_groups.sql").write_text(test)
    config = tmp_path / "defs.yaml"
    config.write_text("type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [mv]\n  data_tests: tests\n")
    monkeypatch.setenv(DEFS_ENV, str(config))
    monkeypatch.setenv("DATABASE_URL", empty_db)
    discover_views()
    defs = load_definitions()
    graph = defs.resolve_asset_graph()
    blocking = {key.to_user_string() for key in graph.asset_check_keys if graph.get_check_spec(key).blocking}
    assert blocking == {f"{view}:unique_index" for view in VIEWS} | {"mv/a:big_groups"}  # the warn test is not

    result = run_daily(defs, dg.DagsterInstance.ephemeral())

    assert not result.success
    assert sorted(materialized(result)) == ["mv/a", "mv/d", "mv/e"]  # mv.d's failed warn test blocks nothing
    [failure] = [event for event in result.all_events if event.is_step_failure]
    not_refreshed = failure.step_failure_data.user_failure_data.metadata[NOT_REFRESHED].value
    assert not_refreshed == {
        "mv.b": "not refreshed: it reads mv.a, whose blocking check big_groups failed",
        "mv.c": "not refreshed: it reads mv.a, whose blocking check big_groups failed",
    }


def test_the_event_write_gate_keeps_the_steps_event_writes_and_the_skip_proofs_looks_apart(monkeypatch):
    from analytics_views.orchestration.refresh_step import EventWriteGate

    gate, seen = EventWriteGate(), []
    looking, write_waits = threading.Event(), threading.Event()

    def look():
        with gate.looking():
            seen.append("look starts")
            looking.set()
            write_waits.wait(5)
            time.sleep(0.1)  # the write is waiting meanwhile
            seen.append("look ends")

    def write():
        looking.wait(5)
        write_waits.set()
        with gate.writing():
            seen.append("write")

    threads = [threading.Thread(target=look), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == ["look starts", "look ends", "write"]

    # A look waits for a write in progress, and goes on after LOOK_WAIT_S if the write never ends (a step
    # whose consumer never came back): the gate spares tries, the proof does not rely on it.
    monkeypatch.setattr(EventWriteGate, "LOOK_WAIT_S", 0.2)
    with gate.writing():
        started = time.monotonic()
        with gate.looking():
            assert 0.15 < time.monotonic() - started < 2


def test_a_skip_proof_looks_while_the_steps_own_event_writes_are_held(chain):
    from analytics_views.postgres import write_quiescence
    from analytics_views.postgres.refresh import RefreshSettings, refresh_view

    defs, url = chain
    assert run_daily(defs, dg.DagsterInstance.ephemeral()).success
    held = []

    @contextlib.contextmanager
    def own_writes_held():
        held.append("held")
        yield

    with psycopg.connect(url, autocommit=True) as conn:
        forced = refresh_view(conn, "a", RefreshSettings(), schema="mv", own_writes_held=own_writes_held)
        assert forced.mode != RefreshMode.SKIPPED and held == []  # no proof, nothing held
        time.sleep(write_quiescence.QUIET_AFTER_S + 0.5)  # the fixture's sessions, idle since their writes, reported
        skipped = refresh_view(
            conn, "a", RefreshSettings(), schema="mv", skip_if_unchanged_since=forced.sources_fingerprint,
            own_writes_held=own_writes_held,
        )
    assert skipped.mode == RefreshMode.SKIPPED, skipped.note
    assert held and len(held) <= 8  # once a try
