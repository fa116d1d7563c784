"""The `analytics-views` command: migrate, seed, refresh and stats, replacing the old refresh script."""

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from analytics_views.postgres.database import database_url_from_env
from analytics_views.errors import AnalyticsViewsError
from analytics_views.paths import PROJECT_ROOT
from analytics_views.operations.launcher import SLOT_WAIT_S

DEV_DIR = PROJECT_ROOT / ".dev"


def _migrate(args: argparse.Namespace) -> int:
    from analytics_views.operations.migrate import migrate

    applied = migrate(database_url_from_env())
    print("\n".join(f"applied sql/{name}" for name in applied) or "database is up to date")
    return 0


def _seed(args: argparse.Namespace) -> int:
    from analytics_views.operations.seed import seed

    summary = seed(database_url_from_env(), users=args.users, days=args.days, seed=args.seed)
    print(
        f"seeded {summary.users} users, {summary.events} events, {summary.payments} payments, "
        f"{summary.campaigns} campaigns over {args.days} days (seed {args.seed})"
    )
    return 0


def _beside_dev() -> None:
    """Beside a running `analytics-views dev`, use its instance and databases for what the environment
    does not set: `refresh` and `stats` then need no variables."""
    from analytics_views.operations.dev import running_session

    if not os.environ.get("DAGSTER_HOME"):
        # ANALYTICS_VIEWS_DEV_DIR: where a `dev --state-dir DIR` keeps its state, when not in .dev/.
        for variable, value in running_session(Path(os.environ.get("ANALYTICS_VIEWS_DEV_DIR") or DEV_DIR)).items():
            os.environ.setdefault(variable, value)


def _refresh(args: argparse.Namespace) -> int:
    from analytics_views.operations.launcher import Launcher

    _beside_dev()
    # Started first: it imports Dagster and loads the definitions while this command works out what to refresh.
    with Launcher(dict(os.environ)) as launcher:
        from analytics_views.operations.commands import refresh, selected_views
        from analytics_views.orchestration.component import load_views

        loaded = load_views()
        views = selected_views(
            all_views=args.all, daily=args.daily, weekly=args.weekly, cadence=args.cadence, names=args.views, loaded=loaded
        )
        url = database_url_from_env(loaded.component.database.url_env)
        outcomes = refresh(url, views, force=args.force, wait_s=args.wait, loaded=loaded, launcher=launcher)
    for outcome in outcomes:
        print(outcome.line())
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _stats(args: argparse.Namespace) -> int:
    from analytics_views.operations.commands import discovery_warning, view_stats
    from analytics_views.orchestration.component import load_views

    _beside_dev()
    loaded = load_views()
    url = database_url_from_env(loaded.component.database.url_env)
    if warning := discovery_warning(url, loaded):
        print(f"analytics-views stats: warning: {warning}", file=sys.stderr)
    stats = view_stats(url, loaded)
    if args.json:
        print(json.dumps([row.as_json() for row in stats], indent=2))
        return 0
    header = ("view", "rows", "size", "populated", "unique index", "last refreshed", "failing checks", "how", "why")
    rows = [header] + [row.as_row() for row in stats]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _discover(args: argparse.Namespace) -> int:
    from analytics_views.orchestration.component import discover_views
    from analytics_views.postgres.database import connect
    from analytics_views.sql_files.discovery import not_taken

    state_file, state, config, url_env = discover_views()
    for view in state["views"]:
        reads = ", ".join(f"{r['schema']}.{r['name']}" for r in view["reads"]) or "nothing"
        cadence = config.cadence_of(view["schema"], view["name"])
        print(f"{view['schema']}.{view['name']} ({cadence}): reads {reads}")
    with connect(database_url_from_env(url_env)) as conn:
        print("\n".join(not_taken(conn, config)) or "every selected view was taken")
    print(f"wrote {len(state['views'])} views and {len(state['relations'])} relations they read to {state_file}")
    if not state["views"]:
        raise AnalyticsViewsError(f"no view taken: fix attributes.schemas or attributes.names in {config.where} (reasons above)")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from analytics_views.operations.dev import run_dev

    return run_dev(host=args.host, port=args.port, users=args.users, state_dir=args.state_dir)


