"""A run's steps in threads of the run's own process: independent views refresh at the same time.

Dagster runs steps in parallel only in processes of their own (the multiprocess executor), and each costs
seconds to start and connect to the instance, where a refresh spends its time waiting on PostgreSQL. Here
every step runs in a thread of the run worker, with the run's resources and log capture, scheduled by
Dagster's own `ActiveExecution` as the multiprocess executor schedules processes: step order from asset
deps, pools (one refresh of a view at a time), retries and their backoff all behave as they do there.

Termination: Dagster interrupts the run's main thread only, and raises the interrupt in a step's own code
only. Steps mark the blocks a terminated run may interrupt with `on_interrupt`, naming how to stop what the
block waits on (a query's cancel: no Python exception reaches a thread blocked in C); the executor calls it
and raises DagsterExecutionInterruptedError in the block, and a step interrupted before such a block raises
it on entering the block.

`refresh_executor` offers these threads (the default), Dagster's `in_process` and its `multiprocess`.
"""

import ctypes
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import dagster as dg
from dagster import Field, Selector
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    _core_in_process_executor_creation,
    _core_multiprocess_executor_creation,
    _get_default_executor_requirements,
    check_cross_process_constraints,
    get_retries_config,
)
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import ExecuteRunWithPlanIterable
from dagster._core.execution.compute_logs import create_compute_log_file_key
from dagster._core.execution.context.system import PlanExecutionContext, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.execute_plan import _trigger_hook, dagster_event_sequence_for_step
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.objects import ErrorSource, step_failure_event_from_exc_info
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.base import Executor
from dagster._utils.timing import time_execution_scope

DEFAULT_MAX_CONCURRENT = 8  # the refreshes run in PostgreSQL, not on the local cores
_IDLE_WAIT_S = 0.05  # longest wait for a step event before looking for interrupts and steps ready to run

# Step threads interrupted by a terminated run, and the callbacks of the interruptible blocks each thread is
# in (on_interrupt), by thread id.
_interrupted: set[int] = set()
_interrupt_callbacks: dict[int, list[Callable[[], None]]] = {}
_lock = threading.Lock()


@contextmanager
def on_interrupt(callback: Callable[[], None]) -> Iterator[None]:
    """A block of a step that a terminated run may interrupt: in a step thread, `callback` (for example
    `conn.cancel_safe`) is called from another thread to stop what the block waits on, and
    DagsterExecutionInterruptedError is raised in the block. Outside step threads (Dagster's in_process and
    multiprocess executors) it only runs the block, unless `interrupt_thread` is called for the thread (the
    CLI's runs): elsewhere Dagster interrupts the step itself."""
    ident = threading.get_ident()
    with _lock:
        if ident in _interrupted:
            raise DagsterExecutionInterruptedError()
        _interrupt_callbacks.setdefault(ident, []).append(callback)
    try:
        yield
    finally:
        with _lock:
            callbacks = _interrupt_callbacks[ident]
            callbacks.remove(callback)
            if not callbacks:
                del _interrupt_callbacks[ident]


