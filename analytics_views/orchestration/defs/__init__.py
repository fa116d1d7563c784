"""Dagster component instances (`defs.yaml` files), one folder each: the `defs_module` of `[tool.dg]` in
pyproject.toml, where `dg scaffold defs` writes. views/defs.yaml configures this project's
MaterializedViewsComponent; analytics_views/definitions.py loads this folder (what workspace.yaml and `dg` load).
Dagster keeps the components' state in .local_defs_state/ here (not in git)."""
