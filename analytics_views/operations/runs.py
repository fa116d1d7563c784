"""The runs `analytics-views refresh` submits: real runs, launched through the code location.

Each is launched as the daemon launches a scheduled run: Dagster's own GraphQL `launchRun` (run in process by
`dagster-graphql -w workspace.yaml`, no webserver needed) loads the workspace's code location and submits the
run, for the chosen views (an asset selection of the cadence's job), to the instance's run launcher, which
starts a run worker with the jobs' executor. So the run carries its code-location origin (the UI's Overview
timeline shows it, "Re-execute" runs the same job) and a tag naming who launched it. (`dagster job launch`
selects ops, not assets: a cadence's views are one op.) The command then follows the run's events with a
cursor, saying on stderr what it waits for: its step's pool slot held by another run (asked only while the step
waits; at most `wait_s`, after which the run is terminated and its views reported not refreshed; a slot left to
a run that ended is freed at once), or a lock held by another session. SIGINT or SIGTERM terminate the run as
the UI's "Terminate" does: the run worker cancels its queries, and the views keep their previous contents.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import psutil

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
LAUNCHED_BY_TAG = "analytics_views/launched_by"
LAUNCHED_BY = "analytics-views refresh"
SLOT_WAIT_S = 30.0  # longest wait of `analytics-views refresh` for a view's pool slot held by another run
STOP_GRACE_S = 10.0  # longest wait, after a signal, for the terminated runs to record their end
LAUNCH_TIMEOUT_S = 300.0
_POLL_S = 0.25  # how often the command reads its runs' new events (a query on a pooled connection)
# A slot held under a run id with no run record: a run between its claim and its record, or one killed in
# that instant; after this long, the second.
_UNRECORDED_GRACE_S = 60.0


def say(line: str) -> None:
    print(f"analytics-views refresh: {line}", file=sys.stderr, flush=True)


@dataclass
class Submitted:
    """A launched run, and what the command learned, following its events, while it waited for it."""

    run_id: str
    job: str
    pools: dict[str, str | None]  # step key -> pool
    process_group: int  # of its launcher, whose code server serves the run until it ends
    waiting_since: dict[str, float] = field(default_factory=dict)  # steps waiting for their pool slot
    blocked: dict[str, str] = field(default_factory=dict)  # steps not run, with the one-line reason
    cursor: str | None = None  # of its event log, read so far
    started: bool = False
    started_steps: set[str] = field(default_factory=set)
    ended: bool = False


@dataclass(frozen=True)
class Launch:
    """A run to submit: `job`, only the assets `assets` (key paths) and their `checks` when given, with
    `run_config`."""

    job: str
    assets: list[list[str]] | None
    run_config: dict
    checks: list[tuple[list[str], str]] = field(default_factory=list)  # with `assets`: (asset key path, check name)


LOCATION_NAME = "analytics_views"  # workspace.yaml's
REPOSITORY_NAME = "__repository__"  # Dagster's name for a Definitions object's repository
_LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""


def _launch_command(request: Launch, output: Path) -> list[str]:
    selector: dict = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME, "jobName": request.job}
    if request.assets is not None:
        # With the checks the job holds for those assets only: left out, Dagster would add every check of the
        # assets, the definition checks too (definition_checks.py), which have a job of their own.
        selector["assetSelection"] = [{"path": path} for path in request.assets]
        selector["assetCheckSelection"] = [
            {"assetKey": {"path": path}, "name": name} for path, name in request.checks
        ]
    variables = {
        "executionParams": {
            "selector": selector,
            "runConfigData": request.run_config,
            "executionMetadata": {"tags": [{"key": LAUNCHED_BY_TAG, "value": LAUNCHED_BY}]},
        }
    }
    return [
        str(Path(sys.executable).parent / "dagster-graphql"),
        *("-w", str(WORKSPACE), "-t", _LAUNCH_RUN, "-v", json.dumps(variables), "-o", str(output)),
    ]


def _launched_run_id(job: str, output: Path, log: str) -> str:
    """The run id of `launchRun`'s answer, or one line saying why it launched nothing."""
    answer = _answer(output)
    if answer is None:
        raise AnalyticsViewsError(f"could not launch {job}: {_last_error(log)}")
    result = (answer.get("data") or {}).get("launchRun") or {}
    if result.get("__typename") == "LaunchRunSuccess":
        return result["run"]["runId"]
    reason = result.get("message") or "; ".join(e["message"] for e in result.get("errors", [])) or json.dumps(answer)[:500]
    raise AnalyticsViewsError(f"could not launch {job}: {' '.join(reason.split())[:500]}")


