"""What the command line does with Dagster: refresh views as recorded runs, and report view stats."""

import contextlib
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import psycopg
import yaml

from analytics_views.postgres.modes import RefreshMode
from analytics_views.postgres import database
from analytics_views.sql_files.discovery import managed_views, staleness
from analytics_views.errors import AnalyticsViewsError
from analytics_views.orchestration.component import LoadedViews, load_views
from analytics_views.operations import runs
from analytics_views.operations.launcher import SLOT_WAIT_S, Launch, Launcher, stop_launched
from analytics_views.orchestration import metadata_keys as keys
from analytics_views.orchestration.refresh_step import NOT_REFRESHED
from analytics_views.operations.migrate import LEDGER
from analytics_views.postgres.refresh import RefreshSettings
from analytics_views.sql_files.views import ViewDefinition


def _managed(loaded: LoadedViews) -> tuple[ViewDefinition, ...]:
    """The views the component manages: the SQL folder's, named as before, and discovered ones as schema.name."""
    return managed_views(loaded.config).views


def selected_views(
    *,
    all_views: bool,
    daily: bool,
    weekly: bool,
    names: list[str],
    cadence: str | None = None,
    loaded: LoadedViews | None = None,
) -> list[str]:
    loaded = loaded or load_views()
    managed = _managed(loaded)
    if all_views:
        return [view.label for view in managed]
    cadence = "daily" if daily else "weekly" if weekly else cadence
    if cadence:
        config = loaded.config
        if cadence not in config.cadence_names:
            raise AnalyticsViewsError(
                f"unknown cadence {cadence!r}: choose from {', '.join(config.cadence_names)} "
                f"(or define it under attributes.cadences in {config.where})"
            )
        return [view.label for view in managed if view.cadence == cadence]
    if not names:
        raise AnalyticsViewsError("say which views to refresh: --all, --daily, --weekly, --cadence NAME or view names")
    known = [view.label for view in managed]
    chosen = []
    for name in names:
        # A discovered view is schema.name; its bare name does when no other view bears it.
        bare = [view.label for view in managed if view.name == name]
        if name in known or len(bare) == 1:
            chosen.append(name if name in known else bare[0])
        elif bare:
            raise AnalyticsViewsError(f"view name {name!r} is ambiguous: say which, {' or '.join(bare)}")
        else:
            raise AnalyticsViewsError(
                f"unknown view {name!r}: choose from {', '.join(known)} (or use --all, --daily, --weekly, --cadence NAME)"
            )
    return list(dict.fromkeys(chosen))


def instance(*, to_record_runs: bool = True) -> dg.DagsterInstance:
    """The persistent Dagster instance in $DAGSTER_HOME, the one the UI and the daemon use (a running
    `analytics-views dev`'s when DAGSTER_HOME is not set). Without DAGSTER_HOME, a command that only reads
    gets an empty throwaway instance; one that would record runs gets a one-line error."""
    from analytics_views.orchestration.dagster_storage import check_storage

    if not os.environ.get("DAGSTER_HOME"):
        if not to_record_runs:
            return dg.DagsterInstance.ephemeral()
        raise AnalyticsViewsError(
            "DAGSTER_HOME is not set, so no run would be recorded where the UI shows it: start "
            "`analytics-views dev` (its instance is then used), or export DAGSTER_HOME (a folder holding the "
            "project's dagster.yaml) and DAGSTER_POSTGRES_URL"
        )
    home = Path(os.environ["DAGSTER_HOME"])
    if to_record_runs and not (home / "dagster.yaml").is_file():
        raise AnalyticsViewsError(
            f"DAGSTER_HOME ({home}) holds no dagster.yaml, so Dagster would queue the runs for a daemon that may not "
            "be running: copy the project's deploy/dagster.yaml there and export DAGSTER_POSTGRES_URL (or unset "
            "DAGSTER_HOME beside a running `analytics-views dev`)"
        )
    try:
        check_storage(os.environ["DAGSTER_HOME"])  # one line naming auth, host or database, not retries
        if not to_record_runs and not _holds_dagster_tables(home):
            return dg.DagsterInstance.ephemeral()  # loading the instance would create Dagster's tables there
        loaded = dg.DagsterInstance.get()
        if to_record_runs:
            _check_runs_start(loaded)
        return loaded
    except AnalyticsViewsError:
        raise  # already one line naming the variable and the fix
    except yaml.YAMLError as error:
        mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = f"it is not valid YAML{where}"
    except Exception as error:  # noqa: BLE001 - Dagster raises many kinds here; each becomes one line
        missing = re.search(r'environment variable "(\w+)" which is not set', str(error))
        if missing:
            reason = f"it reads {missing[1]}, which is not set: export {missing[1]}=postgresql://..."
        else:
            reason = database.redact(str(error).strip().splitlines()[0], os.environ.get("DAGSTER_POSTGRES_URL", ""))
    raise AnalyticsViewsError(
        f"cannot load the Dagster instance from $DAGSTER_HOME/dagster.yaml ({reason}): fix it, "
        "or copy the project's deploy/dagster.yaml there"
    ) from None


