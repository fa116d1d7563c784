"""What `refresh` does when the world fails under it (issue 26): Dagster's storage gone for a moment, the run
worker killed with its code server, a process that exits while it is being stopped; and twenty calls at once
(issue 25)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql

from analytics_views.operations import launcher
from analytics_views_tests.operations.test_cli import dagster_home, left_behind  # noqa: F401 - a fixture

COMMAND = str(Path(sys.executable).parent / "analytics-views")


def start_refresh(view: str, env: dict, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [COMMAND, "refresh", view, "--force"],
        env={**os.environ, **env, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock_wait(url: str, view: str, refresh: subprocess.Popen) -> None:
    """Until the run's refresh of `view` waits for a lock: the run has started and is busy in the database."""
    deadline = time.monotonic() + 120
    with psycopg.connect(url, autocommit=True) as conn:
        while not conn.execute(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name LIKE %s AND wait_event_type = 'Lock')",
            [f"analytics-views {view} run %"],
        ).fetchone()[0]:
            assert refresh.poll() is None, refresh.communicate()
            assert time.monotonic() < deadline, "the refresh never waited for the lock"
            time.sleep(0.2)


@pytest.fixture
def locked_events(seeded_db):
    """A session holding ACCESS EXCLUSIVE on events (weekly_aggregations reads it) until it lets go."""
    with psycopg.connect(seeded_db) as holder:
        holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        yield holder
        holder.rollback()


def test_a_moment_without_dagster_s_storage_is_ridden_out(seeded_db, empty_db, dagster_home, locked_events):
    refresh = start_refresh("weekly_aggregations", dagster_home, seeded_db)
    wait_for_lock_wait(seeded_db, "weekly_aggregations", refresh)
    storage = psycopg.conninfo.conninfo_to_dict(empty_db)["dbname"]
    with psycopg.connect(seeded_db, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(storage)))
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [storage])
        time.sleep(3)
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(storage)))
    locked_events.rollback()
    out, err = refresh.communicate(timeout=240)
    assert refresh.returncode == 0, out + err
    assert out.startswith("weekly_aggregations: refreshed (")
    assert "Traceback" not in err


def test_a_run_worker_killed_with_its_code_server_is_reported_at_once(seeded_db, dagster_home, locked_events):
    refresh = start_refresh("weekly_aggregations", dagster_home, seeded_db)
    wait_for_lock_wait(seeded_db, "weekly_aggregations", refresh)
    groups = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "analytics_views.operations.launcher" in " ".join(process.info["cmdline"] or []) and (
                process.environ().get("DAGSTER_HOME") == dagster_home["DAGSTER_HOME"]
            ):
                groups.add(os.getpgid(process.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    assert groups
    killed = time.monotonic()
    for group in groups:  # what the kernel's OOM killer does to a cgroup: everything at once
        os.killpg(group, signal.SIGKILL)
    out, err = refresh.communicate(timeout=120)
    assert time.monotonic() - killed < 30  # not max_runtime_seconds (2 h)
    assert refresh.returncode == 1
    assert out.startswith(
        "weekly_aggregations: FAILED (not refreshed: its run worker died with its code server (killed: out of memory, "
        "or kill -9); refresh it again, and check the machine's memory)"
    ), out
    assert "Traceback" not in err


def test_stopping_what_a_launcher_left_tolerates_a_process_that_already_ended(monkeypatch):
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    process = psutil.Process(child.pid)
    child.kill()
    child.wait()  # gone between the listing and the signal, as under load
    monkeypatch.setattr(launcher.psutil, "process_iter", lambda *args, **kwargs: [process])
    monkeypatch.setattr(launcher, "process_group", lambda pid: child.pid)
    launcher.stop_launched([child.pid], grace_s=0.1)  # no psutil.NoSuchProcess


# Twenty calls at once (issue 25): the same views and different ones, forced and not.
SELECTIONS = (
    [["--daily", "--force"]] * 6 + [["--daily"]] * 4 + [["--weekly", "--force"]] * 4
    + [["daily_aggregations", "--force"]] * 3 + [["campaign_aggregations", "weekly_aggregations"]] * 3
)
VIEWS_OF = {"--daily": 3, "--weekly": 1}


def refreshes_at_once(url: str, stop) -> dict[str, int]:
    """The most refreshes of each view seen running at the same moment, until `stop` is set."""
    most: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            for view, running in conn.execute(
                "SELECT substring(query from 'REFRESH MATERIALIZED VIEW (?:CONCURRENTLY )?(?:\"?\\w+\"?\\.)?\"?(\\w+)'), count(*)"
                " FROM pg_stat_activity WHERE state = 'active' AND query ILIKE 'REFRESH MATERIALIZED VIEW%' GROUP BY 1"
            ):
                most[view] = max(most.get(view, 0), running)
            time.sleep(0.05)
    return most


def test_twenty_refreshes_at_once_report_without_traceback_never_overlap_and_leave_nothing_running(seeded_db, dagster_home):
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=lambda: seen.update(refreshes_at_once(seeded_db, stop)))
    watcher.start()
    try:
        calls = [
            subprocess.Popen(
                [COMMAND, "refresh", *selection, "--wait", "900"],
                env={**os.environ, **dagster_home, "DATABASE_URL": seeded_db},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for selection in SELECTIONS
        ]
        outputs = [call.communicate(timeout=1200) for call in calls]
    finally:
        stop.set()
        watcher.join()
    # A server's connections may run out with twenty calls' processes (100 by default; each call has a
    # command, a launcher, a code server and a run worker, each keeping Dagster's storage connections, and up to
    # refresh_connections of its own): a call may then fail, but in one line per view or one error line.
    for selection, call, (out, err) in zip(SELECTIONS, calls, outputs):
        assert call.returncode in (0, 1) and "Traceback" not in err, (selection, out, err)
        views = VIEWS_OF.get(selection[0], len([arg for arg in selection if not arg.startswith("--")]))
        lines = out.splitlines()
        assert len(lines) == views or (not lines and len(err.strip().splitlines()[-1:]) == 1), (selection, out, err)
        if call.returncode == 0:
            assert all(": refreshed (" in line or ": skipped (" in line for line in lines), out
    assert seen and max(seen.values()) == 1, seen  # no view refreshed by two calls at once
    ended = [f"{' '.join(selection)}: exit {call.returncode}, {(err.strip().splitlines() or [''])[-1][:200]}" for selection, call, (out, err) in zip(SELECTIONS, calls, outputs)]
    assert left_behind(dagster_home, grace_s=30) == [], ended
