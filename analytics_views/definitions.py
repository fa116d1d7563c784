"""Everything Dagster loads (workspace.yaml, `dg`, the CLI's runs): the project's defs folder,
analytics_views/orchestration/defs/, whose views/defs.yaml configures a `MaterializedViewsComponent`.

With ANALYTICS_VIEWS_DEFS set, that defs.yaml is loaded instead. Views made elsewhere come from the
component's discovery state; loading never connects to the database.
"""

from analytics_views.orchestration.component import load_definitions

defs = load_definitions()