def _holds_dagster_tables(home: Path) -> bool:
    """Whether the PostgreSQL storage dagster.yaml names already holds Dagster's run storage (its `runs` table);
    True for any other storage. A read-only command must not create Dagster's tables in a database that was
    never Dagster's (the analytics database, say, through a mistaken DAGSTER_POSTGRES_URL)."""
    from analytics_views.orchestration.dagster_storage import STORAGE_CHECK_TIMEOUT_S, storage_url

    found = storage_url(home / "dagster.yaml")
    if found is None:
        return True
    variable, url = found
    with database.connect(url, variable=variable, purpose="Dagster's storage database", connect_timeout=STORAGE_CHECK_TIMEOUT_S) as conn:
        return conn.execute("SELECT to_regclass('runs') IS NOT NULL").fetchone()[0]


# The daemon beats every 30 s (dagster-daemon's default); one silent for longer than this is taken for gone.
DAEMON_SILENT_S = 120
QUEUED_RUN_DAEMON = "QUEUED_RUN_COORDINATOR"  # its daemon type in the heartbeats


def _check_runs_start(dagster_instance: dg.DagsterInstance) -> None:
    """A queued run starts only when a daemon dequeues it: without one beating, one line instead of a wait."""
    if not isinstance(dagster_instance.run_coordinator, dg.QueuedRunCoordinator):
        return
    beat = dagster_instance.get_daemon_heartbeats().get(QUEUED_RUN_DAEMON)
    if beat is None or time.time() - beat.timestamp > DAEMON_SILENT_S:
        raise AnalyticsViewsError(
            "$DAGSTER_HOME/dagster.yaml queues runs (QueuedRunCoordinator) and no Dagster daemon has dequeued any "
            f"in the last {DAEMON_SILENT_S} s, so the run would wait for good: start `dagster-daemon run` (or "
            "`analytics-views dev`), or use the project's deploy/dagster.yaml, whose runs start at once"
        )


@dataclass(frozen=True)
class RefreshReport:
    view: str
    outcome: str  # "refreshed", "skipped" (sources unchanged) or "FAILED"
    detail: str  # the run's metadata summary, or the failure message
    # Checks that failed in the run, each "SEVERITY check NAME failed: its description (the fix)".
    failed_checks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """False when the view failed or one of its ERROR checks did (WARN checks are listed only)."""
        return self.outcome != "FAILED" and not any(check.startswith("ERROR") for check in self.failed_checks)

    def line(self) -> str:
        return "; ".join([f"{self.view}: {self.outcome} ({self.detail})", *self.failed_checks])


