"""Where the SQL lives: the one source of truth for tables and views."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = PROJECT_ROOT / "sql"
VIEWS_DIR = SQL_DIR / "views"
MIGRATIONS_DIR = SQL_DIR / "migrations"
# The component instance that manages this project's views (dg's defs_module is analytics_views.orchestration.defs).
DEFS_YAML = Path(__file__).resolve().parent / "orchestration" / "defs" / "views" / "defs.yaml"
DEFS_ENV = "ANALYTICS_VIEWS_DEFS"  # another defs.yaml to load instead of this project's


def defs_yaml_in_use() -> Path:
    """The component's defs.yaml that Dagster and the CLI load: ANALYTICS_VIEWS_DEFS, or the project's own."""
    return Path(os.environ.get(DEFS_ENV) or DEFS_YAML)
