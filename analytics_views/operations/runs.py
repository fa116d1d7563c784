"""The runs `analytics-views refresh` submits, followed until they end.

They are real runs, launched through the code location as the daemon launches a scheduled run (launcher.py).
The command follows the runs' events with a cursor, saying on stderr what it waits for: its step's pool slot
held by another run (asked only while the step waits; at most `wait_s`, after which the run is terminated and
its views reported not refreshed; a slot left to a run that ended is freed at once), or a lock held by another
session. SIGINT or SIGTERM terminate the runs as the UI's "Terminate" does: the run worker cancels its queries,
and the views keep their previous contents.
"""

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import dagster as dg
import psutil

from analytics_views.errors import AnalyticsViewsError
from analytics_views.operations.launcher import LAUNCHED_BY, LAUNCH_TAG, stop_launched, process_group

STOP_GRACE_S = 10.0  # longest wait, after a signal, for the terminated runs to record their end
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
        # here, after its last event): it is not waited for.
        ended = all(run.ended for run in runs)
        stop_launched([run.process_group for run in runs], grace_s=ENDED_GRACE_S if ended else 1.0)


SAY_EVERY_S = 30.0  # the longest the command stays silent while it waits
ENDED_GRACE_S = 0.0  # the wait for a run worker to exit after SIGTERM once its run has ended: none, it is killed
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
        process_group(p.pid) == run.process_group and p.info["status"] != psutil.STATUS_ZOMBIE  # the launcher, unreaped
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


def _finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def launched_by(instance: dg.DagsterInstance, launch_id: str) -> list[str]:
    """The runs one command launched (Launcher.launch_id), whether or not their launch was answered."""
    return [run.run_id for run in instance.get_runs(dg.RunsFilter(tags={LAUNCH_TAG: launch_id}))]


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