def refresh(
    url: str,
    views: list[str],
    *,
    force: bool = False,
    wait_s: float = SLOT_WAIT_S,
    loaded: LoadedViews | None = None,
    launcher: Launcher | None = None,
) -> list[RefreshReport]:
    """One run of each cadence's job for the selected views, submitted through the code location and
    recorded in the Dagster instance like a scheduled run (runs.py); waits for them to end.

    Views whose sources did not change since their last refresh are skipped unless `force` is set. A view
    whose pool slot another run holds is waited for at most `wait_s`, then reported FAILED. `launcher` is one
    started beforehand with this environment (the command starts it first); None starts one here.
    """
    loaded = loaded or load_views()
    config, defs, url_env = loaded.config, loaded.defs, loaded.component.database.url_env
    with database.connect(url) as conn:  # fail in one line before Dagster starts a run
        if config.project_views:
            ensure_migrated(conn)
    managed = managed_views(config).views
    # A resource's run config replaces its configuration whole (a setting left out is the class default, not
    # the defs.yaml's): every setting of the defs.yaml, with skip_unchanged off when forced.
    refresh_settings = {name: value for name, value in loaded.component.refresh.model_dump().items() if value is not None}
    settings = {**refresh_settings, "url": {"env": url_env}, **({"skip_unchanged": False} if force else {})}
    lock_timeout_s = refresh_settings.get("lock_timeout_s", RefreshSettings.lock_timeout_s)  # as the run has it
    run_config = {"resources": {"analytics_db": {"config": settings}}}
    given = contextlib.nullcontext(launcher) if launcher else Launcher({**os.environ, url_env: url})
    with given as launcher, instance() as dagster_instance:
        launches, chosen_views, pools = [], [], []
        for cadence in config.cadences:
            chosen = {loaded.key(view): view for view in managed if view.cadence == cadence.name and view.label in views}
            if not chosen:
                continue
            job = defs.resolve_job_def(cadence.job_name)
            every = len(chosen) == len(job.asset_layer.executable_asset_keys)
            checks = [
                (list(check.asset_key.path), check.name)
                for check in job.asset_layer.asset_graph.asset_check_keys
                if check.asset_key in chosen
            ]
            assets = None if every else [list(key.path) for key in chosen]
            launches.append(Launch(job.name, assets, run_config, checks))
            chosen_views.append(chosen)
            pools.append({node.name: node.definition.pool for node in job.graph.nodes})
        launched = launcher.launch(launches)
        if failed := [error for error in launched if isinstance(error, AnalyticsViewsError)]:
            # The runs it did launch, and any whose answer was lost (found by the command's tag), end now.
            runs.terminate(dagster_instance, runs.launched_by(dagster_instance, launcher.launch_id))
            stop_launched([launcher.process_group])
            raise failed[0]
        submitted = [
            runs.Submitted(run_id, launch.job, run_pools, launcher.process_group)
            for run_id, launch, run_pools in zip(launched, launches, pools)
        ]
        with _watcher(url) as conn:
            told: set = set()
            runs.wait(
                dagster_instance,
                submitted,
                wait_s=wait_s,
                watch=lambda: [_say_lock_waits(conn, run.run_id, told, lock_timeout_s) for run in submitted],
            )
        reports = []
        for run, chosen in zip(submitted, chosen_views):
            reports += _reports(dagster_instance, run, chosen)
    return reports


def _watcher(url: str) -> psycopg.Connection:
    """The connection that watches the refreshes' lock waits, on the server's `postgres` database when it may:
    pg_stat_activity and pg_blocking_pids see every database, and a session idle on the views' database keeps
    their refreshes from proving a skip for a while (write_quiescence.py). On the views' database otherwise."""
    try:
        return database.connect(
            database.with_database(url, "postgres"), autocommit=True, application_name=_WATCHER, connect_timeout=5
        )
    except database.ConnectionFailure:
        return database.connect(url, autocommit=True, application_name=_WATCHER)


_WATCHER = "analytics-views refresh watcher"


# Sessions of the run's refreshes (application_name 'analytics-views <view> run <run id>', assets.py) waiting
# for a lock, and who holds it.
_LOCK_WAITS = """
SELECT waiting.application_name, holder.pid, coalesce(nullif(holder.application_name, ''), holder.usename::text),
       to_char(holder.xact_start AT TIME ZONE 'UTC', 'HH24:MI:SS')
FROM pg_stat_activity AS waiting
CROSS JOIN LATERAL unnest(pg_blocking_pids(waiting.pid)) AS blocking(pid)
JOIN pg_stat_activity AS holder ON holder.pid = blocking.pid
WHERE waiting.application_name LIKE %s AND waiting.wait_event_type = 'Lock'
"""


def _say_lock_waits(conn, run_id: str, told: set, lock_timeout_s: float) -> None:
    """One stderr line for each session a refresh of the run newly waits for."""
    suffix = f" run {run_id[:8]}"
    try:
        waits = conn.execute(_LOCK_WAITS, [f"analytics-views %{suffix}"]).fetchall()
    except psycopg.Error:  # the refresh itself reports what is wrong with the database
        return
    for application, pid, holder, since in waits:
        if (application, pid) not in told:
            told.add((application, pid))
            view = application.removeprefix("analytics-views ").removesuffix(suffix)
            runs.say(
                f"{view} waits for a lock held by pid {pid} ({holder}, since {since} UTC), at most lock_timeout_s "
                f"({lock_timeout_s:g} s) per attempt"
            )


