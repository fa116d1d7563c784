"""Everything Dagster loads, assembled: assets, jobs, schedules and the database resource.

Which views come from views.toml (or $ANALYTICS_VIEWS_CONFIG); views made elsewhere from the state file
`analytics-views discover` wrote. Loading never connects to the database.
"""

import dagster as dg

from analytics_views.orchestration.assets import build_assets
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR, build_jobs, build_schedules
from analytics_views.orchestration.translator import ViewTranslator
from analytics_views.sql_files.managed import ManagedConfig, load_config
from analytics_views.orchestration.resources import AnalyticsDatabase


def build_definitions(
    config: ManagedConfig | None = None, translator: ViewTranslator = ViewTranslator()
) -> dg.Definitions:
    """The definitions of the managed views; `translator` (a ViewTranslator subclass) decides what each asset
    shows: group, owners, tags, metadata, ... but not its key (translator.py)."""
    config = config or load_config()
    jobs = build_jobs(config)
    return dg.Definitions(
        assets=build_assets(config, translator),
        jobs=list(jobs.values()),
        schedules=build_schedules(jobs),
        resources={"analytics_db": AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))},
        # Also for views materialized by hand in the UI (Dagster's implicit asset job).
        executor=REFRESH_EXECUTOR,
    )


defs = build_definitions()
