"""`analytics-views dev`: everything a newcomer needs, started and stopped by one command.

With no DATABASE_URL / DAGSTER_POSTGRES_URL, an embedded PostgreSQL keeps both the analytics data and
Dagster's storage in .dev/ (ignored by git), so state persists between starts. The database is migrated,
seeded on first start and refreshed once through Dagster; then the webserver and daemon run until Ctrl-C
or SIGTERM, after which every process this command started is stopped, the database included.
"""

import json
import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from analytics_views.postgres.database import connect, describe_target, parse_url, with_database
from analytics_views.postgres.embedded import embedded_server
from analytics_views.errors import AnalyticsViewsError
from analytics_views.operations.migrate import migrate
from analytics_views.operations.seed import seed
from analytics_views.operations.services import dagster_services, ensure_port_free, prepare_dagster_home


def ensure_database(server_url: str, name: str) -> str:
    """URL of database `name` on the server, created when missing."""
    with connect(server_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


SESSION_FILE = "session.json"
_SESSION_VARIABLES = ("DAGSTER_HOME", "DATABASE_URL", "DAGSTER_POSTGRES_URL")


def write_session(state_dir: Path, env: dict[str, str]) -> Path:
    """Records where this `dev` keeps its instance and databases, for `refresh` and `stats` run beside it in
    another terminal. A URL holding a password is left out: it stays in the environment only."""
    session = {"pid": os.getpid()}
    for variable in _SESSION_VARIABLES:
        if variable == "DAGSTER_HOME" or not parse_url(env[variable], variable).params.get("password"):
            session[variable] = env[variable]
    path = state_dir / SESSION_FILE
    path.write_text(json.dumps(session, indent=2) + "\n")
    return path


def running_session(state_dir: Path) -> dict[str, str]:
    """The variables a running `dev` recorded in `state_dir` ({} when none runs there)."""
    try:
        session = json.loads((state_dir / SESSION_FILE).read_text())
        alive = psutil.pid_exists(int(session.pop("pid")))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in session.items() if k in _SESSION_VARIABLES and isinstance(v, str)} if alive else {}


def _is_empty(url: str) -> bool:
    with connect(url) as conn:
        return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM events)").fetchone()[0]


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    # A second Ctrl-C (or a SIGTERM on top) while everything stops would cut the stopping short and leave the
    # webserver and daemon running: the first signal is the one that counts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def run_dev(*, host: str = "127.0.0.1", port: int = 3000, users: int = 5000, state_dir: Path) -> int:
    ensure_port_free(host, port)  # before anything starts, so a busy port costs nothing
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
    from analytics_views.orchestration.component import load_views
    from analytics_views.sql_files.discovery import managed_views

    loaded = load_views()  # a defs.yaml mistake stops dev before anything starts
    with ExitStack() as stack:
        try:
            database_url = os.environ.get("DATABASE_URL", "").strip()
            dagster_url = os.environ.get("DAGSTER_POSTGRES_URL", "").strip()
            for variable, url in (("DATABASE_URL", database_url), ("DAGSTER_POSTGRES_URL", dagster_url)):
                if url:
                    parse_url(url, variable)  # a URL that does not parse fails before anything starts
            if not (database_url and dagster_url):
                print(f"starting the embedded PostgreSQL in {state_dir / 'postgres'} ...", flush=True)
                server_url = stack.enter_context(embedded_server(state_dir / "postgres"))
                database_url = database_url or ensure_database(server_url, "analytics")
                dagster_url = dagster_url or ensure_database(server_url, "dagster")
            print(f"analytics database: {describe_target(database_url)}", flush=True)

            # A defs.yaml without sql_folder adopts a database's own views: nothing of ours is created there.
            if loaded.config.project_views:
                for name in migrate(database_url):
                    print(f"applied sql/{name}", flush=True)
                if _is_empty(database_url):
                    summary = seed(database_url, users=users)
                    print(f"seeded demo data: {summary.users} users, {summary.events} events", flush=True)

            dagster_home = prepare_dagster_home(state_dir / "dagster_home")
            os.environ.update(
                DATABASE_URL=database_url, DAGSTER_POSTGRES_URL=dagster_url, DAGSTER_HOME=str(dagster_home)
            )
            session = write_session(state_dir, dict(os.environ))
            stack.callback(session.unlink, missing_ok=True)
            from analytics_views.operations.commands import refresh

            for report in refresh(database_url, [view.label for view in managed_views(loaded.config).views], loaded=loaded):
                print(report.line(), flush=True)

            processes = stack.enter_context(dagster_services(env=dict(os.environ), host=host, port=port))
            print(f"\nDagster UI: http://{host}:{port}  (Ctrl-C stops the UI, the daemon and the database)\n", flush=True)
            while all(process.poll() is None for process in processes):
                time.sleep(1)
            raise AnalyticsViewsError("the Dagster webserver or daemon exited: read its output above, then start again")
        except _Stop as stop:
            print(f"\n{stop}: stopping everything analytics-views dev started ...", flush=True)
        except psycopg.Error as error:
            raise AnalyticsViewsError(f"database error: {error.diag.message_primary or error}") from error
    print("stopped.", flush=True)
    return 0