def _reports(dagster_instance: dg.DagsterInstance, run: runs.Submitted, views: dict[dg.AssetKey, ViewDefinition]) -> list[RefreshReport]:
    """One report per view, from the run's event log: its materialization's metadata, or why it was not
    refreshed (the step's failure names each such view, refresh_step.NOT_REFRESHED)."""
    failures: dict[dg.AssetKey, str] = {}
    materialized: dict[dg.AssetKey, dict] = {}
    step_failures: list[str] = []
    by_label = {view.label: key for key, view in views.items()}
    records = dagster_instance.get_records_for_run(
        run.run_id,
        of_type={
            dg.DagsterEventType.STEP_FAILURE,
            dg.DagsterEventType.ASSET_MATERIALIZATION,
            dg.DagsterEventType.ASSET_CHECK_EVALUATION,
            dg.DagsterEventType.RUN_FAILURE,
        },
    ).records
    run_failure = ""
    checks: dict[dg.AssetKey, list[str]] = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        if event.event_type == dg.DagsterEventType.RUN_FAILURE:
            run_failure = " ".join((event.message or "").split())
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            if not evaluation.passed and evaluation.asset_key in views:
                checks.setdefault(evaluation.asset_key, []).append(failed_check_line(evaluation))
        elif event.is_step_failure:
            error = event.step_failure_data.error
            user_data = event.step_failure_data.user_failure_data
            not_refreshed = user_data.metadata.get(NOT_REFRESHED) if user_data else None
            if not_refreshed is not None:
                for label, reason in not_refreshed.value.items():
                    if label in by_label:
                        failures[by_label[label]] = reason
            else:
                message = (error.message if error else event.message or "failed").strip().splitlines()[0]
                step_failures.append(re.sub(r"^[\w.]+(Error|Failure): ", "", message))
        elif event.asset_key in views:
            metadata = event.step_materialization_data.materialization.metadata
            materialized[event.asset_key] = {name: value.value for name, value in metadata.items()}
    status = dagster_instance.get_run_by_id(run.run_id).status
    blocked = next(iter(run.blocked.values()), None)
    reports = []
    for key, view in views.items():
        metadata = materialized.get(key)
        if key in failures:
            reports.append(RefreshReport(view.label, "FAILED", failures[key]))
        elif not metadata and blocked:
            reports.append(RefreshReport(view.label, "FAILED", blocked))
        elif not metadata:  # neither failed nor materialized
            reason = (
                "not refreshed: the run was terminated"
                if status == dg.DagsterRunStatus.CANCELED
                else f"not refreshed: {step_failures[0]}"
                if step_failures
                else f"not refreshed: the run failed before it refreshed the view ({run_failure})"
                if run_failure
                else "not refreshed"
            )
            reports.append(RefreshReport(view.label, "FAILED", f"{reason}, run {run.run_id[:8]}"))
        else:
            reports.append(
                RefreshReport(
                    view.label,
                    "skipped" if metadata[keys.REFRESH_MODE] == RefreshMode.SKIPPED else "refreshed",
                    f"{metadata[keys.ROW_COUNT]} rows, {metadata[keys.SIZE]}, "
                    + (
                        "proven unchanged since its last refresh"  # its rows and size are that refresh's
                        if metadata[keys.REFRESH_MODE] == RefreshMode.SKIPPED
                        else f"{metadata[keys.REFRESH_MODE]} in {metadata[keys.REFRESH_DURATION_S]:.2f} s"
                    )
                    + f", run {run.run_id[:8]}",
                    tuple(sorted(checks.get(key, []))),  # ERROR before WARN
                )
            )
    return reports


def failed_check_line(evaluation: dg.AssetCheckEvaluation) -> str:
    """`ERROR check no_negative_revenue failed: 1456 failing rows. ...; fix ...`: what the check says, and the fix
    (a data test's description says what it asserts; the fix is the view's SQL or its data)."""
    severity = evaluation.severity.value if evaluation.severity else "ERROR"
    description = " ".join((evaluation.description or "no description").split())
    fix = "" if "fix" in description.lower() or "run `" in description else "; fix the view's SQL or its sources' rows, then refresh"
    return f"{severity} check {evaluation.check_name} failed: {description}{fix}"


