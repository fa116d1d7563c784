"""Operators hear about failures: a failed run, a failed ERROR check or a late view gives one notice per
destination, with the views, the reason and fix, the launcher and a link; nothing else does.

The destinations are real servers started here on 127.0.0.1: an SMTP server (aiosmtpd, with a login) and an
HTTP server that takes the webhook's POSTs and answers Slack's `chat.postMessage`. Runs are real runs of the
jobs on the test database, recorded in a Dagster instance on PostgreSQL; the sensors are evaluated as the
daemon evaluates them, tick after tick, each tick carrying the previous one's cursor.
"""

import json
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import psycopg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration.component import MaterializedViewsComponent
from analytics_views.orchestration.destinations import Webhook
from analytics_views.orchestration.assets import managed_view_assets
from analytics_views.orchestration.notifications import RUN_LOOK_BACK_S, NotificationSettings, deliver, watched_views
from analytics_views.paths import SQL_DIR
from analytics_views_tests.conftest import DEPLOYMENT_PASSWORD, free_port, with_password
from analytics_views_tests.orchestration.test_component import write_defs_yaml

# The test SMTP server takes a login without TLS, as a relay on the same host would; aiosmtpd warns of it.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

SMTP_USER, SMTP_PASSWORD = "alerts@example.com", "Smtp-pw-never-in-a-notice"
SLACK_TOKEN = "xoxb-token-never-in-a-notice"
WEBHOOK_SECRET = "T0K3N-never-in-a-notice"
SECRETS = (DEPLOYMENT_PASSWORD, SMTP_PASSWORD, SLACK_TOKEN, WEBHOOK_SECRET)
UI = "https://dagster.example.com"


class Mailbox:
    """An SMTP server on 127.0.0.1 that takes mail after a login with SMTP_USER and SMTP_PASSWORD."""

    def __init__(self):
        self.messages = []
        self.logins = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append(auth_data.login.decode())
        return AuthResult(success=(auth_data.login.decode(), auth_data.password.decode()) == (SMTP_USER, SMTP_PASSWORD))


@pytest.fixture
def mailbox():
    box = Mailbox()
    controller = Controller(
        box, hostname="127.0.0.1", port=free_port(), authenticator=box.authenticate, auth_require_tls=False, auth_required=True
    )
    controller.start()
    try:
        yield box, controller.port
    finally:
        controller.stop()


class Receiver(ThreadingHTTPServer):
    """Takes JSON POSTs: the webhook's at any path, and Slack's chat.postMessage, answered as Slack does."""

    def __init__(self, port: int, answer_after_s: float = 0):
        self.requests: list[tuple[str, dict, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                self.requests.append((handler.path, dict(handler.headers), body))
                time.sleep(answer_after_s)
                answer = json.dumps({"ok": True, "channel": "C1", "ts": "1.0"}).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(answer)))
                handler.end_headers()
                handler.wfile.write(answer)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)

    def posted(self, path_prefix: str) -> list[dict]:
        return [json.loads(body) for path, _, body in self.requests if path.startswith(path_prefix)]

    def slack_texts(self) -> list[str]:
        # slack_sdk posts JSON or a form, depending on its version: read either.
        texts = []
        for path, _, body in self.requests:
            if path.endswith("chat.postMessage"):
                try:
                    texts.append(json.loads(body)["text"])
                except ValueError:
                    from urllib.parse import parse_qs

                    texts.append(parse_qs(body.decode())["text"][0])
        return texts


def start_receiver(port: int, answer_after_s: float = 0) -> tuple[Receiver, threading.Thread]:
    receiver = Receiver(port, answer_after_s)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    return receiver, thread


@pytest.fixture
def receiver():
    receiver, thread = start_receiver(free_port())
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(10)


@pytest.fixture
def instance(dagster_instance):
    with dg.DagsterInstance.get() as instance:
        yield instance


