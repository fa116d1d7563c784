"""How `analytics-views refresh` launches its runs through the code location, and stops what the launch left.

The launcher (`python -m analytics_views.operations.launcher DIRECTORY`) runs `dagster-graphql` as the daemon
launches a scheduled run: Dagster's GraphQL `launchRun` submits each run, for the chosen views (an asset
selection of the cadence's job), to the instance's run launcher, which starts a run worker from the code
server. So the run carries its code-location origin (the UI's Overview timeline shows it, "Re-execute" runs the
same job) and tags naming who launched it. (`dagster job launch` selects ops, not assets: a cadence's views are
one op.)

It is started first, before the command imports Dagster, and it starts the code server of workspace.yaml's
location before its own imports (`dagster api grpc` on a socket in DIRECTORY, reached through a `grpc_server:`
workspace under the same location name): the server loads the definitions while the launcher and the command
import Dagster. `dagster-graphql` reads its GraphQL document from its arguments; this one reads it (one JSON
line, `{"query": ..., "variables": ...}`) from its standard input once the workspace has loaded, so that the
command works out what to launch meanwhile; an empty line or a closed input launches nothing. Once the runs are
launched it asks the server to end when they have (`shutdownRepositoryLocation`, as dagster-graphql does with a
server it starts), and waits for it. Built on `dagster_graphql.cli` (`main`, the console script, and
`execute_query_from_cli`, which `main` calls once the workspace has loaded, and `execute_query`): dagster-graphql
has no option to read the document later (no upstream issue found). This module imports no Dagster at its top:
the command imports it before anything else.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
LAUNCHED_BY_TAG = "analytics_views/launched_by"
LAUNCHED_BY = "analytics-views refresh"
SLOT_WAIT_S = 30.0  # longest wait of `analytics-views refresh` for a view's pool slot held by another run
LAUNCH_TIMEOUT_S = 300.0
ANSWER, SOCKET = "answer.json", "code.sock"  # in the launcher's directory
KILLED_WAIT_S = 2.0  # the longest wait, on close, for a launcher stopped with its runs' end to be gone


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
LAUNCH_TAG = "analytics_views/launch"  # one value per command: the runs it launched, found even when not answered
_LAUNCHED = """
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
    ... on Error { message }