def launch(launches: list[Launch], env: dict[str, str]) -> list[tuple[str, int]]:
    """Submits the runs through the code location, all at once; returns each run's id and the process group
    of its launcher (stop_launched stops what is left of it once the run has ended), in order."""
    with ExitStack() as stack:
        answers = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="analytics-views-launch-")))
        started: list = []
        launched: list[tuple[str, int]] = []
        for number, request in enumerate(launches):
            answer = answers / f"{number}.json"
            # The run worker inherits this output and writes its log there after the launcher has returned: a
            # file, not a pipe that would close under it. Its own session: a Ctrl-C in the terminal reaches
            # this command only, which terminates the run through the instance.
            output = stack.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(
                _launch_command(request, answer),
                env=env,
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            # Left to serve its run once it is launched; stopped, with its code server and run, if this command
            # stops before every run is launched (a signal, a launch that failed).
            stack.callback(lambda group=process.pid: None if len(launched) == len(launches) else stop_launched([group]))
            started.append((request.job, answer, process, output))
        for job, answer, process, output in started:
            # The launcher writes its answer once the run is submitted, then waits for its code server, which
            # serves the run until it ends: the answer, not the launcher's exit, says the run is launched.
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while _answer(answer) is None and process.poll() is None:
                if time.monotonic() > deadline:
                    raise AnalyticsViewsError(
                        f"launching {job} took over {LAUNCH_TIMEOUT_S:g} s: check that the code location loads "
                        "(`dg check defs`) and that Dagster's storage answers"
                    )
                time.sleep(0.05)
            output.seek(0)
            launched.append((_launched_run_id(job, answer, output.read().decode(errors="replace")), process.pid))
        return launched


def _answer(path: Path) -> dict | None:
    """The launcher's whole answer, once written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_error(text: str) -> str:
    """The line of the launcher's output that says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("Error")]
    return (errors or lines or ["no output"])[-1][:500]


# What the command follows in a run's event log: its start, its steps' starts and its end.
_FOLLOWED = {
    dg.DagsterEventType.RUN_START,
    dg.DagsterEventType.STEP_START,
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
    dg.DagsterEventType.RUN_CANCELED,
}
_RUN_ENDS = {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED}


def wait(instance: dg.DagsterInstance, runs: list[Submitted], *, wait_s: float, watch=lambda: None) -> None:
    """Until every run has ended: calls `watch()` every second, says which run holds a pool slot one of the
    runs waits for, frees the slots of runs that ended, and terminates a run whose step waited `wait_s` for
    its slot. Each poll reads the runs' new events (a cursor each) and asks about the pools of the steps that
    are waiting only. It says what it waits for at least every SAY_EVERY_S. Dagster's storage not answering
    for a moment (a restart) is ridden out, as the runs ride it out; a run whose worker died with its code
    server is reported failed at once. Only a signal (KeyboardInterrupt) terminates the runs still going."""
    try:
        last_watch = last_said = time.monotonic()
        told: set[tuple[str, str]] = set()
        outage: float | None = None
        while pending := [run for run in runs if not run.ended]:
            try:
                for run in pending:
                    follow(instance, run)
                    if not run.ended and run.started:
                        _watch_pools(instance, run, wait_s, told)
                    if not run.ended:
                        _notice_dead_worker(instance, run)
                outage = None
            except Exception as error:  # noqa: BLE001 - dagster-postgres and SQLAlchemy raise many kinds
                outage = _ride_out(error, outage)
            if time.monotonic() - last_watch >= 1.0:
                watch()
                last_watch = time.monotonic()
            if time.monotonic() - last_said >= SAY_EVERY_S:
                say("still waiting for " + "; ".join(_state(run) for run in runs if not run.ended))
                last_said = time.monotonic()
            if any(not run.ended for run in runs):
                time.sleep(_POLL_S)
    except KeyboardInterrupt:
        terminate(instance, [run.run_id for run in runs])
        raise
    finally:
        # A run worker whose run has ended is only winding down (its interpreter's shutdown took 0.8 to 1.5 s
        # here, after its last event): it is not waited for long.
        ended = all(run.ended for run in runs)
        stop_launched([run.process_group for run in runs], grace_s=ENDED_GRACE_S if ended else 1.0)


SAY_EVERY_S = 30.0  # the longest the command stays silent while it waits
ENDED_GRACE_S = 0.25  # the wait for a run worker to exit after SIGTERM once its run has ended
STORAGE_OUTAGE_S = 300.0  # the longest it waits for Dagster's storage to answer again


def _ride_out(error: Exception, since: float | None) -> float:
    """Dagster's storage did not answer: say so once, and give up (the runs left going) after STORAGE_OUTAGE_S."""
    now = time.monotonic()
    reason = " ".join((str(error).strip().splitlines() or [type(error).__name__])[0].split())[:200]
    if since is None:
        say(f"Dagster's storage did not answer ({type(error).__name__}: {reason}); the runs go on, asking again")
        return now
    if now - since > STORAGE_OUTAGE_S:
        raise AnalyticsViewsError(
            f"Dagster's storage has not answered for {STORAGE_OUTAGE_S:g} s ({reason}): its runs were left going; "
            "check DAGSTER_POSTGRES_URL's server, then follow them in the UI"
        ) from None
    time.sleep(min(5.0, 0.5 * 2 ** min(int(now - since), 4)))
    return since


def _state(run: Submitted) -> str:
    if not run.started:
        return f"run {run.run_id[:8]} of {run.job} to start"
    if run.waiting_since:
        return f"run {run.run_id[:8]} of {run.job}, whose step waits for its pool slot"
    return f"run {run.run_id[:8]} of {run.job} to finish its refreshes"


def _notice_dead_worker(instance: dg.DagsterInstance, run: Submitted) -> None:
    """A started run whose launcher's process group is gone has no worker left (the code server that spawned
    it, and it, were killed: out of memory, kill -9): report it failed now, not after max_runtime_seconds."""
    if not run.started or any(
        _process_group(p.pid) == run.process_group and p.info["status"] != psutil.STATUS_ZOMBIE  # the launcher, unreaped
        for p in psutil.process_iter(["pid", "status"])
    ):
        return
    record = instance.get_run_by_id(run.run_id)
    if record is None or record.is_finished:
        return
    reason = "its run worker died with its code server (killed: out of memory, or kill -9)"
    instance.report_run_failed(record, message=f"{LAUNCHED_BY}: {reason}")
    run.blocked["run"] = f"not refreshed: {reason}; refresh it again, and check the machine's memory"
    run.ended = True


def follow(instance: dg.DagsterInstance, run: Submitted) -> None:
    """Reads the run's events since the last call: whether it started, which steps started, whether it ended."""
    has_more = True
    while has_more:
        result = instance.get_records_for_run(run.run_id, cursor=run.cursor, of_type=_FOLLOWED, limit=1000)
        run.cursor, has_more = result.cursor, result.has_more
        for record in result.records:
            event = record.event_log_entry.dagster_event
            if event.event_type == dg.DagsterEventType.RUN_START:
                run.started = True
            elif event.event_type == dg.DagsterEventType.STEP_START:
                run.started_steps.add(event.step_key)
            elif event.event_type in _RUN_ENDS:
                run.ended = True
    if not run.ended and not run.started:
        # A run that ended before it started (its worker failed to start) records only its status.
        record = instance.get_run_by_id(run.run_id)
        run.ended = record is not None and record.is_finished


def stop_launched(process_groups: list[int], grace_s: float = 1.0) -> None:
    """Stops what the launchers left once their runs have ended: the code server a launcher started serves its
    run until the run ends, and was seen to outlive it (after a terminated run), deaf to SIGTERM (its gRPC
    server's shutdown waits on its heartbeat thread). A run worker gets `grace_s` at most after SIGTERM; then
    it is killed, with the code servers and their multiprocessing helpers, which have nothing left to do."""
    left = [p for p in psutil.process_iter(["pid"]) if _process_group(p.pid) in process_groups]
    servers = [p for p in left if _serves_runs_only(p)]
    others = [p for p in left if p not in servers]
    for process in others:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end between the listing and the signal
            process.terminate()
    _, alive = psutil.wait_procs(others, timeout=grace_s)
    for process in alive + servers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive + servers, timeout=grace_s)