@dataclass(frozen=True)
class ViewStats:
    view: str
    rows: int | None
    size_bytes: int
    size: str
    populated: bool
    unique_index: str | None
    last_refreshed: datetime | None
    last_mode: str | None = None  # how the last materialization went: a refresh mode, or skipped
    last_note: str = ""  # why: the skip's proof, or why the view could not be skipped
    failing_checks: tuple[str, ...] = ()  # the view's checks whose latest evaluation failed, as refresh names them

    def as_json(self) -> dict:
        return {
            "view": self.view,
            "rows": self.rows,
            "size_bytes": self.size_bytes,
            "size": self.size,
            "populated": self.populated,
            "unique_index": self.unique_index,
            "unique_index_usable": self.unique_index is not None,
            "last_refreshed": self.last_refreshed.isoformat() if self.last_refreshed else None,
            "last_refresh_mode": self.last_mode,
            "last_refresh_note": self.last_note,
            "failing_checks": list(self.failing_checks),
        }

    def as_row(self) -> tuple[str, ...]:
        return (
            self.view,
            "-" if self.rows is None else str(self.rows),
            self.size,
            "yes" if self.populated else "no",
            self.unique_index or "MISSING",
            self.last_refreshed.strftime("%Y-%m-%d %H:%M:%S UTC") if self.last_refreshed else "never recorded",
            ", ".join(line.split(" failed:")[0].replace(" check ", " ") for line in self.failing_checks) or "-",
            self.last_mode or "-",
            self.last_note,
        )


def _last_materialized(dagster_instance: dg.DagsterInstance, key: dg.AssetKey) -> dict:
    """When the view was last materialized, how (its refresh mode) and why (its refresh note)."""
    event = dagster_instance.get_latest_materialization_event(key)
    if not event:
        return {"last_refreshed": None}
    metadata = event.asset_materialization.metadata if event.asset_materialization else {}
    mode, note = metadata.get(keys.REFRESH_MODE), metadata.get(keys.REFRESH_NOTE)
    return {
        "last_refreshed": datetime.fromtimestamp(event.timestamp, tz=timezone.utc),
        "last_mode": mode.value if mode else None,
        "last_note": note.value if note else "",
    }


def _failing_checks(dagster_instance: dg.DagsterInstance, check_keys: list[dg.AssetCheckKey]) -> tuple[str, ...]:
    """The checks whose latest evaluation failed, ERROR first, each as `refresh` prints it."""
    failing = []
    for check_key in check_keys:
        record = dagster_instance.get_latest_asset_check_evaluation_record(check_key)
        event = record.event.dagster_event if record and record.event else None
        if event and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            if not event.asset_check_evaluation_data.passed:
                failing.append(failed_check_line(event.asset_check_evaluation_data))
    return tuple(sorted(failing))


def ensure_migrated(conn) -> None:
    if conn.execute("SELECT to_regclass(%s)", [LEDGER]).fetchone()[0] is None:
        raise AnalyticsViewsError(
            f"{database.describe_target(conn.info.dsn)} was never migrated: run `analytics-views migrate`"
        )


def view_stats(url: str, loaded: LoadedViews | None = None) -> list[ViewStats]:
    """The old getViewStats(): each view's rows, size, populated flag, unique index and last refresh."""
    stats = []
    loaded = loaded or load_views()
    config = loaded.config
    with database.connect(url, autocommit=True) as conn, instance(to_record_runs=False) as dagster_instance:
        if config.project_views:
            ensure_migrated(conn)
        check_keys: dict[dg.AssetKey, list[dg.AssetCheckKey]] = {}
        for check_key in loaded.defs.resolve_asset_graph().asset_check_keys:
            check_keys.setdefault(check_key.asset_key, []).append(check_key)
        for view in _managed(loaded):
            state = database.view_state(conn, view.name, view.schema)
            if not state.exists:
                fix = "run `analytics-views migrate`" if view.path else staleness(conn, config).line(config)
                raise AnalyticsViewsError(f"view {view.label} is missing: {fix}")
            stats.append(
                ViewStats(
                    view=view.label,
                    rows=database.row_count(conn, view.name, view.schema) if state.populated else None,
                    size_bytes=state.size_bytes,
                    size=state.size_pretty,
                    populated=state.populated,
                    unique_index=state.unique_index,
                    **_last_materialized(dagster_instance, loaded.key(view)),
                    failing_checks=_failing_checks(dagster_instance, check_keys.get(loaded.key(view), [])),
                )
            )
    return stats


def discovery_warning(url: str, loaded: LoadedViews | None = None) -> str | None:
    """One line when the discovery state differs from the catalog (views added, dropped, redefined)."""
    config = (loaded or load_views()).config
    if not config.discovers:
        return None
    with database.connect(url) as conn:
        stale = staleness(conn, config)
    return stale.line(config) if stale else None
