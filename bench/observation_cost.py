"""What observing sources and evaluating the target-lag automation cost (issue 23, item 6).

    python -m bench.observation_cost [--sources 100 1000] [--views 100 1000] [--ticks 20] [--server URL]

- observation: N source relations (a tenth partitioned into 4, a tenth plain views over a table, the rest
  tables) in a fresh database; one look of observed_sources.observe over all of them (the sensor's work: the
  catalog and statistics queries of source_versions.py, the cursor's comparison), timed over --ticks looks on a
  quiet database;
- automation: N views on a target-lag cadence (each reading one of N/10 observed sources, every tenth view
  reading a view), evaluated by Dagster's `evaluate_automation_conditions` on an in-memory instance, as the
  automation sensor's tick evaluates them: ticks where nothing changed, and a tick after a tenth of the sources
  got a new version.
"""

import argparse
import datetime
import statistics
import time
import warnings
from datetime import timedelta

import dagster as dg
import psycopg

from analytics_views.orchestration.cadences import lag_condition
from analytics_views.orchestration.observed_sources import observe
from analytics_views.sql_files.managed import Cadence
from bench.skip_decision import bench_database
from bench.timing import log


def build_sources(conn: psycopg.Connection, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"s{i}"
        if i % 10 == 1:
            conn.execute(f"CREATE TABLE {name} (id bigint, d date NOT NULL) PARTITION BY RANGE (d)")
            for p in range(4):
                conn.execute(
                    f"CREATE TABLE {name}_p{p} PARTITION OF {name} FOR VALUES FROM ('2026-0{p + 1}-01') TO ('2026-0{p + 2}-01')"
                )
        elif i % 10 == 2:
            conn.execute(f"CREATE TABLE {name}_t (id bigint PRIMARY KEY, v int)")
            conn.execute(f"CREATE VIEW {name} AS SELECT id, v FROM {name}_t")
        else:
            conn.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, v int)")
        names.append(name)
    return names


def observation_cost(url: str, count: int, ticks: int) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        relations = {dg.AssetKey(name): f'"{name}"' for name in build_sources(conn, count)}
        last: dict = {}
        first = observe(conn, relations, last)
        time.sleep(13)  # quiet: every other session idle for over 12 s (write_quiescence.py)
        times, recorded = [], 0
        for _ in range(ticks):
            started = time.perf_counter()
            recorded += len(observe(conn, relations, last))
            times.append(time.perf_counter() - started)
    return {
        "sources": count,
        "first_look_observations": len(first),
        "quiet_observations_per_look": recorded / ticks,
        "median_ms": round(statistics.median(times) * 1000, 1),
        "p90_ms": round(sorted(times)[int(len(times) * 0.9) - 1] * 1000, 1),
        "ms_per_100_sources": round(statistics.median(times) * 1000 * 100 / count, 1),
    }


def automation_defs(views: int, baseline: bool = False) -> tuple[dg.Definitions, list[dg.AssetKey]]:
    cadence = Cadence("fresh", None, target_lag=timedelta(minutes=15))
    # The baseline: Dagster's own eager() on the same graph, what any declarative automation costs.
    condition = dg.AutomationCondition.eager() if baseline else lag_condition(cadence)
    source_keys = [dg.AssetKey(f"src{i}") for i in range(max(1, views // 10))]

    @dg.multi_observable_source_asset(specs=[dg.AssetSpec(key) for key in source_keys], can_subset=True)
    def sources():
        yield from ()

    specs = []
    for i in range(views):
        deps = [source_keys[i % len(source_keys)]] + ([dg.AssetKey(f"v{i - 1}")] if i % 10 == 9 else [])
        specs.append(dg.AssetSpec(f"v{i}", deps=deps, automation_condition=condition))

    @dg.multi_asset(specs=specs, can_subset=True)
    def views_asset():
        yield from ()

    return dg.Definitions(assets=[sources, views_asset]), source_keys


def automation_cost(views: int, ticks: int, baseline: bool = False) -> dict:
    defs, source_keys = automation_defs(views, baseline)
    instance = dg.DagsterInstance.ephemeral()
    for key in source_keys:
        instance.report_runless_asset_event(dg.AssetObservation(asset_key=key, tags={"dagster/data_version": "1"}))
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=now)
    quiet = []
    for tick in range(1, ticks + 1):
        started = time.perf_counter()
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=result.cursor, evaluation_time=now + timedelta(seconds=30 * tick)
        )
        quiet.append(time.perf_counter() - started)
        assert baseline or result.total_requested == 0, result.total_requested
    for key in source_keys[::10]:
        instance.report_runless_asset_event(dg.AssetObservation(asset_key=key, tags={"dagster/data_version": "2"}))
    started = time.perf_counter()
    changed = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=result.cursor, evaluation_time=now + timedelta(minutes=30)
    )
    return {
        "condition": "eager() (baseline)" if baseline else "target lag",
        "views": views,
        "quiet_tick_median_ms": round(statistics.median(quiet) * 1000, 1),
        "changed_tick_ms": round((time.perf_counter() - started) * 1000, 1),
        "requested_after_change": changed.total_requested,
    }


def main() -> None:
    warnings.simplefilter("ignore", dg.BetaWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--views", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--server", default=None)
    args = parser.parse_args()
    for count in args.sources:
        with bench_database(args.server) as url:
            log(f"observation: {observation_cost(url, count, args.ticks)}")
    for views in args.views:
        for baseline in (False, True):
            log(f"automation: {automation_cost(views, max(3, args.ticks // 4), baseline)}")


if __name__ == "__main__":
    main()
