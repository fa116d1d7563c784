"""Everything Dagster loads, assembled: assets, jobs, schedules and the database resource."""

import dagster as dg

from analytics_views.assets import build_assets
from analytics_views.resources import AnalyticsDatabase
from analytics_views.jobs import refresh_jobs, refresh_schedules

defs = dg.Definitions(
    assets=build_assets(),
    jobs=list(refresh_jobs.values()),
    schedules=refresh_schedules,
    resources={"analytics_db": AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))},
)