class _Done:
    """A step thread's last message: whether it ended with an exception Dagster did not turn into events."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class _StepThread(threading.Thread):
    def __init__(self, step_context, events: queue.SimpleQueue):
        super().__init__(name=f"step {step_context.step.key}", daemon=True)
        self.step_context = step_context
        self.events = events
        self.step_events: list[DagsterEvent] = []
        self.finished = False

    def run(self) -> None:
        key, error = self.step_context.step.key, None
        try:
            for event in dagster_event_sequence_for_step(self.step_context):
                self.events.put((key, event))
        except BaseException as raised:  # the main thread raises it, as the in-process executor would
            error = raised
        finally:
            with _lock:
                self.finished = True  # no interrupt is sent to a thread that has finished its step
                _interrupted.discard(threading.get_ident())  # thread ids are reused
            self.events.put((key, _Done(error)))

    def interrupt(self) -> None:
        with _lock:
            if self.finished or self.ident is None:
                return
            callbacks = _interrupt_locked(self.ident)
        _call(callbacks)


def _interrupt_locked(ident: int) -> list[Callable[[], None]]:
    _interrupted.add(ident)
    callbacks = list(_interrupt_callbacks.get(ident, ()))
    if callbacks:  # in an interruptible block of the step's own code: raise there
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(DagsterExecutionInterruptedError))
    return callbacks


def _call(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the step may already be ending; its own error handling reports it
            pass


def interrupt_thread(ident: int) -> None:
    """Interrupt the step running in thread `ident` as a terminated run interrupts a step thread, and make the
    thread's later interruptible blocks raise at once: for an in-process run in a thread of its own (the CLI's),
    whose main thread handles the signals. Call `forget_interrupt` once the thread has ended."""
    with _lock:
        callbacks = _interrupt_locked(ident)
    _call(callbacks)


def forget_interrupt(ident: int) -> None:
    with _lock:
        _interrupted.discard(ident)  # thread ids are reused


def _threaded_plan_iterator(
    job_context: PlanExecutionContext, execution_plan: ExecutionPlan, max_concurrent: int
) -> Iterator[DagsterEvent]:
    """Dagster's inner_plan_execution_iterator, with each step in a thread instead of one after another."""
    compute_log_manager = job_context.instance.compute_log_manager
    step_keys = [step.key for step in execution_plan.get_steps_to_execute_in_topo_order()]
    with ExitStack() as stack:
        concurrency = stack.enter_context(InstanceConcurrencyContext(job_context.instance, job_context.dagster_run))
        active = stack.enter_context(
            execution_plan.start(
                retry_mode=job_context.retry_mode,
                instance_concurrency_context=concurrency,
                step_dependency_config=job_context.step_dependency_config,
            )
        )
        # One log capture for the process, as in process: captures cannot nest per thread.
        log_key = compute_log_manager.build_log_key_for_run(job_context.run_id, create_compute_log_file_key())
        log_context = stack.enter_context(compute_log_manager.capture_logs(log_key))
        yield DagsterEvent.capture_logs(job_context, step_keys, log_key, log_context)

        events: queue.SimpleQueue = queue.SimpleQueue()
        running: dict[str, _StepThread] = {}
        backing_off: set[str] = set()  # steps up for retry, waiting for their retry's delay
        errors: list[BaseException] = []
        stopping = False
        try:
            while running or (not stopping and not active.is_complete):
                if not stopping and active.check_for_interrupts():
                    stopping = True
                    active.mark_interrupted()
                    yield DagsterEvent.engine_event(
                        job_context,
                        "Termination requested: interrupting the running steps",
                        EngineEventData.interrupted(list(running)),
                    )
                    for thread in running.values():
                        thread.interrupt()
                if not stopping:
                    for step in active.get_steps_to_execute(limit=max_concurrent - len(running)):
                        backing_off.discard(step.key)
                        thread = _StepThread(job_context.for_step(step, active.get_known_state()), events)
                        running[step.key] = thread
                        thread.start()
                    yield from active.concurrency_event_iterator(job_context)
                try:
                    key, message = events.get(timeout=_IDLE_WAIT_S)
                except queue.Empty:
                    # A thread interrupted as it finished may have ended without its last message.
                    for key in [key for key, thread in running.items() if not thread.is_alive()]:
                        events.put((key, _Done(DagsterExecutionInterruptedError())))
                    continue
                thread = running.get(key)
                if thread is None:  # a second last message for a thread already accounted for
                    continue
                if isinstance(message, _Done):
                    del running[key]
                    thread.join()
                    if message.error is not None:  # start nothing more; the steps running finish first
                        errors.append(message.error)
                        stopping = True
                        continue
                    active.verify_complete(job_context, key)
                    yield from active.plan_events_iterator(job_context)
                    yield from _trigger_hook(thread.step_context, thread.step_events)
                else:
                    thread.step_events.append(message)
                    yield message
                    active.handle_event(message)
                    if message.is_step_up_for_retry:
                        backing_off.add(key)
            if stopping:
                # A step waiting out its retry's delay has no thread to interrupt: it fails here, or the run
                # would end with the step still in progress (its last event being STEP_UP_FOR_RETRY).
                yield from _fail_interrupted(job_context, execution_plan, active, sorted(backing_off))
        finally:
            for thread in running.values():  # an error in this loop: stop the steps before leaving
                thread.interrupt()
                thread.join()
        interrupts = [e for e in errors if isinstance(e, (DagsterExecutionInterruptedError, KeyboardInterrupt))]
        if errors and len(interrupts) < len(errors):
            raise next(e for e in errors if e not in interrupts)
        if stopping or interrupts:
            raise DagsterExecutionInterruptedError()


