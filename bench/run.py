"""The refresh benchmark: how close each view's refresh is to what PostgreSQL cannot do faster.

    .venv/bin/python -m bench.run --size small        # a quick look (under a minute or two)
    .venv/bin/python -m bench.run --size reference    # 200k users, ~10M events, 730 days (15 to 40 min)
    .venv/bin/python -m bench.run --size small --jobs-only   # the job table alone (seeds the data, then jobs)
    .venv/bin/python -m bench.run --views 10 100 500        # scale mode: N synthetic views against the floor (scale.py)

It creates its own databases (on an embedded PostgreSQL 18 it starts, or on --server), generates the
demo data with the project's generator plus one large users x days view of its own
(bench/user_day_activity.sql), and measures, for every view:
- the floor: the view's query alone (EXPLAIN ANALYZE, rows discarded in the server) and a plain read of
  the source rows inside the view's window (the cheapest possible pass over what the view must read);
- a plain REFRESH, REFRESH ... CONCURRENTLY, build-and-swap (analytics_views/swap.py), and the asset's
  materialization in process (strategy `auto`, as the jobs run it);
- readers' latency (median, p99, max) of a query on the view while each kind of refresh runs;
- plain refreshes on two fresh copies of the database, one with twice the history before every window, by turns;
and for each job, the wall time of a run submitted through the webserver and launched by the daemon, under
Dagster's default settings and the project's dagster.yaml, for each way of running its steps (the variants:
code locations from bench/variants.py, and the project's own definitions), against the old service's way (one
connection, views refreshed one after another), and the peak memory of the Dagster processes.

It prints a table, writes bench/results/<size>.json (.txt, .md) and docs/benchmark-<size>.png (with --jobs-only,
bench/results/<size>.jobs.json, .txt, .md and .png instead), drops its databases and stops every server and
process it started.

Layout, by layer (each imports only the ones above it):
- timing.py: log lines, timed actions, robust medians;
- postgres_measures.py: the databases, floors, refreshes, readers and doubling (PostgreSQL only, no Dagster);
- dagster_assets.py: each view's asset materialized in process (overhead, skips);
- dagster_jobs.py: job runs through the webserver and daemon, their variants, the memory sampler;
- variants.py: the variants' definitions, each loaded as a code location by the services dagster_jobs starts;
- report.py: the printed table, the Markdown tables and the chart;
- run.py (this file): the command line and the order of the run.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from analytics_views.operations.migrate import migrate
from analytics_views.operations.seed import seed
from analytics_views.postgres.refresh import RefreshSettings
from analytics_views.sql_files.views import load_views
from bench.dagster_assets import measure_assets, measure_skips
from bench.dagster_jobs import measure_jobs
from bench.postgres_measures import (
    BENCH_VIEW,
    bench_database,
    bench_server,
    create_bench_view,
    ident,
    measure_doubling,
    measure_refreshes,
    refresh_sql,
    server_facts,
    table_counts,
)
from bench.report import chart, markdown, report
from bench.timing import log, timed

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = PROJECT_ROOT / "docs"

SIZES = {
    "small": {"users": 5_000, "days": 730, "repeats": 5, "job_repeats": 2},
    "reference": {"users": 200_000, "days": 730, "repeats": 5, "job_repeats": 6},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--views", type=int, nargs="+", help="scale mode: N synthetic views for each N given (scale.py)")
    parser.add_argument("--repeats", type=int, default=3, help="scale mode: floor and tool runs per N, alternated")
    parser.add_argument("--project", type=Path, help="scale mode: run the tool from this checkout (before/after)")
    parser.add_argument("--server", help="a PostgreSQL URL whose role may CREATE DATABASE (default: embedded 18)")
    parser.add_argument("--skip-jobs", action="store_true", help="do not start Dagster's services")
    parser.add_argument("--skip-doubling", action="store_true", help="do not measure twice the history")
    parser.add_argument("--job-repeats", type=int, help="runs per job and variant (default: by size)")
    parser.add_argument(
        "--jobs-only",
        action="store_true",
        help="seed the data, then only the job runs (no per-view refreshes, skips or doubling); "
        "results in bench/results/<size>.jobs.*",
    )
    args = parser.parse_args(argv)
    if args.views:
        return scale_mode(args)
    if args.jobs_only and args.skip_jobs:
        parser.error("--jobs-only and --skip-jobs leave nothing to measure")
    name = f"{args.size}.jobs" if args.jobs_only else args.size
    size = SIZES[args.size]
    results: dict = {
        "size": args.size,
        **({"jobs_only": True} if args.jobs_only else {}),
        "parameters": size,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": round(os.getloadavg()[0], 2),  # other work on the machine when the run began
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    views = [*load_views(), BENCH_VIEW]
    with tempfile.TemporaryDirectory(prefix="av-bench-") as tmp, bench_server(args.server, Path(tmp)) as server_url:
        work_dir = Path(tmp)
        with bench_database(server_url, args.size) as url:
            with psycopg.connect(url, autocommit=True) as conn:
                # Plain and concurrent refreshes get the memory our refreshes get, so that they compare alike.
                if RefreshSettings().work_mem_mb:
                    conn.execute("SELECT set_config('work_mem', %s, false)", [f"{RefreshSettings().work_mem_mb}MB"])
                results["server"] = server_facts(conn)
                log(f"generating {size['users']} users over {size['days']} days")
                results["seed_s"] = round(
                    timed(lambda: (migrate(url), seed(url, users=size["users"], days=size["days"]))), 1
                )
                create_bench_view(conn)
                results["counts"] = table_counts(conn)
                log(f"data: {results['counts']} in {results['seed_s']} s; populating the views")
                for view in views:
                    conn.execute(refresh_sql(view.name))
                conn.execute("VACUUM ANALYZE")
                if not args.jobs_only:
                    results["views"] = {}
                    for view in views:
                        log(f"measuring {view.name}")
                        results["views"][view.name] = measure_refreshes(url, conn, view, size["repeats"])
                        results["views"][view.name]["rows"] = conn.execute(
                            sql.SQL("SELECT count(*) FROM {}").format(ident(view.name))
                        ).fetchone()[0]
                    log("materializing each view's asset in process")
                    results["assets"] = measure_assets(url, views, size["repeats"])
                    log("materializing each view's asset with its sources unchanged, then after a source write")
                    results["skips"] = measure_skips(url, views)
                if not args.skip_jobs:
                    results["jobs"] = measure_jobs(url, server_url, work_dir, args.job_repeats or size["job_repeats"])
            if not args.skip_doubling and not args.jobs_only:  # the database is idle now, as copying it requires
                log("copying the database, doubling the history before every window in the copy")
                results["counts_doubled"], results["doubled_history"] = measure_doubling(
                    server_url, url, views, size["days"]
                )
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = report(results)
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS_DIR / f"{name}.txt").write_text(text + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown(results) + "\n")
    # Beside a jobs-only run's figures; docs/ holds the full runs' charts.
    chart_path = RESULTS_DIR / f"{name}.png" if args.jobs_only else DOCS_DIR / f"benchmark-{name}.png"
    try:
        import matplotlib  # noqa: F401 - the bench extra
    except ImportError:
        log(f"wrote bench/results/{name}.{{json,txt,md}}; no chart: matplotlib is missing (pip install -e '.[bench]')")
        return 0
    chart_path.parent.mkdir(exist_ok=True)
    chart(results, chart_path)
    log(f"wrote bench/results/{name}.{{json,txt,md}} and {chart_path.relative_to(PROJECT_ROOT)}")
    return 0


def scale_mode(args) -> int:
    from bench import scale

    label = "scale" if args.project is None else f"scale.{args.project.name}"
    # Each N's figures replace that N's in the file (one N a call, as the time allows, builds up the table).
    path = RESULTS_DIR / f"{label}.json"
    previous = json.loads(path.read_text())["sizes"] if path.exists() else []
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": round(os.getloadavg()[0], 2)},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "project": str(args.project or PROJECT_ROOT),
        "sizes": [size for size in previous if size["views"] not in args.views],
    }
    with tempfile.TemporaryDirectory(prefix="av-bench-") as tmp, bench_server(args.server, Path(tmp)) as server_url:
        for views in args.views:
            results["sizes"].append(scale.measure(server_url, views, args.repeats, args.project))
            results["sizes"].sort(key=lambda size: size["views"])
            RESULTS_DIR.mkdir(exist_ok=True)
            (RESULTS_DIR / f"{label}.json").write_text(json.dumps(results, indent=2) + "\n")
            print(scale.report(results["sizes"]), flush=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (RESULTS_DIR / f"{label}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS_DIR / f"{label}.md").write_text(scale.report(results["sizes"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
