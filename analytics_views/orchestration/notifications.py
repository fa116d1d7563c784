"""Operators hear about failures: one sensor per configured destination (email, Slack, webhook) sends a notice
when a run refreshing our views fails, when an ERROR-severity check of one fails in a run that succeeded, and
when a view becomes late under its freshness policy.

Each sensor reads what happened from the instance, through Dagster's public instance API: runs that ended
(`fetch_run_status_changes`), their step failures, check evaluations and materializations
(`get_records_for_run`), and the freshness daemon's latest state per view (`get_freshness_state_records`). Its
cursor remembers how far it read, the late periods it reported (by when they began) and the notices its
destination did not take yet, so each event gives one notice per destination: a failed run once, a late period
once, and a notice that could not be delivered is tried again at each tick (every 30 s) for a day.

Dagster's own `make_email_on_run_failure_sensor` and dagster-slack's `make_slack_on_run_failure_sensor` see
failed runs only (not failed checks of a run that succeeded, nor late views), and a send that raises fails the
tick and is retried together with what was already sent: these sensors do the three, and deliver each notice
to one destination, so an unreachable one delays only its own.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone

import dagster as dg

from analytics_views.orchestration.assets import ViewAsset
from analytics_views.orchestration.cadences import freshness_window
from analytics_views.orchestration.destinations import DeliveryError, DeliveryUnconfirmed, Destination
from analytics_views.orchestration.refresh_step import NOT_REFRESHED
from analytics_views.postgres.database import redact
from analytics_views.sql_files.managed import Cadence, ManagedConfig

RUN_LOOK_BACK_S = 600  # a new sensor's first tick reports runs that ended in the last 10 minutes
RETRY_FOR_S = 24 * 3600  # an undelivered notice is tried at every tick for a day, then dropped saying so
MAX_WAITING = 50  # undelivered notices kept in the cursor; older ones are dropped saying so
TICK_INTERVAL_S = 30
RUN_ENDINGS = (dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_SUCCESS)
_RUN_EVENTS = {
    dg.DagsterEventType.STEP_FAILURE,
    dg.DagsterEventType.ASSET_CHECK_EVALUATION,
    dg.DagsterEventType.ASSET_MATERIALIZATION,
}
IMPLICIT_ASSET_JOB = "__ASSET_JOB"  # the job of the UI's Materialize (and `dg launch --assets`)
KINDS = ("run_failure", "check_failure", "late")  # what a destination may be told of (all by default)


@dataclass(frozen=True)
class WatchedView:
    key: dg.AssetKey
    label: str  # as the CLI names it: name, or schema.name for a view made elsewhere
    cadence: Cadence
    reads: frozenset[dg.AssetKey]  # the views and tables it reads

    @property
    def window(self) -> timedelta:
        """Late once its last refresh is older than this."""
        return freshness_window(self.cadence)


def watched_views(config: ManagedConfig, assets: Iterable[ViewAsset]) -> dict[dg.AssetKey, WatchedView]:
    """The views the sensors watch, as the definitions built them (their keys and what they read)."""
    cadences = {cadence.name: cadence for cadence in config.cadences}
    return {
        asset.key: WatchedView(key=asset.key, label=asset.view.label, cadence=cadences[asset.view.cadence], reads=frozenset(asset.reads))
        for asset in assets
    }


@dataclass(frozen=True)
class NotificationSettings:
    ui_url: str  # the Dagster UI's address as readers of the notices reach it, for the links
    destinations: tuple[Destination, ...]
    kinds: frozenset[str] = frozenset(KINDS)
    url_envs: tuple[str, ...] = ("DATABASE_URL", "DAGSTER_POSTGRES_URL")  # whose passwords a notice never holds


@dataclass(frozen=True)
class ViewNotice:
    """What a destination is told: a subject naming the views, one line per view with its reason and fix (as
    the UI shows it), who launched the run, and a link to it in the UI."""

    kind: str  # run_failure | check_failure | late
    subject: str
    reasons: tuple[tuple[str, str], ...]  # (view, one-line reason with its fix)
    launched_by: str
    url: str
    run_id: str | None = None
    job: str | None = None

    @property
    def views(self) -> list[str]:
        return list(dict.fromkeys(view for view, _ in self.reasons))

    @property
    def id(self) -> str:
        """The same for every try of the same event: receivers may drop a notice whose id they have seen."""
        event = json.dumps([self.kind, self.run_id, self.job, self.subject, list(self.reasons)])
        return hashlib.sha256(event.encode()).hexdigest()[:32]

    def text(self) -> str:
        lines = [f"- {view}: {reason}" for view, reason in self.reasons]
        run = f"Run: {self.url}" if self.run_id else f"In the UI: {self.url}"
        return "\n".join([*lines, f"Launched by: {self.launched_by}", run, ""])

    def as_json(self) -> dict:
        return {
            "source": "analytics-views",
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "views": self.views,
            "reasons": [{"view": view, "reason": reason} for view, reason in self.reasons],
            "launched_by": self.launched_by,
            "run_id": self.run_id,
            "job": self.job,
            "url": self.url,
            "text": self.text(),
        }


@dataclass
class Waiting:
    notice: ViewNotice
    since: float  # when it was first tried
    tries: int = 0


@dataclass
class Cursor:
    runs: dict[str, str] = field(default_factory=dict)  # run-ending event type -> Dagster's event cursor
    late: dict[str, float] = field(default_factory=dict)  # view key -> when the late period it reported began
    waiting: list[Waiting] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> "Cursor":
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            runs=data.get("runs", {}),
            late=data.get("late", {}),
            waiting=[
                Waiting(
                    ViewNotice(**{**item["notice"], "reasons": tuple(map(tuple, item["notice"]["reasons"]))}),
                    item["since"],
                    item["tries"],
                )
                for item in data.get("waiting", [])
            ],
        )

    def text(self) -> str:
        return json.dumps(
            {"runs": self.runs, "late": self.late, "waiting": [asdict(waiting) for waiting in self.waiting]},
            sort_keys=True,
        )


def launched_by(tags: dict[str, str]) -> str:
    """Who asked for the run, from the tags Dagster and our CLI put on it."""
    if name := tags.get("dagster/schedule_name"):
        return f"schedule {name}"
    if name := tags.get("dagster/sensor_name"):
        return f"sensor {name}"
    if backfill := tags.get("dagster/backfill"):
        return f"backfill {backfill}"
    if launcher := tags.get("analytics_views/launched_by"):
        return launcher
    if parent := tags.get("dagster/parent_run_id"):
        return f"re-execution of run {parent[:8]} (the UI)"
    return "by hand (the UI's Materialize, `dg launch` or the GraphQL API)"


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else "no reason recorded"


def step_failure_reason(event: dg.DagsterEvent) -> str:
    """The failure's description as the UI shows it: a `Failure`'s description, else the error's first line."""
    data = event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return _first_line(data.user_failure_data.description)
    return _first_line(data.error.message if data.error else event.message)


