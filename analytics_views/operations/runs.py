"""The runs `analytics-views refresh` submits: real runs, launched through the code location.

Each is launched as the daemon launches a scheduled run: `dagster job launch` (Dagster's own command) loads
the workspace's code location and submits the run to the instance's run launcher, which starts a run worker
with the jobs' executor. So the run carries its code-location origin (the UI's Overview timeline shows it,
"Re-execute" runs the same job) and a tag naming who launched it. The command then waits for the run in the
instance, saying on stderr what it waits for: a view's pool slot held by another run (at most `wait_s`,
after which the run is terminated and the view reported not refreshed; a slot left to a run that ended is
freed at once), or a lock held by another session. SIGINT or SIGTERM terminate the run as the UI's
"Terminate" does: the run worker cancels its queries, and the views keep their previous contents.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
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
_POLL_S = 0.5
# A slot held under a run id with no run record: a run between its claim and its record, or one killed in
# that instant; after this long, the second.
_UNRECORDED_GRACE_S = 60.0


def say(line: str) -> None:
    print(f"analytics-views refresh: {line}", file=sys.stderr, flush=True)


@dataclass
class Submitted:
    """A launched run, and what the command learned while it waited for it."""

    run_id: str
    job: str
    pools: dict[str, str | None]  # step key -> pool
    process_group: int  # of its `dagster job launch`, whose code server serves the run until it ends
    waiting_since: dict[str, float] = field(default_factory=dict)  # steps waiting for their pool slot
    blocked: dict[str, str] = field(default_factory=dict)  # steps not run, with the one-line reason


@dataclass(frozen=True)
class Launch:
    """A run to submit: `job`, only `steps` when given, with `run_config`."""

    job: str
    steps: list[str] | None
    run_config: dict


def launch(launches: list[Launch], env: dict[str, str]) -> list[tuple[str, int]]:
    """Submits the runs through the code location, all at once; returns each run's id and the process group
    of its launcher (stop_launched stops what is left of it once the run has ended), in order."""
    with ExitStack() as stack:
        started = []
        for request in launches:
            run_id = str(uuid.uuid4())
            command = [
                str(Path(sys.executable).parent / "dagster"),
                *("job", "launch", "-w", str(WORKSPACE), "-j", request.job, "--run-id", run_id),
                *("--tags", json.dumps({LAUNCHED_BY_TAG: LAUNCHED_BY}), "--config-json", json.dumps(request.run_config)),
                *(("-o", ",".join(request.steps)) if request.steps else ()),
            ]
            # The run worker inherits this output and writes its log there after `dagster job launch` has
            # returned: a file, not a pipe that would close under it. Its own session: a Ctrl-C in the
            # terminal reaches this command only, which terminates the run through the instance.
            output = stack.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(
                command,
                env=env,
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            stack.callback(_stop_launcher, process)
            started.append((request.job, run_id, process, output))
        for job, _, process, output in started:
            try:
                returncode = process.wait(timeout=LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AnalyticsViewsError(
                    f"launching {job} took over {LAUNCH_TIMEOUT_S:g} s: check that the code location loads "
                    "(`dg check defs`) and that Dagster's storage answers"
                ) from None
            if returncode != 0:
                output.seek(0)
                raise AnalyticsViewsError(f"could not launch {job}: {_last_error(output.read().decode(errors='replace'))}")
        return [(run_id, process.pid) for _, run_id, process, _ in started]


def _stop_launcher(process: subprocess.Popen) -> None:
    """A launcher still going when this command stops (a signal, another launch failed) is stopped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def _last_error(text: str) -> str:
    """The line of `dagster job launch`'s output that says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("Error")]
    return (errors or lines or ["no output"])[-1][:500]


def wait(instance: dg.DagsterInstance, runs: list[Submitted], *, wait_s: float, watch=lambda: None) -> None:
    """Until every run has ended: calls `watch()` every second, says which run holds a pool slot one of the
    runs waits for, frees the slots of runs that ended, and terminates a run whose step waited `wait_s` for
    its slot. A signal (KeyboardInterrupt) terminates every run still going, then is raised again."""
    try:
        last_watch = 0.0
        told: set[tuple[str, str]] = set()
        while pending := [run for run in runs if not _finished(instance, run.run_id)]:
            for run in pending:
                _watch_pools(instance, run, wait_s, told)
            if time.monotonic() - last_watch >= 1.0:
                watch()
                last_watch = time.monotonic()
            time.sleep(_POLL_S)
    except BaseException:
        terminate(instance, [run.run_id for run in runs])
        raise
    finally:
        stop_launched([run.process_group for run in runs])


def stop_launched(process_groups: list[int], grace_s: float = 5.0) -> None:
    """Stops what the launchers left once their runs have ended: the code server `dagster job launch` started
    serves its run until the run ends, and was seen to outlive it (after a terminated run), deaf to SIGTERM."""
    left = [p for p in psutil.process_iter(["pid"]) if _process_group(p.pid) in process_groups]
    for process in left:
        process.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive:
        process.kill()


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
        if not pool or step in run.blocked:
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