"""


def _launch_document(launches: list[Launch], launch_id: str) -> dict:
    """One GraphQL document launching every run (`launchRun` once each, run one after another), and its
    variables."""
    variables = {}
    for number, request in enumerate(launches):
        selector: dict = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME, "jobName": request.job}
        if request.assets is not None:
            # With the checks the job holds for those assets only: left out, Dagster would add every check of the
            # assets, the definition checks too (definition_checks.py), which have a job of their own.
            selector["assetSelection"] = [{"path": path} for path in request.assets]
            selector["assetCheckSelection"] = [
                {"assetKey": {"path": path}, "name": name} for path, name in request.checks
            ]
        tags = [{"key": LAUNCHED_BY_TAG, "value": LAUNCHED_BY}, {"key": LAUNCH_TAG, "value": launch_id}]
        variables[f"run{number}"] = {
            "selector": selector,
            "runConfigData": request.run_config,
            "executionMetadata": {"tags": tags},
        }
    parameters = ", ".join(f"${name}: ExecutionParams!" for name in variables)
    fields = "\n".join(f"  {name}: launchRun(executionParams: ${name}) {{{_LAUNCHED}  }}" for name in variables)
    return {"query": f"mutation LaunchRuns({parameters}) {{\n{fields}\n}}", "variables": variables}


def _launched_run_id(job: str, result: dict) -> str:
    """The run id of one `launchRun` answer, or one line saying why it launched nothing."""
    if result.get("__typename") == "LaunchRunSuccess":
        return result["run"]["runId"]
    reason = result.get("message") or "; ".join(e["message"] for e in result.get("errors", [])) or json.dumps(result)[:500]
    raise AnalyticsViewsError(f"could not launch {job}: {' '.join(reason.split())[:500]}")


class Launcher:
    """Launches the command's runs through the code location (launcher.py: `dagster-graphql` that reads what to
    launch once the workspace has loaded), started first, so that it imports Dagster and its code server loads
    the definitions while the command works out what to refresh. Its process group holds that code server,
    which serves the runs until they end (stop_launched); left unused, it is stopped on close."""

    def __init__(self, env: dict[str, str]):
        self._stack = ExitStack()
        # Its answer, and the code server's socket and workspace: a short path, as a socket's must be (108 bytes).
        self._directory = Path(tempfile.mkdtemp(prefix="av-launch-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self._answer = self._directory / ANSWER
        # The run worker inherits this output and writes its log there after the launcher has returned: a file,
        # not a pipe that would close under it. Its own session: a Ctrl-C in the terminal reaches this command
        # only, which terminates the runs through the instance.
        self._output = self._stack.enter_context(tempfile.TemporaryFile())
        self._process = subprocess.Popen(
            [sys.executable, "-m", "analytics_views.operations.launcher", str(self._directory)],
            env=env,
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.process_group = self._process.pid
        self.launch_id = uuid.uuid4().hex
        self._sent = False

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def launch(self, launches: list[Launch]) -> list[str | AnalyticsViewsError]:
        """Submits the runs, each a run id, or the error saying why it was not launched, in order."""
        if not launches:  # nothing to send: closing stops the launcher
            return []
        self._sent = True
        with contextlib.suppress(BrokenPipeError):  # it ended already: its output says why
            try:
                self._process.stdin.write(json.dumps(_launch_document(launches, self.launch_id)).encode() + b"\n")
            finally:
                self._process.stdin.close()
        # The launcher writes its answer once the runs are submitted, then waits for its code server, which
        # serves the runs until they end: the answer, not the launcher's exit, says they are launched.
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while (answer := _answer(self._answer)) is None and self._process.poll() is None:
            if time.monotonic() > deadline:
                raise AnalyticsViewsError(
                    f"launching {', '.join(launch.job for launch in launches)} took over {LAUNCH_TIMEOUT_S:g} s: "
                    "check that the code location loads (`dg check defs`) and that Dagster's storage answers"
                )
            time.sleep(0.05)
        if answer is None:  # it ended without answering
            self._output.seek(0)
            reason = _last_error(self._output.read().decode(errors="replace"))
            return [AnalyticsViewsError(f"could not launch {request.job}: {reason}") for request in launches]
        results = answer.get("data") or {}
        launched: list[str | AnalyticsViewsError] = []
        for number, request in enumerate(launches):
            try:
                launched.append(_launched_run_id(request.job, results.get(f"run{number}") or answer))
            except AnalyticsViewsError as error:
                launched.append(error)
        return launched

    def close(self) -> None:
        """Stops the launcher and its code server unless it launched the runs (they then serve them)."""
        if not self._sent:
            with contextlib.suppress(ProcessLookupError):  # the whole group at once: a server it is starting too
                os.killpg(self.process_group, signal.SIGKILL)
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed, here or with its runs' end: milliseconds
            self._process.wait(timeout=KILLED_WAIT_S)
        if self._process.poll() is not None:  # else it serves runs still, and removes it once they have ended
            shutil.rmtree(self._directory, ignore_errors=True)
        self._stack.close()


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


def stop_launched(process_groups: list[int], grace_s: float = 1.0) -> None:
    """Stops what the launchers left once their runs have ended: the code server a launcher started serves its
    run until the run ends, and was seen to outlive it (after a terminated run), deaf to SIGTERM (its gRPC
    server's shutdown waits on its heartbeat thread). A run worker gets `grace_s` at most after SIGTERM; then
    it is killed, with the code servers and their multiprocessing helpers, which have nothing left to do."""
    left = [p for p in psutil.process_iter(["pid"]) if process_group(p.pid) in process_groups]
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


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def main() -> None:
    """The launcher process: starts the code server, then imports dagster-graphql while the server loads the
    definitions; runs the document it reads once the workspace has loaded; then waits for the server, which
    serves the runs until they end."""
    directory = Path(sys.argv[1])
    try:
        server, workspace, location_name = _start_code_server(directory)
        import dagster_graphql.cli as graphql_cli

        execute_query = graphql_cli.execute_query_from_cli
        requested = []

        def execute_query_from_stdin(workspace_process_context, query, variables=None, output=None):
            line = sys.stdin.readline().strip()
            if not line:  # the command stopped before it launched anything
                return None
            document = json.loads(line)
            requested.append(document)
            answer = execute_query(workspace_process_context, document["query"], json.dumps(document["variables"]), output)
            # The server ends once the runs it started have ended (ShutdownServer), as a code server dagster-graphql
            # starts itself does when dagster-graphql is done. Failing that, the command stops it with its runs'
            # end, or its heartbeat timeout does.
            with contextlib.suppress(Exception):
                graphql_cli.execute_query(workspace_process_context, _SHUT_DOWN_ONCE_RUNS_END, {"location": location_name})
            return answer

        graphql_cli.execute_query_from_cli = execute_query_from_stdin
        _wait_until_serving(server, directory / SOCKET)
        sys.argv = ["dagster-graphql", "-w", str(workspace), "-o", str(directory / ANSWER), "--text", "read from stdin"]
        try:
            graphql_cli.main()
        except SystemExit as done:
            if done.code:  # the workspace did not load: no run was launched
                server.kill()
                raise
        if requested:
            server.wait()  # it serves the runs until they end, then stops
        else:
            server.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_serving(server: subprocess.Popen, socket: Path) -> None:
    """Until the server listens (it opens its socket once it has loaded the definitions); its error, printed
    to this launcher's output, and exit 1, if it ended."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not socket.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(1)  # its output, this launcher's, says why
        time.sleep(0.02)


def _start_code_server(directory: Path) -> tuple[subprocess.Popen, Path, str]:
    """workspace.yaml's code location, served on a socket in `directory` by a code server started now, and a
    workspace naming it under the same location name (so the runs carry the same code location)."""
    (location,) = [entry["python_module"] for entry in yaml.safe_load(WORKSPACE.read_text())["load_from"]]
    socket, workspace = directory / SOCKET, directory / "workspace.yaml"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "dagster", "api", "grpc",
            *("-m", location["module_name"], "-a", location["attribute"]),
            *("--socket", str(socket), "--location-name", location["location_name"]),
            *("--heartbeat", "--heartbeat-timeout", str(int(2 * LAUNCH_TIMEOUT_S))),
        ],
        stdin=subprocess.DEVNULL,
    )
    workspace.write_text(
        yaml.safe_dump({"load_from": [{"grpc_server": {"socket": str(socket), "location_name": location["location_name"]}}]})
    )
    return server, workspace, location["location_name"]


_SHUT_DOWN_ONCE_RUNS_END = """
mutation ShutDown($location: String!) { shutdownRepositoryLocation(repositoryLocationName: $location) { __typename } }
"""


if __name__ == "__main__":
    main()
