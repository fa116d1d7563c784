"""The CLI's runs never wait for good on a view's pool slot, and stop at once on SIGINT or SIGTERM.

An in-process run (`execute_in_process`) waits for a step's pool slot in a loop that never sleeps and never
looks at signals (Dagster's `interval_to_next_pending_claim_check` is never positive: dagster-io/dagster#20367,
closed unmerged): a slot left to a killed run kept `analytics-views refresh` at 92% CPU, deaf to SIGINT and
SIGTERM. So the CLI claims each step's slot itself before the run starts, under the run's id (a claim for the
same run and step is granted again, so the run's own claim succeeds at once), waiting at most a stated time
and saying which run holds the slot; and it runs the job in a thread of its own, so the main thread keeps
its signal handlers and interrupts the run's step as a terminated run's step is interrupted (executor.py).
"""

import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import dagster as dg

from analytics_views.orchestration import executor

SLOT_WAIT_S = 30.0  # longest wait of `analytics-views refresh` for a view's pool slot held by another run
STOP_GRACE_S = 5.0  # longest wait, after a signal, for the interrupted run to record its end
_POLL_S = 0.5
# A slot held under a run id with no run record: a CLI between claiming and starting its run, or one killed
# in that instant; after this long, the second.
_UNRECORDED_GRACE_S = 60.0


def say(line: str) -> None:
    print(f"analytics-views refresh: {line}", file=sys.stderr, flush=True)


def claim(
    instance: dg.DagsterInstance, run_id: str, pools: dict[str, str | None], *, wait_s: float
) -> dict[str, str]:
    """Claims each step's pool slot (`pools`: step key -> pool) for run `run_id`, waiting at most `wait_s` in
    all, and frees on the way the slots of runs that ended. Returns the steps left without a slot, each with a
    one-line reason naming the run that holds it; their claims are withdrawn."""
    storage = instance.event_log_storage
    waiting = {step: pool for step, pool in pools.items() if pool}
    if not waiting or not storage.supports_global_concurrency_limits:
        return {}
    for pool in set(waiting.values()):
        _initialize(instance, pool)
    deadline = time.monotonic() + wait_s
    told: set[tuple[str, str]] = set()
    while True:
        for step, pool in list(waiting.items()):
            if storage.claim_concurrency_slot(pool, run_id, step).is_claimed:
                del waiting[step]
        if not waiting:
            return {}
        holders = {step: _live_holder(instance, pool, run_id) for step, pool in waiting.items()}
        if None in holders.values() and time.monotonic() < deadline:  # a slot was just freed: claim it at once
            continue
        if time.monotonic() >= deadline:
            break
        for step, holder in holders.items():
            if (step, holder) not in told:
                told.add((step, holder))
                say(f"waiting up to {wait_s:g} s for pool {waiting[step]}, held by {holder}")
        time.sleep(_POLL_S)
    blocked = {}
    for step, pool in waiting.items():
        storage.free_concurrency_slot_for_step(run_id, step)  # leave no claim in the queue
        blocked[step] = (
            f"not refreshed: its pool {pool} stayed held by {holders[step] or 'another run'} for {wait_s:g} s; refresh it "
            "again once that run ends, or terminate that run in the UI"
        )
    return blocked


def release(instance: dg.DagsterInstance, run_id: str) -> None:
    """Frees every slot and claim of the run: a step that never ran (skipped, interrupted) keeps its own."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _initialize(instance: dg.DagsterInstance, pool: str) -> None:
    """Gives a pool Dagster has not seen yet its default limit, as a run's own claim does first."""
    default = instance.get_concurrency_config().pool_config.default_pool_limit
    known = {limit.name: limit for limit in instance.event_log_storage.get_pool_limits()}
    if default is not None and (pool not in known or (known[pool].from_default and known[pool].limit != default)):
        instance.event_log_storage.initialize_concurrency_limit_to_default(pool)


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


def run_interruptibly(
    instance: dg.DagsterInstance, run_id: str, execute: Callable[[], object], watch: Callable[[], None] = lambda: None
):
    """`execute()` (the run `run_id`) in a thread, calling `watch()` every second meanwhile; a signal in the main
    thread (KeyboardInterrupt, or any exception its handler raises) cancels the run and interrupts its step
    before it goes on."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = execute()
        except BaseException as error:  # noqa: BLE001 - raised again in the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"run {run_id[:8]}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(1.0)
            watch()
    except BaseException:
        _stop(instance, run_id, thread)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop(instance: dg.DagsterInstance, run_id: str, thread: threading.Thread) -> None:
    """Ends the run as canceled: its step's query cancelled (the view keeps its contents), its later steps not run."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceling(run, message="analytics-views refresh received a signal to stop")
    executor.interrupt_thread(thread.ident)
    thread.join(STOP_GRACE_S)
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:  # for instance a step still waiting out a retry's delay
        instance.report_run_canceled(run, message="analytics-views refresh stopped before its run ended")
    if not thread.is_alive():
        executor.forget_interrupt(thread.ident)
