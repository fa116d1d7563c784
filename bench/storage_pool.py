"""How much of a view's cost in a run is Dagster's storage connections (issue 27, item 4):

    .venv/bin/python -m bench.storage_pool 100

N assets with one check each, materialized in process on PostgreSQL storage (an embedded server it starts and
stops), first as dagster-postgres stores events outside the webserver (NullPool: a new connection for every
query), then on the pool the webserver gives itself (`DagsterInstance.optimize_for_webserver`, which
dagster.yaml cannot ask for: dagster-io/dagster#33935, #20325). The package never calls it: this only measures
what pooling would save.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import psycopg
from analytics_views.postgres.embedded import embedded_server
from analytics_views.postgres.database import with_database, libpq_url
from analytics_views.operations.services import prepare_dagster_home

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100

def assets(n):
    specs = [dg.AssetSpec(f"v{i}") for i in range(n)]
    checks = [dg.AssetCheckSpec("unique_index", asset=f"v{i}") for i in range(n)]
    @dg.multi_asset(specs=specs, check_specs=checks, can_subset=True)
    def views(context):
        for i in range(n):
            yield dg.AssetCheckResult(asset_key=dg.AssetKey(f"v{i}"), check_name="unique_index", passed=True)
            yield dg.MaterializeResult(asset_key=dg.AssetKey(f"v{i}"), metadata={"rows": i})
    return views

with tempfile.TemporaryDirectory() as tmp, embedded_server(Path(tmp) / "pg") as server:
    for label in ("NullPool (dagster-postgres outside the webserver)", "pooled (optimize_for_webserver)"):
        name = "probe_" + str(abs(hash(label)) % 10000)
        with psycopg.connect(server, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        url = libpq_url(with_database(server, name))
        os.environ["DAGSTER_POSTGRES_URL"] = url
        home = prepare_dagster_home(Path(tmp) / name)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            if "pooled" in label:
                instance.optimize_for_webserver(statement_timeout=15000, pool_recycle=3600, max_overflow=20)
            with psycopg.connect(url, autocommit=True) as c:
                before = c.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
            started = time.perf_counter()
            result = dg.materialize([assets(N)], instance=instance)
            took = time.perf_counter() - started
            time.sleep(1.5)
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("SELECT pg_stat_clear_snapshot()")
                after = c.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
                rows = c.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", [result.run_id]).fetchone()[0]
        print(f"{label}: N={N} {took:.2f} s, {took / N * 1000:.0f} ms/asset, {rows} event rows, {after - before - 2} sessions, load {os.getloadavg()[0]:.2f}", flush=True)
