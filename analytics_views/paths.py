"""Where the SQL lives: the one source of truth for tables and views."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = PROJECT_ROOT / "sql"
VIEWS_DIR = SQL_DIR / "views"
MIGRATIONS_DIR = SQL_DIR / "migrations"
# The component instance that manages this project's views (dg's defs_module is analytics_views.orchestration.defs).
DEFS_YAML = Path(__file__).resolve().parent / "orchestration" / "defs" / "views" / "defs.yaml"
