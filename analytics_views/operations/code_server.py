"""The code server `analytics-views refresh` launches its runs through, started as the command starts.

`dagster-graphql -w workspace.yaml` starts a code server itself, once its own imports are done, and only then
does the server import Dagster and load the definitions: about 4 s at 500 views before the run was created,
after 3 s of the command's and the launcher's own imports (docs/benchmarks.md, *Scale*). Started by the
command first, the server loads the definitions while the command imports Dagster and loads them too. The
launchers' workspace names it by its socket (`grpc_server:`) under the project's location name, so the runs
carry the same code location as before (the UI's "Re-execute" finds their job). It heads a process group of
its own in the command's session, which the launchers join and its run workers inherit: a Ctrl-C in the
terminal reaches the command only, and stopping the group stops them all (runs.stop_launched). With nobody
sending it heartbeats, it ends HEARTBEAT_S after it started once its runs have ended: a command killed with
-9 leaves nothing behind for long. No Dagster import here: the server starts before the command imports it.
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

LOCATION_NAME = "analytics_views"  # workspace.yaml's
DEFINITIONS_MODULE, DEFINITIONS_ATTRIBUTE = "analytics_views.definitions", "defs"  # workspace.yaml's
HEARTBEAT_S = 300  # at least the longest launch (runs.LAUNCH_TIMEOUT_S): the server must outlive it
READY_TIMEOUT_S = 300.0


@dataclass
class CodeServer:
    process: subprocess.Popen
    socket: Path
    workspace: Path  # a workspace.yaml naming the server, for the launchers
    log: Path

    @property
    def process_group(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        """One line saying why, if the server ended (its definitions did not load)."""
        if self.process.poll() is not None:
            raise AnalyticsViewsError(f"could not start the code location: {last_error(self.log)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start(env: dict[str, str], directory: Path) -> CodeServer:
    """Starts the code server of the project's definitions (as `env` has DAGSTER_HOME and the database's URL),
    its socket, workspace and log in `directory`."""
    socket, workspace, log = directory / "code.sock", directory / "workspace.yaml", directory / "code_server.log"
    workspace.write_text(
        f"load_from:\n  - grpc_server:\n      socket: {socket}\n      location_name: {LOCATION_NAME}\n"
    )
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                *("api", "grpc", "-m", DEFINITIONS_MODULE, "-a", DEFINITIONS_ATTRIBUTE),
                *("--socket", str(socket), "--location-name", LOCATION_NAME),
                *("--heartbeat", "--heartbeat-timeout", str(HEARTBEAT_S)),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    return CodeServer(process, socket, workspace, log)


def launcher_command(server: CodeServer, graphql_args: list[str]) -> list[str]:
    """The command of a launcher: `dagster-graphql graphql_args` against the server's workspace, run as soon as
    the server serves."""
    return [sys.executable, "-m", __name__, str(server.socket), "-w", str(server.workspace), *graphql_args]


def temporary_directory() -> tempfile.TemporaryDirectory:
    """Where a command's server keeps its socket: short, as a Unix socket's path must be (108 bytes)."""
    return tempfile.TemporaryDirectory(prefix="av-", dir="/tmp" if os.path.isdir("/tmp") else None)


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("Error")]
    return (errors or lines or ["no output"])[-1][:500]


if __name__ == "__main__":  # a launcher (launcher_command)
    from dagster_graphql.cli import main  # dagster-graphql's own entry point: the imports a launch needs

    socket = Path(sys.argv[1])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not socket.exists() and time.monotonic() < deadline:  # the command sees a server that ended
        time.sleep(0.02)
    sys.argv = ["dagster-graphql", *sys.argv[2:]]
    sys.exit(main())
