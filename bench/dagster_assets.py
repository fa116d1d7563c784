"""Each view's asset materialized in process (dg.materialize): its overhead over a raw refresh, and its skips."""

import statistics
import time
from contextlib import ExitStack

import psycopg

from analytics_views.orchestration import metadata_keys as keys
from analytics_views.sql_files.views import ViewDefinition
from bench.postgres_measures import refresh_sql
from bench.timing import enough, timed


def materialize_asset(url: str, view: ViewDefinition, instance=None) -> tuple[float, dict]:
    """One in-process materialization; a fresh instance (no last fingerprint, so never a skip) unless given."""
    import dagster as dg

    from analytics_views.orchestration.assets import view_asset
    from analytics_views.orchestration.resources import AnalyticsDatabase

    with ExitStack() as stack:
        instance = instance or stack.enter_context(dg.DagsterInstance.ephemeral())
        started = time.perf_counter()
        result = dg.materialize(
            [view_asset(view)], resources={"analytics_db": AnalyticsDatabase(url=url)}, instance=instance
        )
        wall = time.perf_counter() - started
    [event] = result.asset_materializations_for_node(view.name)
    metadata = {key: value.value for key, value in event.metadata.items()}
    return wall, {"mode": metadata[keys.REFRESH_MODE], "refresh_s": metadata[keys.REFRESH_DURATION_S]}


def measure_assets(url: str, views: list[ViewDefinition], repeats: int) -> dict:
    """Each view's asset against its raw REFRESH ... CONCURRENTLY, alternated so that both meet the same load."""
    materialize_asset(url, views[0])  # warm up: imports and Dagster's first-run costs
    results = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for view in views:
            concurrent = refresh_sql(view.name, concurrently=True)
            raw, runs = [], []
            while not enough(raw, repeats):
                raw.append(timed(lambda: conn.execute(concurrent)))
                runs.append(materialize_asset(url, view))
            wall, raw_median = statistics.median(wall for wall, _ in runs), statistics.median(raw)
            results[view.name] = {
                "wall_s": round(wall, 4),
                "refresh_s": round(statistics.median(meta["refresh_s"] for _, meta in runs), 4),
                "mode": runs[-1][1]["mode"],
                "concurrent_alongside_s": round(raw_median, 4),  # the raw refresh, alternated with the asset
                "overhead_s": round(wall - raw_median, 4),
                "allowed_overhead_s": round(0.05 * raw_median + 0.3, 4),  # the target: at most 5% + 0.3 s
            }
    return results


def measure_skips(url: str, views: list[ViewDefinition]) -> dict:
    """Each view's asset when no source changed since its last refresh (a skip), then after a write to its
    sources outside every window (the rows stay the same, but a change is a change: it refreshes)."""
    import dagster as dg

    results = {}
    with dg.DagsterInstance.ephemeral() as instance:
        for view in views:
            materialize_asset(url, view, instance)  # the last refresh, which records the fingerprint
        unchanged = {view.name: materialize_asset(url, view, instance) for view in views}
        written = ("events", "payments")  # between them, a source of every view
        counts = "SELECT sum(n_tup_ins) FROM pg_stat_all_tables WHERE relname = ANY(%s)"
        with psycopg.connect(url, autocommit=True) as conn:
            before = conn.execute(counts, [list(written)]).fetchone()[0]
            conn.execute(
                "INSERT INTO events (user_id, event_type, occurred_at)"
                " SELECT user_id, 'bench_write', now() - interval '800 days' FROM users LIMIT 1"
            )
            conn.execute(
                "INSERT INTO payments (user_id, amount, paid_at)"
                " SELECT user_id, 1, now() - interval '800 days' FROM users LIMIT 1"
            )
        with psycopg.connect(url, autocommit=True) as conn:  # the writer's counts are reported when it ends
            while conn.execute(counts, [list(written)]).fetchone()[0] < before + len(written):
                time.sleep(0.05)
        changed = {view.name: materialize_asset(url, view, instance) for view in views}
    for view in views:
        (skip_wall, skip), (change_wall, change) = unchanged[view.name], changed[view.name]
        results[view.name] = {
            "unchanged": {"wall_s": round(skip_wall, 4), "mode": skip["mode"]},
            "after_a_source_write": {"wall_s": round(change_wall, 4), "mode": change["mode"]},
        }
    return results
