"""`analytics-views dev` as a newcomer runs it: embedded database, UI up, and nothing left after a signal."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from analytics_views_tests.conftest import free_port, server_directory


COMMAND = str(Path(sys.executable).parent / "analytics-views")


def processes_of(dev: subprocess.Popen, state_dir: Path) -> list[psutil.Process]:
    """Everything dev started: its descendants and the embedded server (which pg_ctl detaches)."""
    tree = psutil.Process(dev.pid).children(recursive=True)
    for process in psutil.process_iter(["cmdline"]):
        if any(str(state_dir) in part for part in process.info["cmdline"] or []):
            tree.append(process)
    return tree


def start_dev(state_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME")}
    return subprocess.Popen(
        [COMMAND, "dev", "--port", str(port), "--state-dir", str(state_dir), "--users", "300"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # like a terminal: our signal goes to dev alone
    )


def wait_for_ui(port: int, dev: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert dev.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no UI after {timeout_s} s:\n{log.read_text()}")


def check_the_command_works_beside_dev(state_dir: Path) -> None:
    """`refresh` and `stats` in another terminal, with none of the variables set, use dev's instance and
    databases; the run they launch is dev's to show."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME")}
    env["ANALYTICS_VIEWS_DEV_DIR"] = str(state_dir)  # dev ran with --state-dir; .dev/ needs nothing
    refresh = subprocess.run([COMMAND, "refresh", "weekly_aggregations", "--force"], env=env, capture_output=True, text=True, timeout=300)
    assert refresh.returncode == 0, refresh.stderr
    assert refresh.stdout.startswith("weekly_aggregations: refreshed (")
    stats = subprocess.run([COMMAND, "stats", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert stats.returncode == 0, stats.stderr
    rows = {row["view"]: row for row in json.loads(stats.stdout)}
    assert rows["weekly_aggregations"]["populated"] and rows["weekly_aggregations"]["last_refreshed"] is not None
    session = json.loads((state_dir / "session.json").read_text())
    assert set(session) == {"pid", "DAGSTER_HOME", "DATABASE_URL", "DAGSTER_POSTGRES_URL"}  # no password to keep out


def test_dev_serves_the_ui_stops_everything_on_ctrl_c_or_sigterm_and_keeps_state(tmp_path):
    with server_directory() as state_dir:
        check_dev_starts_and_stops(state_dir, free_port(), tmp_path)


def check_dev_starts_and_stops(state_dir: Path, port: int, tmp_path: Path) -> None:
    for start, stop in enumerate([signal.SIGINT, signal.SIGTERM]):
        log = tmp_path / f"dev-{start}.log"
        dev = start_dev(state_dir, port, log)
        try:
            wait_for_ui(port, dev, log)
            started = processes_of(dev, state_dir)
            assert len(started) >= 3  # webserver, daemon and the database at least
            if start == 0:
                check_the_command_works_beside_dev(state_dir)
            dev.send_signal(stop)
            time.sleep(0.5)
            dev.send_signal(stop)  # pressed twice, or a supervisor's SIGTERM on top: the stop still completes
            assert dev.wait(timeout=60) == 0
            _, alive = psutil.wait_procs(started, timeout=15)
            assert alive == [], f"left behind: {[p.pid for p in alive]}"
        finally:
            if dev.poll() is None:
                dev.kill()
        output = log.read_text()
        assert "analytics database: analytics on the socket in" in output
        # Refreshed on both starts: the second restarted the server, whose restart may have reset the change
        # counters the skip relies on (a crash does), so no skip is trusted across it.
        assert "daily_aggregations: refreshed (" in output
        # Demo data is seeded on the first start only: the second start finds it in the kept database.
        assert ("seeded demo data: 300 users" in output) == (start == 0)
        assert "Traceback" not in output
        assert not (state_dir / "session.json").exists()  # dev removes it when it stops


def test_dev_over_an_adopted_database_creates_nothing_of_ours_and_refreshes_its_views(product_db, empty_db, tmp_path):
    import psycopg

    defs = tmp_path / "defs.yaml"
    defs.write_text("type: analytics_views.MaterializedViewsComponent\nattributes:\n  schemas: [product]\n")
    env = {**os.environ, "ANALYTICS_VIEWS_DEFS": str(defs), "DATABASE_URL": product_db, "DAGSTER_POSTGRES_URL": empty_db}
    env.pop("DAGSTER_HOME", None)
    discover = subprocess.run([COMMAND, "discover"], env=env, capture_output=True, text=True, timeout=300)
    assert discover.returncode == 0, discover.stderr
    port, log = free_port(), tmp_path / "dev.log"
    with server_directory() as state_dir:
        dev = subprocess.Popen(
            [COMMAND, "dev", "--port", str(port), "--state-dir", str(state_dir)],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_for_ui(port, dev, log)
            started = processes_of(dev, state_dir)
            dev.send_signal(signal.SIGINT)
            assert dev.wait(timeout=60) == 0
            psutil.wait_procs(started, timeout=15)
        finally:
            if dev.poll() is None:
                dev.kill()
    output = log.read_text()
    assert "product.campaign_stats: refreshed (" in output and "Traceback" not in output
    assert "applied sql/" not in output and "seeded demo data" not in output
    with psycopg.connect(product_db) as conn:
        assert conn.execute("SELECT to_regclass('public.analytics_views_migrations')").fetchone()[0] is None