def _serves_runs_only(process: psutil.Process) -> bool:
    """A code server (`dagster api grpc`) or its multiprocessing resource tracker."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return False
    return " api grpc " in command or "multiprocessing.resource_tracker" in command


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def terminate(instance: dg.DagsterInstance, run_ids: list[str]) -> None:
    """Terminates the runs still going, as the UI does, and waits up to STOP_GRACE_S for them to end."""
    going = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.run_coordinator.cancel_run(run_id)
            going.append(run_id)
    deadline = time.monotonic() + STOP_GRACE_S
    while going and time.monotonic() < deadline:
        going = [run_id for run_id in going if not _finished(instance, run_id)]
        time.sleep(0.2)
    for run_id in going:  # its worker did not answer: record the end the command gave it
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_canceled(run, message=f"{LAUNCHED_BY} stopped before its run ended")


def _watch_pools(instance: dg.DagsterInstance, run: Submitted, wait_s: float, told: set) -> None:
    """Notes the run's steps waiting for a pool slot; past `wait_s`, the run is terminated."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    for step, pool in run.pools.items():
        if not pool or step in run.blocked or step in run.started_steps:
            run.waiting_since.pop(step, None)
            continue
        info = storage.get_concurrency_info(pool)
        if not any(s.run_id == run.run_id and s.step_key == step and s.assigned_timestamp is None for s in info.pending_steps):
            run.waiting_since.pop(step, None)
            continue
        since = run.waiting_since.setdefault(step, time.monotonic())
        holder = _live_holder(instance, pool, run.run_id)
        if holder is None:
            continue  # a slot was just freed: the run claims it
        if (step, holder) not in told:
            told.add((step, holder))
            say(f"waiting up to {wait_s:g} s for pool {pool}, held by {holder}")
        if time.monotonic() - since >= wait_s:
            run.blocked[step] = (
                f"not refreshed: its pool {pool} stayed held by {holder} for {wait_s:g} s; refresh it again once "
                "that run ends, or terminate that run in the UI"
            )
    if run.blocked:
        terminate(instance, [run.run_id])