def notifying_defs(
    tmp_path, monkeypatch, database_url: str, smtp_port: int, receiver_port: int, webhook_port=None, sql_folder=SQL_DIR
):
    """The project's views with every destination configured, its secrets in the environment."""
    monkeypatch.setenv("DATABASE_URL", with_password(database_url))
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    monkeypatch.setenv("SLACK_BOT_TOKEN", SLACK_TOKEN)
    monkeypatch.setenv("ALERTS_WEBHOOK", f"http://127.0.0.1:{webhook_port or receiver_port}/hooks/{WEBHOOK_SECRET}")
    path = write_defs_yaml(
        tmp_path / "defs.yaml",
        f"""
        sql_folder: {sql_folder}
        notifications:
          ui_url: {UI}
          email: {{smtp_host: 127.0.0.1, smtp_port: {smtp_port}, security: none, sender: {SMTP_USER},
                   to: [data-team@example.com], password_env: SMTP_PASSWORD}}
          slack: {{channel: "#data-alerts", api_url: "http://127.0.0.1:{receiver_port}/api/"}}
          webhook: {{url_env: ALERTS_WEBHOOK}}
        """,
    )
    return MaterializedViewsComponent.from_defs_yaml(path).definitions(None)


class Ticks:
    """A sensor evaluated tick after tick, as the daemon does: each tick starts from the last one's cursor."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, name: str):
        self.sensor = defs.resolve_sensor_def(name)
        self.defs, self.instance, self.cursor = defs, instance, None

    def tick(self) -> dg.SensorResult:
        result = self.sensor(dg.build_sensor_context(instance=self.instance, cursor=self.cursor, definitions=self.defs))
        self.cursor = result.cursor
        return result


def tick_all(defs, instance, ticks: dict | None = None) -> dict:
    ticks = ticks or {name: Ticks(defs, instance, name) for name in ("email_notifications", "slack_notifications", "webhook_notifications")}
    for sensor in ticks.values():
        sensor.tick()
    return ticks


def drop_unique_index(url: str, view: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", [view]).fetchall():
            conn.execute(psycopg.sql.SQL("DROP INDEX {}").format(psycopg.sql.Identifier(index)))


def run_job(defs, instance, job: str, tags: dict) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job).execute_in_process(instance=instance, tags=tags, raise_on_error=False)


SCHEDULED = {"dagster/schedule_name": "daily_refresh_schedule"}
DAILY_FIX = "run `CREATE UNIQUE INDEX daily_aggregations_key ON daily_aggregations (day);` (from views/daily_aggregations.sql)"


def test_a_failed_scheduled_run_gives_one_email_one_slack_and_one_webhook_notice_naming_the_view_and_fix(
    seeded_db, instance, mailbox, receiver, tmp_path, monkeypatch
):
    box, smtp_port = mailbox
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, smtp_port, receiver.server_port)
    ticks = tick_all(defs, instance)  # the sensors' first ticks: nothing to tell yet
    drop_unique_index(seeded_db, "daily_aggregations")

    run = run_job(defs, instance, "daily_refresh_job", SCHEDULED)
    assert not run.success
    for _ in range(3):  # the next ticks find it once
        tick_all(defs, instance, ticks)

    run_url = f"{UI}/runs/{run.run_id}"
    [email] = box.messages
    assert email["Subject"].strip() == "analytics-views: daily_refresh_job failed: daily_aggregations"
    assert email["To"] == "data-team@example.com" and box.logins == [SMTP_USER]
    body = email.get_content()
    assert DAILY_FIX in body and "daily_aggregations has no unique index usable by REFRESH" in body
    assert "(failed checks: unique_index)" in body
    assert "Launched by: schedule daily_refresh_schedule" in body and f"Run: {run_url}" in body

    [hook] = receiver.posted("/hooks/")
    assert hook["kind"] == "run_failure" and hook["views"] == ["daily_aggregations"]
    assert hook["run_id"] == run.run_id and hook["url"] == run_url and hook["job"] == "daily_refresh_job"
    assert hook["launched_by"] == "schedule daily_refresh_schedule"
    [reason] = hook["reasons"]
    assert reason["view"] == "daily_aggregations" and DAILY_FIX in reason["reason"]

    [slack] = receiver.slack_texts()
    assert slack.startswith("*analytics-views: daily_refresh_job failed: daily_aggregations*") and DAILY_FIX in slack


def test_a_view_materialized_by_hand_names_only_the_views_that_failed(seeded_db, instance, receiver, tmp_path, monkeypatch):
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, free_port(), receiver.server_port)
    ticks = {"webhook_notifications": Ticks(defs, instance, "webhook_notifications")}
    tick_all(defs, instance, ticks)
    drop_unique_index(seeded_db, "daily_aggregations")

    # The UI's Materialize on two views: weekly_aggregations, which reads the failed view, still refreshes.
    run = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("daily_aggregations"), dg.AssetKey("weekly_aggregations")],
        raise_on_error=False,
    )
    tick_all(defs, instance, ticks)

    assert not run.success
    [hook] = receiver.posted("/hooks/")
    assert hook["views"] == ["daily_aggregations"] and hook["job"] == "__ASSET_JOB"
    assert hook["subject"] == "analytics-views: Materialize failed: daily_aggregations"
    assert hook["launched_by"] == "by hand (the UI's Materialize, `dg launch` or the GraphQL API)"


def test_a_successful_run_gives_no_notice_and_an_error_check_failing_in_one_gives_one(
    refreshed_db, instance, mailbox, receiver, tmp_path, monkeypatch
):
    box, smtp_port = mailbox
    sql_folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_folder)
    defs = notifying_defs(tmp_path, monkeypatch, refreshed_db, smtp_port, receiver.server_port, sql_folder=sql_folder)
    ticks = tick_all(defs, instance)

    assert run_job(defs, instance, "daily_refresh_job", {}).success
    tick_all(defs, instance, ticks)
    assert box.messages == [] and receiver.requests == []

    (sql_folder / "tests" / "daily_aggregations" / "no_day_before_2000.sql").write_text(
        "-- No day of the window is before 2000 (fails once a day holds a payment: a stand-in for a broken metric).\n"
        "-- Severity: error\nSELECT day FROM daily_aggregations WHERE revenue > 0 ORDER BY day LIMIT 1\n"
    )
    defs = notifying_defs(tmp_path, monkeypatch, refreshed_db, smtp_port, receiver.server_port, sql_folder=sql_folder)
    run = run_job(defs, instance, "daily_refresh_job", {})
    assert run.success  # a failed check does not fail the step: the view refreshed
    tick_all(defs, instance, ticks)
    tick_all(defs, instance, ticks)

    [email] = box.messages
    assert email["Subject"].strip() == "analytics-views: ERROR check failed on daily_aggregations (daily_refresh_job)"
    assert "- daily_aggregations: check no_day_before_2000 failed: 1 failing rows. No day of the window" in email.get_content()
    assert "Launched by: by hand" in email.get_content()
    [hook] = receiver.posted("/hooks/")
    assert hook["kind"] == "check_failure" and hook["run_id"] == run.run_id


def test_no_notice_holds_a_password_or_token(seeded_db, instance, mailbox, receiver, tmp_path, monkeypatch):
    box, smtp_port = mailbox
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, smtp_port, receiver.server_port)
    ticks = tick_all(defs, instance)
    drop_unique_index(seeded_db, "daily_aggregations")
    run_job(defs, instance, "daily_refresh_job", SCHEDULED)
    tick_all(defs, instance, ticks)

    sent = [message.as_string() for message in box.messages] + [
        body.decode() for _, _, body in receiver.requests
    ]
    assert len(sent) == 3
    for text in sent:
        for secret in SECRETS:
            assert secret not in text
    for _, cursor in ((name, sensor.cursor) for name, sensor in ticks.items()):
        assert not any(secret in cursor for secret in SECRETS)


def test_an_unreachable_destination_is_logged_as_one_line_and_retried_until_it_takes_the_notice(
    seeded_db, instance, mailbox, tmp_path, monkeypatch, capfd
):
    box, smtp_port = mailbox
    hook_port = free_port()  # nothing listens there yet
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, smtp_port, free_port(), webhook_port=hook_port)
    webhook = Ticks(defs, instance, "webhook_notifications")
    email = Ticks(defs, instance, "email_notifications")
    webhook.tick(), email.tick()
    drop_unique_index(seeded_db, "daily_aggregations")
    run = run_job(defs, instance, "daily_refresh_job", SCHEDULED)

    capfd.readouterr()
    first = webhook.tick()
    email.tick()
    # The sensor's log: the daemon's output, and the tick's log in the UI.
    warnings = [line for line in capfd.readouterr().err.splitlines() if "notification not delivered" in line]
    assert len(warnings) == 1
    assert (
        f"WARNING - webhook notification not delivered: webhook at http://127.0.0.1:{hook_port} (ALERTS_WEBHOOK): "
        "ConnectionRefusedError: Connection refused; 1 notice(s) wait for the next tick, in 30 s: check that it is "
        "up and reachable from the code location"
    ) in warnings[0]
    assert "1 notice(s) wait for the next tick" in first.skip_reason.skip_message
    assert WEBHOOK_SECRET not in warnings[0]
    assert len(box.messages) == 1  # the other destination is told at once

    second = webhook.tick()  # still down: retried, still waiting
    assert "1 notice(s) wait" in second.skip_reason.skip_message

    receiver, thread = start_receiver(hook_port)
    try:
        webhook.tick()
        webhook.tick()
        [hook] = receiver.posted("/hooks/")
        assert hook["run_id"] == run.run_id
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(10)
    assert not run.success and len(box.messages) == 1


def test_sensors_exist_only_for_the_configured_destinations_and_run_by_default(tmp_path, monkeypatch):
    # Besides the sources' and the definition checks' sensors, which every configuration with views has.
    without = write_defs_yaml(tmp_path / "none" / "defs.yaml", f"sql_folder: {SQL_DIR}")
    assert [s.name for s in MaterializedViewsComponent.from_defs_yaml(without).definitions(None).sensors] == [
        "observe_sources_sensor", "definition_checks_sensor"
    ]

    only_webhook = write_defs_yaml(
        tmp_path / "webhook" / "defs.yaml", f"sql_folder: {SQL_DIR}\nnotifications: {{webhook: {{url_env: HOOK}}}}"
    )
    [sensor] = [
        s for s in MaterializedViewsComponent.from_defs_yaml(only_webhook).definitions(None).sensors
        if s.name not in ("definition_checks_sensor", "observe_sources_sensor")
    ]
    assert sensor.name == "webhook_notifications" and sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30


@pytest.mark.parametrize(
    "notifications, message",
    [
        (
            "{email: {smtp_host: smtp.example.com, sender: a@example.com, to: [b@example.com], password: pw}}",
            "attributes.notifications.email.password: Extra inputs are not permitted: secrets come only from the "
            "environment: name the variable holding it in password_env",
        ),
        (
            "{webhook: {url_env: 'https://hooks.example.com/T0'}}",
            "attributes.notifications.webhook.url_env names the environment variable holding the secret",
        ),
        ("{ui_url: dagster.example.com, webhook: {}}", "attributes.notifications.ui_url is not an http(s) address"),
        (
            "{email: {smtp_host: smtp.example.com, sender: a@example.com, to: []}}",
            "attributes.notifications.email.to is empty: name an address to tell",
        ),
    ],
)
def test_a_notification_setting_that_does_not_fit_is_one_line(tmp_path, notifications, message):
    path = write_defs_yaml(tmp_path / "defs.yaml", f"sql_folder: {SQL_DIR}\nnotifications: {notifications}")
    with pytest.raises(AnalyticsViewsError) as raised:
        MaterializedViewsComponent.from_defs_yaml(path).definitions(None)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_view_turning_late_gives_one_notice_per_late_period(empty_db, instance, receiver, tmp_path, monkeypatch):
    # Lateness is the freshness daemon's verdict: its iteration runs here at frozen instants (test_freshness.py).
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    from analytics_views_tests.orchestration.test_freshness import DAILY, REFRESHED_AT, WEEKLY, daemon_states, refreshed

    defs = notifying_defs(tmp_path, monkeypatch, empty_db, free_port(), receiver.server_port)
    webhook = Ticks(defs, instance, "webhook_notifications")
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="analytics_views.definitions", attribute="defs"), location_name="analytics_views"
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as context:
        refreshed(instance, DAILY, REFRESHED_AT)
        refreshed(instance, WEEKLY, REFRESHED_AT)
        daemon_states(instance, context, REFRESHED_AT + timedelta(hours=25, minutes=59))
        webhook.tick()
        assert receiver.posted("/hooks/") == []  # fresh

        assert daemon_states(instance, context, REFRESHED_AT + timedelta(hours=26, minutes=1))[DAILY].value == "FAIL"
        webhook.tick()
        daemon_states(instance, context, REFRESHED_AT + timedelta(hours=30))  # still late: the same period
        webhook.tick()
        [late] = receiver.posted("/hooks/")
        assert late == {
            **late,
            "kind": "late",
            "subject": "analytics-views: late: daily_aggregations",
            "views": ["daily_aggregations"],
            "launched_by": "schedule daily_refresh_schedule",
            "url": f"{UI}/assets/daily_aggregations",
            "run_id": None,
        }
        assert late["reasons"][0]["reason"] == (
            "late: last refreshed 2026-03-02 03:00 UTC, more than 1 d 2 h ago (daily cadence): look at "
            "daily_refresh_schedule's ticks and daily_refresh_job's latest runs, then refresh it "
            "(`analytics-views refresh daily_aggregations`)"
        )

        refreshed(instance, DAILY, REFRESHED_AT + timedelta(hours=31))  # back on time
        daemon_states(instance, context, REFRESHED_AT + timedelta(hours=32))
        webhook.tick()
        assert len(receiver.posted("/hooks/")) == 1
        daemon_states(instance, context, REFRESHED_AT + timedelta(hours=31 + 26, minutes=1))  # late again
        webhook.tick()
        webhook.tick()
        assert [hook["kind"] for hook in receiver.posted("/hooks/")] == ["late", "late"]


def project_watched_views(defs_yaml):
    """The views the sensors of this defs.yaml's definitions watch."""
    config = MaterializedViewsComponent.from_defs_yaml(defs_yaml).managed_config()
    return watched_views(config, managed_view_assets(config))