class NoticeBuilder:
    """Turns what the instance recorded into notices about the watched views."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        views: dict[dg.AssetKey, WatchedView],
        settings: NotificationSettings,
        code_location: tuple[str, str | None] | None = None,
    ):
        self.instance = instance
        self.code_location = code_location  # (location, repository) the sensor runs in; None outside the daemon
        self.views = views
        # A view's step: its cadence's (assets.refresh_step_name), or, in runs recorded before the views of a
        # cadence shared one step, a step of its own named after its key.
        self.by_step: dict[str, list[WatchedView]] = {}
        for key, view in views.items():
            self.by_step.setdefault(key.to_python_identifier(), []).append(view)
            self.by_step.setdefault(f"refresh_{view.cadence.name}_views", []).append(view)
        self.ui_url = settings.ui_url.rstrip("/")
        self.kinds = settings.kinds

    def run_notices(self, cursor: Cursor, now: float) -> Iterable[ViewNotice]:
        for event_type in RUN_ENDINGS:
            previous = cursor.runs.get(event_type.value)
            records_filter = (
                event_type
                if previous
                else dg.RunStatusChangeRecordsFilter(event_type=event_type, after_timestamp=now - RUN_LOOK_BACK_S)
            )
            has_more = True
            while has_more:
                result = self.instance.fetch_run_status_changes(records_filter, limit=100, cursor=previous, ascending=True)
                has_more = result.has_more
                # With nothing found and no cursor given, Dagster's cursor points before the first event ever:
                # the next tick would tell all of history. Without one, the next tick looks back again.
                if result.records or previous:
                    previous = cursor.runs[event_type.value] = result.cursor
                for record in result.records:
                    notice = self.run_notice(record)
                    if notice is not None:
                        yield notice

    def _run_views(self, run: dg.DagsterRun) -> list[WatchedView]:
        """The views the run was to refresh: its asset (or check) selection (the CLI's runs, the UI's), else its
        op selection (a step re-executed from the UI; the CLI's runs before a cadence's views shared one step),
        else every view of its job."""
        selected = set(run.asset_selection or ()) | {check.asset_key for check in run.asset_check_selection or ()}
        if selected:
            return [view for key, view in self.views.items() if key in selected]
        steps = set(run.resolved_op_selection or run.op_selection or run.step_keys_to_execute or ())
        if steps:
            return list({view.key: view for step in steps for view in self.by_step.get(step, [])}.values())
        return [view for view in self.views.values() if view.cadence.job_name == run.job_name]

    def of_another_code_location(self, run: dg.DagsterRun) -> bool:
        """A run launched from another code location of the instance (another team's defs.yaml may name its
        jobs and views as ours do): its own location's sensors tell of it. Compared as Dagster's run status
        sensors compare them, when both are known."""
        origin = run.remote_job_origin
        if origin is None or self.code_location is None:
            return False
        repository = origin.repository_origin
        return (repository.code_location_origin.location_name, repository.repository_name) != self.code_location

    def run_notice(self, record) -> ViewNotice | None:
        run = self.instance.get_run_by_id(record.run_id)
        if run is None or self.of_another_code_location(run):
            return None
        views = self._run_views(run)
        if not views:
            return None  # not a run of our views
        failed: dict[str, str] = {}  # view label (or step key) -> reason
        failed_checks: dict[str, list[tuple[str, str]]] = {}  # view label -> [(check, description)]
        refreshed: set[dg.AssetKey] = set()
        for event_record in self.instance.get_records_for_run(run.run_id, of_type=_RUN_EVENTS).records:
            event = event_record.event_log_entry.dagster_event
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                data = event.step_failure_data.user_failure_data
                not_refreshed = data.metadata.get(NOT_REFRESHED) if data is not None else None
                if not_refreshed is not None:  # the cadence's step names each view it did not refresh, and why
                    failed.update(not_refreshed.value)
                else:
                    [view, *others] = self.by_step.get(event.step_key) or [None]
                    failed[view.label if view and not others else event.step_key] = step_failure_reason(event)
            elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                refreshed.add(event.asset_key)
            else:
                evaluation = event.event_specific_data
                if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR and evaluation.asset_key in self.views:
                    label = self.views[evaluation.asset_key].label
                    failed_checks.setdefault(label, []).append(
                        (evaluation.check_name, _first_line(evaluation.description or "failed"))
                    )
        run_failed = record.event_log_entry.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
        if ("run_failure" if run_failed else "check_failure") not in self.kinds:
            return None
        if not run_failed and not failed_checks:
            return None  # a run that succeeded with its ERROR checks passing
        reasons: list[tuple[str, str]] = []
        for label, reason in failed.items():
            checks = [name for name, _ in failed_checks.pop(label, [])]
            reasons.append((label, reason + (f" (failed checks: {', '.join(checks)})" if checks else "")))
        if run_failed:
            failed_keys = {view.key for view in views if view.label in failed}
            run_reason = _first_line(record.event_log_entry.dagster_event.message)
            for view in views:
                if view.label in failed or view.key in refreshed:
                    continue
                upstream = sorted(self.views[key].label for key in view.reads & failed_keys)
                reasons.append(
                    (view.label, f"not refreshed: it reads {', '.join(upstream)}, which failed")
                    if upstream
                    else (view.label, f"not refreshed: {run_reason}")
                )
        for label, checks in failed_checks.items():
            reasons.extend((label, f"check {name} failed: {description}") for name, description in checks)
        names = ", ".join(dict.fromkeys(view for view, _ in reasons))
        job = "Materialize" if run.job_name == IMPLICIT_ASSET_JOB else run.job_name
        subject = (
            f"analytics-views: {job} failed: {names}" if run_failed else f"analytics-views: ERROR check failed on {names} ({job})"
        )
        return ViewNotice(
            kind="run_failure" if run_failed else "check_failure",
            subject=subject,
            reasons=tuple(reasons),
            launched_by=launched_by(dict(run.tags)),
            url=f"{self.ui_url}/runs/{run.run_id}",
            run_id=run.run_id,
            job=run.job_name,
        )

    def late_notice(self, cursor: Cursor) -> ViewNotice | None:
        """One notice for the views whose late period began since the last tick (none the second time)."""
        if "late" not in self.kinds:
            return None
        records = self.instance.get_freshness_state_records(list(self.views))
        late = []
        for key, record in sorted(records.items(), key=lambda item: item[0].to_user_string()):
            began = record.updated_at.timestamp()
            if record.freshness_state.value == "FAIL" and began > cursor.late.get(key.to_user_string(), 0):
                cursor.late[key.to_user_string()] = began
                late.append(self.views[key])
        if not late:
            return None
        reasons = []
        for view in late:
            last = self.instance.get_latest_materialization_event(view.key)
            when = (
                datetime.fromtimestamp(last.timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                if last
                else "never"
            )
            reasons.append(
                (
                    view.label,
                    f"late: last refreshed {when}, more than {_duration(view.window)} ago ({view.cadence.name} "
                    f"cadence): look at {view.cadence.schedule_name}'s ticks and {view.cadence.job_name}'s latest "
                    f"runs, then refresh it (`analytics-views refresh {view.label}`)",
                )
            )
        url = f"{self.ui_url}/assets/{'/'.join(late[0].key.path)}" if len(late) == 1 else f"{self.ui_url}/assets"
        return ViewNotice(
            kind="late",
            subject=f"analytics-views: late: {', '.join(view.label for view in late)}",
            reasons=tuple(reasons),
            launched_by=", ".join(dict.fromkeys(f"schedule {view.cadence.schedule_name}" for view in late)),
            url=url,
        )


def _duration(window: timedelta) -> str:
    hours = int(window.total_seconds() // 3600)
    days, hours = divmod(hours, 24)
    minutes = int(window.total_seconds() % 3600 // 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else ""]
    return " ".join(filter(None, parts)) or f"{window.total_seconds():.0f} s"


def _scrubbed(notice: ViewNotice, secrets: tuple[str, ...], urls: tuple[str, ...]) -> ViewNotice:
    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return redact(text, *urls)

    return replace(notice, subject=clean(notice.subject), reasons=tuple((view, clean(reason)) for view, reason in notice.reasons))


def deliver(
    context: dg.SensorEvaluationContext,
    destination: Destination,
    settings: NotificationSettings,
    views: dict[dg.AssetKey, WatchedView],
    now: float | None = None,
) -> dg.SensorResult:
    """One tick of a destination's sensor: new notices, and the ones still waiting, sent in order."""
    now = time.time() if now is None else now
    cursor = Cursor.parse(context.cursor)
    location = context.code_location_origin
    builder = NoticeBuilder(
        context.instance, views, settings, (location.location_name, context.repository_name) if location else None
    )
    new = [*builder.run_notices(cursor, now), *filter(None, [builder.late_notice(cursor)])]
    secrets = tuple(secret for dest in settings.destinations for secret in dest.secrets)
    urls = tuple(filter(None, (os.environ.get(name) for name in settings.url_envs)))
    queue = cursor.waiting + [Waiting(_scrubbed(notice, secrets, urls), since=now) for notice in new]
    waiting, sent, failure, dropped = [], 0, None, 0
    for item in queue:
        if failure is None:
            try:
                destination.send(item.notice)
                sent += 1
                continue
            except DeliveryUnconfirmed as error:  # it may have arrived: never sent twice on our side
                context.log.warning(
                    f"{destination.name} notification sent without an answer: {error}; not sent again "
                    f"(its id {item.notice.id} lets the receiver drop a repeat)"
                )
                sent += 1
                continue
            except DeliveryError as error:  # the rest waits too: the destination is likely down for all of them
                failure = str(error)
        item.tries += 1
        if now - item.since < RETRY_FOR_S:
            waiting.append(item)
        else:
            dropped += 1
    dropped += max(0, len(waiting) - MAX_WAITING)
    cursor.waiting = waiting[-MAX_WAITING:]
    summary = f"{sent} notice(s) sent to {destination.where}" if sent else "nothing new to tell"
    if failure is not None:
        summary = (
            f"{destination.name} notification not delivered: {failure}; {len(cursor.waiting)} notice(s) wait for "
            f"the next tick, in {TICK_INTERVAL_S} s: check that it is up and reachable from the code location"
        ) + (f" ({dropped} dropped after a day of tries)" if dropped else "")
        context.log.warning(summary)
    return dg.SensorResult(cursor=cursor.text(), skip_reason=summary)


def notification_sensors(
    settings: NotificationSettings, config: ManagedConfig, assets: Iterable[ViewAsset]
) -> list[dg.SensorDefinition]:
    """One sensor per configured destination, running from the daemon's start; none without a destination."""
    views = watched_views(config, assets)
    if not views:
        return []

    def sensor_for(destination: Destination) -> dg.SensorDefinition:
        @dg.sensor(
            name=f"{destination.name}_notifications",
            minimum_interval_seconds=TICK_INTERVAL_S,
            default_status=dg.DefaultSensorStatus.RUNNING,
            description=f"Tells {destination.where} when a refresh run fails, an ERROR check fails or a view "
            "becomes late: once per event, with the views, the reason and fix, the launcher and a link.",
        )
        def notify(context: dg.SensorEvaluationContext) -> dg.SensorResult:
            return deliver(context, destination, settings, views)

        return notify

    return [sensor_for(destination) for destination in settings.destinations]