def _live_holder(instance: dg.DagsterInstance, pool: str, run_id: str) -> str | None:
    """Which run holds the pool's slot, or None once the slots of runs that ended are freed (Dagster's daemon
    frees them only run_monitoring's free_slots_after_run_end_seconds later; the view's advisory lock still
    keeps two refreshes of it apart)."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    assigned = {step.run_id: step for step in info.pending_steps if step.assigned_timestamp is not None}
    holders = dict.fromkeys([slot.run_id for slot in info.claimed_slots] + list(assigned))
    live, freed = [], False
    for holder in holders:
        if holder == run_id:
            continue
        record = instance.get_run_record_by_id(holder)
        if record is None:
            since = assigned[holder].enqueued_timestamp if holder in assigned else None
            if since is None or (datetime.now(timezone.utc) - since).total_seconds() < _UNRECORDED_GRACE_S:
                live.append(f"run {holder[:8]} (starting)")
                continue
            ended = "never started"
        elif record.dagster_run.is_finished:
            ended = f"ended {record.dagster_run.status.value}"
        else:
            started = datetime.fromtimestamp(record.start_time or record.create_timestamp.timestamp(), timezone.utc)
            live.append(
                f"run {holder[:8]} ({record.dagster_run.job_name}, {record.dagster_run.status.value} "
                f"since {started:%H:%M:%S} UTC)"
            )
            continue
        instance.event_log_storage.free_concurrency_slots_for_run(holder)
        say(f"freed pool {pool}'s slot held by run {holder[:8]}, which {ended}")
        freed = True
    return ", ".join(live) or (None if freed else "another run")