def test_a_new_sensor_never_tells_of_runs_that_ended_before_it_looked(seeded_db, instance, receiver, tmp_path, monkeypatch):
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, free_port(), receiver.server_port)
    drop_unique_index(seeded_db, "daily_aggregations")
    assert not run_job(defs, instance, "daily_refresh_job", SCHEDULED).success
    views = project_watched_views(tmp_path / "defs.yaml")
    settings = NotificationSettings(ui_url=UI, destinations=(Webhook("ALERTS_WEBHOOK"),))
    later = time.time() + 2 * RUN_LOOK_BACK_S  # the run ended before the sensor's look-back

    cursor = None
    for _ in range(3):  # its first tick finds nothing; neither do the next ones
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        cursor = deliver(context, Webhook("ALERTS_WEBHOOK"), settings, views, now=later).cursor
    assert receiver.requests == []


def test_a_view_made_elsewhere_that_fails_is_named_schema_qualified_with_the_index_discovery_recorded(
    product_db, instance, receiver, tmp_path, monkeypatch
):
    # Another team's schema: weekly partitions, a plain view over them, views over views, inheritance.
    monkeypatch.setenv("DATABASE_URL", product_db)
    monkeypatch.setenv("ALERTS_WEBHOOK", f"http://127.0.0.1:{receiver.server_port}/hooks/{WEBHOOK_SECRET}")
    path = write_defs_yaml(
        tmp_path / "defs.yaml",
        f"schemas: [product]\ncadence: {{'product.weekly_*': weekly}}\n"
        f"notifications: {{ui_url: {UI}, webhook: {{url_env: ALERTS_WEBHOOK}}}}",
    )
    component = MaterializedViewsComponent.from_defs_yaml(path)
    component.write_state_to_path(component.beside_state_file())
    defs = component.definitions(component.beside_state_file())
    webhook = Ticks(defs, instance, "webhook_notifications")
    webhook.tick()
    with psycopg.connect(product_db, autocommit=True) as conn:
        conn.execute("DROP INDEX product.weekly_purchases_week")

    run = run_job(defs, instance, "weekly_refresh_job", {"dagster/schedule_name": "weekly_refresh_schedule"})
    assert run_job(defs, instance, "daily_refresh_job", {"dagster/schedule_name": "daily_refresh_schedule"}).success
    webhook.tick()

    assert not run.success
    [hook] = receiver.posted("/hooks/")
    assert hook["views"] == ["product.weekly_purchases"] and hook["launched_by"] == "schedule weekly_refresh_schedule"
    assert hook["reasons"][0]["reason"] == (
        "product.weekly_purchases has no unique index usable by REFRESH MATERIALIZED VIEW CONCURRENTLY; recreate the "
        "unique index `analytics-views discover` recorded: `CREATE UNIQUE INDEX weekly_purchases_week ON "
        "product.weekly_purchases USING btree (week);`, then materialize again (failed checks: unique_index)"
    )


