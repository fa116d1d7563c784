"""The Dagster definitions of a managed configuration: assets, checks, jobs, schedules and the database resource.

`MaterializedViewsComponent` (component.py) calls this with the settings of its defs.yaml; nothing here
reads a file of settings or the database.
"""

import dagster as dg

from analytics_views.orchestration.assets import build_assets
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR, build_jobs, build_schedules
from analytics_views.orchestration.notifications import NotificationSettings, notification_sensors
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.orchestration.translator import ViewTranslator
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
    jobs = build_jobs(config)
    return dg.Definitions(
        assets=build_assets(config, translator or ViewTranslator()),
        jobs=list(jobs.values()),
        schedules=build_schedules(jobs),
        sensors=notification_sensors(notifications, config) if notifications else [],
        resources={DATABASE_RESOURCE: database or AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))},
        # Also for views materialized by hand in the UI (Dagster's implicit asset job).
        executor=REFRESH_EXECUTOR,
    )
