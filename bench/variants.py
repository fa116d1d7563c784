"""The ways of running the refresh jobs that the benchmark compares, each a Definitions object that
dagster_jobs.py loads as a code location of its own (it writes the workspace.yaml): the executor is fixed by
the definitions, as the project's own jobs fix theirs, not chosen in run config.

- `in_process_defs`: the project's assets and jobs, steps one after another in the run's process
  (`dg.in_process_executor`);
- `multiprocess_spawn_defs`: Dagster's default executor: a spawned Python process per step, at most one per
  core (`dg.multiprocess_executor` unconfigured);
- `multiprocess_forkserver_defs`: a process per step forked from a server that imported this module once
  (`start_method: forkserver`, `preload_modules`), at most 8 at once;
- `multi_asset_defs`: one subsettable `multi_asset` per cadence whose single step refreshes the selected
  views over a small pool of connections, each view once the views it reads in the selection are done, as
  dagster-dbt runs dbt's threads inside one step: the project's own assets (`build_assets`) since issue 27,
  with `in_process`.
The project's own `analytics_views.definitions:defs`, with whatever executor it fixes, is loaded beside them.

The first three give each view a step of its own (`assets.view_asset`, as the project did before issue 27);
their jobs have the project's job names, selections and tags (`analytics_views.orchestration.jobs`), without the
executor those fix.
"""

import dagster as dg

from analytics_views.orchestration.assets import build_assets, build_sources, managed_view_assets, view_asset
from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.sql_files.discovery import managed_views
from analytics_views.sql_files.managed import Cadence, ManagedConfig
from analytics_views.sql_files.views import ViewDefinition

FORKSERVER_MAX_CONCURRENT = 8  # the steps wait on PostgreSQL, not on the local cores


def view_key(view: ViewDefinition) -> dg.AssetKey:
    return dg.AssetKey(list(view.asset_key_path))


def views_by_cadence(config: ManagedConfig) -> dict[Cadence, list[ViewDefinition]]:
    """Each cadence that has views, with its views (as analytics_views.orchestration.jobs.build_jobs)."""
    views = managed_views(config).views
    return {
        cadence: on_it
        for cadence in config.cadences
        if (on_it := [view for view in views if view.cadence == cadence.name])
    }


def cadence_jobs(by_cadence: dict[Cadence, list[ViewDefinition]]) -> list:
    """The project's jobs (same names, selections and tags), with the executor of the Definitions they are in."""
    return [
        dg.define_asset_job(
            name=f"{cadence.name}_refresh_job",
            selection=dg.AssetSelection.assets(*map(view_key, views)),
            tags={"cadence": cadence.name},
        )
        for cadence, views in by_cadence.items()
    ]


# --- the variants -------------------------------------------------------------------------------------

CONFIG = ManagedConfig()
BY_CADENCE = views_by_cadence(CONFIG)
SOURCE_SPECS = [spec for _, spec in build_sources(CONFIG).values()]  # plain specs: the variants observe nothing
PROJECT_ASSETS = [*SOURCE_SPECS, *build_assets(CONFIG, managed_view_assets(CONFIG))]
# A step per view, as before issue 27.
PER_VIEW_ASSETS = [*SOURCE_SPECS, *(view_asset(view, cadence) for cadence, views in BY_CADENCE.items() for view in views)]
RESOURCES = {"analytics_db": AnalyticsDatabase(url=dg.EnvVar("DATABASE_URL"))}


def project_assets_with(executor: dg.ExecutorDefinition) -> dg.Definitions:
    return dg.Definitions(
        assets=PER_VIEW_ASSETS, jobs=cadence_jobs(BY_CADENCE), resources=RESOURCES, executor=executor
    )


in_process_defs = project_assets_with(dg.in_process_executor)
multiprocess_spawn_defs = project_assets_with(dg.multiprocess_executor)
multiprocess_forkserver_defs = project_assets_with(
    dg.multiprocess_executor.configured(
        {
            "max_concurrent": FORKSERVER_MAX_CONCURRENT,
            # The server imports Dagster, the project and these definitions once; each step's process is
            # forked from it instead of importing them again.
            "start_method": {"forkserver": {"preload_modules": [__name__]}},
        }
    )
)
multi_asset_defs = dg.Definitions(
    assets=PROJECT_ASSETS,
    jobs=cadence_jobs(BY_CADENCE),
    resources=RESOURCES,
    executor=dg.in_process_executor,  # one step per run: nothing to run beside it
)