def bounded(kind: type, low: float, high: float):
    """An argparse type accepting a finite number of `kind` from `low` to `high`; argparse names the option
    and exits 2 with one line (its usage) otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not low <= value <= high:  # NaN compares false both ways
            raise argparse.ArgumentTypeError(f"{text} is not between {low} and {high}")
        return value

    return parse


MAX_USERS = 100_000_000  # what the seed can generate in reasonable time and memory
MAX_DAYS = 36_500


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analytics-views",
        description="Keep the analytics materialized views fresh. The database comes from DATABASE_URL.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or update the source tables and views (idempotent)")
    migrate.set_defaults(run=_migrate)

    seed = commands.add_parser("seed", help="replace the source tables' rows with deterministic demo data")
    seed.add_argument("--users", type=bounded(int, 1, MAX_USERS), default=5000, help="number of users (default: 5000)")
    seed.add_argument("--days", type=bounded(int, 1, MAX_DAYS), default=730, help="days of history up to now (default: 730)")
    seed.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives the same data")
    seed.set_defaults(run=_seed)

    refresh = commands.add_parser(
        "refresh",
        help="refresh views through Dagster (runs recorded in the instance)",
        description="Refresh views through Dagster, so each run is recorded in the Dagster instance "
        "($DAGSTER_HOME when set) and visible in the UI.",
    )
    which = refresh.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every view")
    which.add_argument("--daily", action="store_true", help="the views of daily_refresh_job")
    which.add_argument("--weekly", action="store_true", help="the views of weekly_refresh_job")
    which.add_argument(
        "--cadence", metavar="NAME", help="the views of NAME_refresh_job (a cadence of the component's defs.yaml)"
    )
    which.add_argument("views", nargs="*", default=[], metavar="VIEW", help="views by name")
    refresh.add_argument(
        "--force", action="store_true", help="refresh even views whose sources did not change since their last refresh"
    )
    refresh.add_argument(
        "--wait",
        type=bounded(float, 0, 7 * 24 * 3600),
        default=SLOT_WAIT_S,
        metavar="SECONDS",
        help=f"longest wait for a view that another run is refreshing (its pool slot); then the view is reported "
        f"FAILED (default: {SLOT_WAIT_S:g})",
    )
    refresh.set_defaults(run=_refresh)

    discover = commands.add_parser(
        "discover",
        help="record the materialized views the defs.yaml selects, as the catalog describes them, in its state",
        description="Read the materialized views that the component's defs.yaml (or $ANALYTICS_VIEWS_DEFS) "
        "selects from the catalog of DATABASE_URL (columns, comments, the relations they read, indexes) and write "
        "the component's state, which the Dagster definitions load (what `dg utils refresh-defs-state` does, "
        "saying what it took and why not). Run it again when those views are added, dropped or redefined.",
    )
    discover.set_defaults(run=_discover)

    stats = commands.add_parser("stats", help="rows, size, state and last refresh of each view")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=_stats)

    dev = commands.add_parser(
        "dev",
        help="run the Dagster UI and daemon with demo data (embedded PostgreSQL unless URLs are set)",
        description="Start everything a newcomer needs: with no DATABASE_URL/DAGSTER_POSTGRES_URL, an "
        "embedded PostgreSQL in .dev/ with demo data; then the Dagster webserver and daemon. Ctrl-C stops all.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="address the UI binds to (default: 127.0.0.1)")
    dev.add_argument("--port", type=bounded(int, 1, 65535), default=3000, help="UI port (default: 3000)")
    dev.add_argument(
        "--users", type=bounded(int, 1, MAX_USERS), default=5000, help="demo users seeded on first start (default: 5000)"
    )
    dev.add_argument(
        "--state-dir", type=Path, default=DEV_DIR, help="where the embedded database and DAGSTER_HOME live (default: .dev)"
    )
    dev.set_defaults(run=_dev)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt (code that catches Exception lets
    it through)."""

    signal = signal.SIGTERM


def _raise_stopped(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
        # Started as a shell's background job (`nohup ... &`), we inherit SIGINT ignored, and so would the runs we
        # launch, where Dagster points SIGTERM at SIGINT's handler too: they could not be terminated.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.run(args)
    except AnalyticsViewsError as error:
        print(f"analytics-views {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        received = getattr(stop, "signal", signal.SIGINT)
        cancelled = "; its runs were terminated: a refresh in progress was cancelled, and its view keeps its previous contents"
        print(
            f"analytics-views {args.command}: stopped by {received.name}{cancelled if args.command == 'refresh' else ''}",
            file=sys.stderr,
        )
        return 128 + received


def run() -> None:
    """The console script. `refresh` ends without the interpreter's teardown (0.6 s here, after its 500-view runs,
    docs/benchmarks.md): it has closed what it opened by then, its output is flushed, and its launchers stopped."""
    code = main()
    if sys.argv[1:2] == ["refresh"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
