"""The Dagster definitions of a managed configuration: assets, checks, jobs, schedules and the database resource.

`MaterializedViewsComponent` (component.py) calls this with the settings of its defs.yaml; nothing here
reads a file of settings or the database.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

from analytics_views.orchestration.assets import build_assets
from analytics_views.orchestration.jobs import REFRESH_EXECUTOR, build_jobs, build_schedules
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.discovery import managed_views
from analytics_views.sql_files.managed import ManagedConfig, matches
from analytics_views.sql_files.views import ViewDefinition

DATABASE_RESOURCE = "analytics_db"


@dataclass(frozen=True)
class ViewOverride:
    """Attributes set on the assets of the views `pattern` matches (by name, or `schema.name` for views made
    elsewhere, as `cadence` patterns match). None leaves the attribute as built; tags are added."""

    pattern: str
    group_name: str | None = None
    owners: tuple[str, ...] | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None

    def apply(self, spec: dg.AssetSpec) -> dg.AssetSpec:
        replaced = {
            name: value
            for name, value in (("group_name", self.group_name), ("owners", self.owners), ("description", self.description))
            if value is not None
        }
        return spec.replace_attributes(**replaced).merge_attributes(tags=dict(self.tags))


def apply_overrides(
    assets: Sequence[dg.AssetSpec | dg.AssetsDefinition],
    views: Sequence[ViewDefinition],
    overrides: Sequence[ViewOverride],
) -> Sequence[dg.AssetSpec | dg.AssetsDefinition]:
    """The assets with every matching override applied to each view's spec, in order (a later one's attributes
    win). Source assets are left as built."""
    if not overrides:
        return assets
    by_key = {dg.AssetKey(list(view.asset_key_path)): view for view in views}

    def override(spec: dg.AssetSpec) -> dg.AssetSpec:
        view = by_key.get(spec.key)
        for rule in overrides if view else ():
            if matches(rule.pattern, view.schema, view.name):
                spec = rule.apply(spec)
        return spec

    return dg.map_asset_specs(override, assets)


def build_definitions(
    config: ManagedConfig | None = None,
    *,
    overrides: Sequence[ViewOverride] = (),
    database: AnalyticsDatabase | None = None,
) -> dg.Definitions:
    """Everything Dagster needs for `config` (default: this project's views, today's cadences), with the
    defs.yaml's per-view `overrides` applied to the views' specs and `database` as the `analytics_db` resource
    (default: DATABASE_URL, default refresh settings)."""
    config = config or ManagedConfig()
    jobs = build_jobs(config)
    # The seam for the per-view translation: when the translator lands, the overrides become its settings and
    # build_assets(config, translator=...) applies them where the specs are made.
    assets = apply_overrides(build_assets(config), managed_views(config).views, overrides)
    return dg.Definitions(
        assets=assets,
        jobs=list(jobs.values()),
        schedules=build_schedules(jobs),
        resources={DATABASE_RESOURCE: database or AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))},
        # Also for views materialized by hand in the UI (Dagster's implicit asset job).
        executor=REFRESH_EXECUTOR,
    )
