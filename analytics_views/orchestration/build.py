"""The Dagster definitions of a managed configuration: assets, checks, jobs, schedules and the database resource.

`MaterializedViewsComponent` (component.py) calls this with the settings of its defs.yaml; nothing here
reads a file of settings or the database.
"""

import dagster as dg

from analytics_views.orchestration import definition_checks
from analytics_views.orchestration.assets import build_assets, build_sources
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR, automation_sensor, build_jobs, build_schedules
from analytics_views.orchestration.notifications import NotificationSettings, notification_sensors
from analytics_views.orchestration.observed_sources import observed_sources
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.orchestration.translator import ViewTranslator
from analytics_views.sql_files.discovery import managed_views
from analytics_views.sql_files.managed import ManagedConfig

DATABASE_RESOURCE = "analytics_db"


def build_definitions(
    config: ManagedConfig | None = None,
    *,
    translator: ViewTranslator | None = None,
    database: AnalyticsDatabase | None = None,
    notifications: NotificationSettings | None = None,
) -> dg.Definitions:
    """Everything Dagster needs for `config` (default: this project's views, today's cadences): each view's
    asset as `translator` makes it (a ViewTranslator subclass, or one whose settings carry a defs.yaml's
    per-view `translation:`; translator.py) and `database` as the `analytics_db` resource (default:
    DATABASE_URL, default refresh settings); with `notifications`, a sensor per destination (notifications.py)."""
    config = config or ManagedConfig()
    translator = translator or ViewTranslator()
    jobs = build_jobs(config)
    views = list(managed_views(config).views)
    sources = observed_sources(build_sources(config, translator))
    return dg.Definitions(
        assets=[*([sources.asset] if sources else []), *build_assets(config, translator)],
        asset_checks=[definition_checks.definition_checks(views)] if views else [],
        jobs=[
            *jobs.values(),
            *([definition_checks.definition_checks_job(views)] if views else []),
            *([sources.job] if sources else []),
        ],
        schedules=build_schedules(jobs),
        sensors=[
            *([sources.sensor] if sources else []),
            *automation_sensor(config),
            *([definition_checks.definition_checks_sensor(views)] if views else []),
            *(notification_sensors(notifications, config) if notifications else []),
        ],
        resources={DATABASE_RESOURCE: database or AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))},
        # Also for views materialized by hand in the UI (Dagster's implicit asset job).
        executor=REFRESH_EXECUTOR,
    )
