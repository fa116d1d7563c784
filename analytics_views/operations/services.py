"""The Dagster webserver and daemon as child processes that are always stopped, children included.

`dagster dev`'s children can outlive a signal sent to it, so we start `dagster-webserver` and
`dagster-daemon` ourselves, each in its own session, and on stop signal every process of those sessions,
then kill whatever is still alive after a grace period.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from analytics_views.orchestration.dagster_storage import check_storage
from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
DAGSTER_YAML = PROJECT_ROOT / "deploy" / "dagster.yaml"  # not in the root: see its first comment
STOP_GRACE_S = 10.0


def prepare_dagster_home(path: Path, dagster_yaml: Path = DAGSTER_YAML) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the project's own (linked, so there is one copy)."""
    path.mkdir(parents=True, exist_ok=True)
    link = path / "dagster.yaml"
    if not link.is_symlink() or link.resolve() != dagster_yaml.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(dagster_yaml)
    return path


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise AnalyticsViewsError(
                f"cannot listen on {host}:{port} ({error.strerror}): stop what uses it or pass --port"
            ) from error


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _process_tree(processes: list[subprocess.Popen]) -> list[psutil.Process]:
    tree = []
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return tree


def stop_processes(processes: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each leader (webserver, daemon), then once each process left in their trees and sessions, SIGKILL
    the ones still alive after grace_s.

    Once: Dagster's processes turn SIGTERM into KeyboardInterrupt, and a second one landing while the first
    is handled ends a code server with a traceback ("release unlocked lock") instead of a clean stop."""
    tree = _process_tree(processes)
    groups = {process.pid for process in processes}  # each child leads its own session and process group
    # The leaders first: the daemon, stopped while its code server still serves, launches no run into a code
    # server that is going (its sensors' launches failed with tracebacks when the whole group was signalled
    # at once), and stops the code servers it started; what is left of their groups is signalled after.
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    psutil.wait_procs([p for p in tree if p.pid in groups], timeout=grace_s)
    for member in tree:
        try:
            if member.is_running() and member.pid not in groups and os.getpgid(member.pid) in groups:
                member.terminate()  # once: the leaders' signal did not reach it
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    for member in tree:
        try:
            if os.getpgid(member.pid) not in groups:  # one that left its group: not reached by killpg
                member.terminate()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_for_webserver(host: str, port: int, processes: list[subprocess.Popen], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://{host}:{port}/server_info"
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise AnalyticsViewsError(
                    f"{' '.join(map(str, process.args[:1]))} exited with status {process.returncode} while "
                    "starting: read its output above"
                )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AnalyticsViewsError(f"the Dagster webserver did not answer on {url} within {timeout_s:.0f} s")


@contextmanager
def dagster_services(
    *,
    env: dict[str, str],
    host: str = "127.0.0.1",
    port: int = 3000,
    log_dir: Path | None = None,
    workspace: Path = WORKSPACE,
) -> Iterator[list[subprocess.Popen]]:
    """Run dagster-webserver and dagster-daemon on `workspace` until the block ends; output to log_dir when
    given."""
    ensure_port_free(host, port)
    if env.get("DAGSTER_HOME"):  # a wrong storage URL in one line here, not in pages of both services' logs
        check_storage(env["DAGSTER_HOME"], env)
    commands = {
        "webserver": [_bin("dagster-webserver"), "-h", host, "-p", str(port), "-w", str(workspace)],
        "daemon": [_bin("dagster-daemon"), "run", "-w", str(workspace)],
    }
    processes: list[subprocess.Popen] = []
    logs = []
    try:
        for name, command in commands.items():
            output = None
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                output = open(log_dir / f"{name}.log", "ab")
                logs.append(output)
            processes.append(
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=PROJECT_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    start_new_session=True,  # our own signals reach it only through stop_processes
                )
            )
        wait_for_webserver(host, port, processes)
        yield processes
    finally:
        stop_processes(processes)
        for output in logs:
            output.close()
