"""Dagster component instances (`defs.yaml` files), one folder each: the `defs_module` of `[tool.dg]` in
pyproject.toml, where `dg scaffold defs` writes. Empty so far; analytics_views/definitions.py assembles
everything Dagster loads."""