def _fail_interrupted(job_context, execution_plan, active, step_keys: list[str]) -> Iterator[DagsterEvent]:
    """A failure event for each step (not in flight: the active execution is not told, the run is ending)."""
    for key in step_keys:
        step_context = job_context.for_step(execution_plan.get_step_by_key(key), active.get_known_state())
        try:
            raise DagsterExecutionInterruptedError(f"the run stopped while {key} waited to retry")
        except DagsterExecutionInterruptedError:
            yield step_failure_event_from_exc_info(step_context, sys.exc_info(), error_source=ErrorSource.INTERRUPT)


class ThreadExecutor(Executor):
    def __init__(self, retries: RetryMode, max_concurrent: int = DEFAULT_MAX_CONCURRENT):
        self._retries = retries
        self._max_concurrent = max_concurrent

    @property
    def retries(self) -> RetryMode:
        return self._retries

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        step_keys = execution_plan.step_keys_to_execute
        yield DagsterEvent.engine_event(
            plan_context,
            f"Executing steps in threads of process {os.getpid()}, at most {self._max_concurrent} at a time",
            event_specific_data=EngineEventData.in_process(os.getpid(), step_keys),
        )
        with time_execution_scope() as timer:
            yield from ExecuteRunWithPlanIterable(
                execution_plan=plan_context.execution_plan,
                iterator=partial(_threaded_plan_iterator, max_concurrent=self._max_concurrent),
                execution_context_manager=PlanExecutionContextManager(
                    job=plan_context.job,
                    retry_mode=plan_context.retry_mode,
                    execution_plan=plan_context.execution_plan,
                    run_config=plan_context.run_config,
                    dagster_run=plan_context.dagster_run,
                    instance=plan_context.instance,
                    raise_on_error=plan_context.raise_on_error,
                    output_capture=plan_context.output_capture,
                    step_dependency_config=self.step_dependency_config,
                ),
            )
        yield DagsterEvent.engine_event(
            plan_context,
            f"Finished steps in threads of process {os.getpid()} in {timer.millis / 1000:.3f} s",
            event_specific_data=EngineEventData.in_process(os.getpid(), step_keys),
        )


THREADS_CONFIG = Field(
    {
        "max_concurrent": Field(int, default_value=DEFAULT_MAX_CONCURRENT, description="Most steps at once."),
        "retries": get_retries_config(),
    },
    description="Execute steps in threads of the run's process, each as soon as the steps it depends on "
    "have finished.",
)


@dg.executor(
    name="refresh_executor",
    config_schema=Field(
        Selector({"threads": THREADS_CONFIG, "in_process": IN_PROC_CONFIG, "multiprocess": MULTI_PROC_CONFIG}),
        default_value={"threads": {}},
    ),
    requirements=_get_default_executor_requirements,
)
def refresh_executor(init_context: dg.InitExecutorContext) -> Executor:
    """Steps in threads of the run's process (`threads`, the default), one after another (`in_process`),
    or in processes of their own (`multiprocess`, Dagster's default executor)."""
    [(kind, config)] = init_context.executor_config.items()
    if kind == "threads":
        return ThreadExecutor(RetryMode.from_config(config["retries"]), config["max_concurrent"])
    if kind == "in_process":
        return _core_in_process_executor_creation(config)
    check_cross_process_constraints(init_context)
    return _core_multiprocess_executor_creation(config)