def test_a_destination_told_only_of_late_views_hears_nothing_of_a_failed_run(seeded_db, instance, receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    monkeypatch.setenv("ALERTS_WEBHOOK", f"http://127.0.0.1:{receiver.server_port}/hooks/")
    path = write_defs_yaml(
        tmp_path / "defs.yaml", f"sql_folder: {SQL_DIR}\nnotifications: {{events: [late], webhook: {{url_env: ALERTS_WEBHOOK}}}}"
    )
    defs = MaterializedViewsComponent.from_defs_yaml(path).definitions(None)
    webhook = Ticks(defs, instance, "webhook_notifications")
    webhook.tick()
    drop_unique_index(seeded_db, "daily_aggregations")

    assert not run_job(defs, instance, "daily_refresh_job", SCHEDULED).success
    webhook.tick()

    assert receiver.requests == []


def test_a_run_of_some_views_of_a_job_names_only_those(seeded_db, instance, receiver, tmp_path, monkeypatch):
    defs = notifying_defs(tmp_path, monkeypatch, seeded_db, free_port(), receiver.server_port)
    webhook = Ticks(defs, instance, "webhook_notifications")
    webhook.tick()
    drop_unique_index(seeded_db, "daily_aggregations")

    # What `analytics-views refresh daily_aggregations` launches: the daily job, that view only.
    run = defs.resolve_job_def("daily_refresh_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("daily_aggregations")], raise_on_error=False,
        tags={"analytics_views/launched_by": "analytics-views refresh"},
    )
    webhook.tick()

    assert not run.success
    [hook] = receiver.posted("/hooks/")
    assert hook["views"] == ["daily_aggregations"] and hook["launched_by"] == "analytics-views refresh"


def test_a_failed_run_of_another_code_location_is_told_by_its_own_sensors_only(empty_db, instance, receiver, tmp_path, monkeypatch):
    # Two teams' code locations in one instance, each from its own defs.yaml, name their jobs and views alike.
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    notifying_defs(tmp_path, monkeypatch, empty_db, free_port(), receiver.server_port)
    views = project_watched_views(tmp_path / "defs.yaml")
    settings = NotificationSettings(ui_url=UI, destinations=(Webhook("ALERTS_WEBHOOK"),))

    def location(name: str) -> InProcessCodeLocationOrigin:
        return InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="analytics_views.definitions"), location_name=name)

    def failed_run(name: str) -> str:
        origin = RemoteJobOrigin(RemoteRepositoryOrigin(location(name), "__repository__"), "daily_refresh_job")
        run = instance.add_run(
            dg.DagsterRun("daily_refresh_job", status=dg.DagsterRunStatus.STARTED, remote_job_origin=origin, tags=SCHEDULED)
        )
        instance.report_run_failed(run, message=f"{name}'s run failed")
        return run.run_id

    cursors = {"team_a": None, "team_b": None}

    def tick(name: str) -> None:
        context = dg.SensorEvaluationContext(
            instance_ref=None, cursor=cursors[name], repository_name="__repository__", instance=instance, code_location_origin=location(name)
        )
        cursors[name] = deliver(context, Webhook("ALERTS_WEBHOOK"), settings, views).cursor

    for name in cursors:
        tick(name)
    team_a_run = failed_run("team_a")
    for name in cursors:
        tick(name)
        tick(name)

    [hook] = receiver.posted("/hooks/")
    assert hook["run_id"] == team_a_run and "team_a's run failed" in hook["text"]


def test_a_receiver_too_slow_to_answer_gets_the_notice_once_with_an_id_to_drop_repeats(
    seeded_db, instance, receiver, tmp_path, monkeypatch, capfd
):
    from analytics_views.orchestration import destinations

    monkeypatch.setattr(destinations, "TIMEOUT_S", 1)
    slow, thread = start_receiver(free_port(), answer_after_s=2)  # it takes each notice, then answers late
    try:
        defs = notifying_defs(tmp_path, monkeypatch, seeded_db, free_port(), receiver.server_port, webhook_port=slow.server_port)
        webhook = Ticks(defs, instance, "webhook_notifications")
        webhook.tick()
        drop_unique_index(seeded_db, "daily_aggregations")
        run = run_job(defs, instance, "daily_refresh_job", SCHEDULED)
        capfd.readouterr()
        for _ in range(3):
            webhook.tick()
        [(path, headers, body)] = [request for request in slow.requests if request[0].startswith("/hooks/")]
        notice = json.loads(body)
        assert notice["run_id"] == run.run_id and headers["Idempotency-Key"] == notice["id"]
        assert "webhook notification sent without an answer" in capfd.readouterr().err
    finally:
        slow.shutdown()
        slow.server_close()
        thread.join(10)
