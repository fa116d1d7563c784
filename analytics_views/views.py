"""The materialized views, read from their SQL files: the one source of truth.

Each `sql/views/<name>.sql` holds a header comment, one `CREATE MATERIALIZED VIEW <name> AS ... WITH NO
DATA;` and the unique index that `REFRESH ... CONCURRENTLY` needs. Everything Python knows about a view
(description, cadence, upstream tables and views) is derived here, so adding a view is adding a file.
"""

import re
from dataclasses import dataclass
from functools import cache
from graphlib import TopologicalSorter
from pathlib import Path

import sqlglot
from sqlglot import exp

from analytics_views.swap import AUTO, STRATEGIES

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
VIEWS_DIR = SQL_DIR / "views"
MIGRATIONS_DIR = SQL_DIR / "migrations"

CADENCES = ("daily", "weekly")

_CREATE_VIEW = re.compile(
    r"CREATE\s+MATERIALIZED\s+VIEW\s+(?P<name>\w+)\s+AS\s+(?P<query>.*?)\s+WITH\s+NO\s+DATA\s*;",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class ViewDefinition:
    name: str
    path: Path
    sql: str
    summary: str  # the header's first line: what the view answers
    description: str  # the whole header
    grain: str
    cadence: str
    deps: tuple[str, ...]  # tables and views the query reads, sorted
    refresh_strategy: str = "auto"  # optional `-- Refresh: auto|concurrent|swap` header line (see swap.py)


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:].removeprefix(" ").rstrip())
    return lines


def _field(header: list[str], name: str, path: Path, default: str | None = None) -> str:
    for line in header:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    if default is not None:
        return default
    raise ValueError(f"{path}: header has no '-- {name.capitalize()}: ...' line; add one")


def query_dependencies(query: str) -> tuple[str, ...]:
    """Relations a SELECT reads, from its parse tree (CTE names and table functions excluded)."""
    tree = sqlglot.parse_one(query, read="postgres")
    ctes = {cte.alias for cte in tree.find_all(exp.CTE)}
    return tuple(
        sorted(
            {
                table.name
                for table in tree.find_all(exp.Table)
                if isinstance(table.this, exp.Identifier) and table.name not in ctes
            }
        )
    )


def parse_view_file(path: Path) -> ViewDefinition:
    text = path.read_text()
    match = _CREATE_VIEW.search(text)
    if match is None:
        raise ValueError(f"{path}: no 'CREATE MATERIALIZED VIEW ... AS ... WITH NO DATA;' statement")
    if match["name"] != path.stem:
        raise ValueError(f"{path}: creates view {match['name']!r}; rename the file or the view to match")
    header = _header(text)
    if not header or not header[0]:
        raise ValueError(f"{path}: starts without a header comment saying what the view answers")
    cadence = _field(header, "cadence", path).lower()
    if cadence not in CADENCES:
        raise ValueError(f"{path}: cadence {cadence!r} is not one of {', '.join(CADENCES)}")
    strategy = _field(header, "refresh", path, default=AUTO).lower()
    if strategy not in STRATEGIES:
        raise ValueError(f"{path}: refresh strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return ViewDefinition(
        name=path.stem,
        path=path,
        sql=text,
        summary=header[0],
        description="\n".join(header).strip(),
        grain=_field(header, "grain", path),
        cadence=cadence,
        deps=query_dependencies(match["query"]),
        refresh_strategy=strategy,
    )


@cache
def load_views(views_dir: Path = VIEWS_DIR) -> tuple[ViewDefinition, ...]:
    """All views, ordered so that a view comes after every view it reads."""
    views = {view.name: view for view in map(parse_view_file, sorted(views_dir.glob("*.sql")))}
    graph = {name: [dep for dep in view.deps if dep in views] for name, view in views.items()}
    return tuple(views[name] for name in TopologicalSorter(graph).static_order())


def source_tables(views: tuple[ViewDefinition, ...]) -> tuple[str, ...]:
    """Relations read by the views that are not views themselves."""
    names = {view.name for view in views}
    return tuple(sorted({dep for view in views for dep in view.deps} - names))


def view_names() -> tuple[str, ...]:
    return tuple(view.name for view in load_views())


def views_with_cadence(cadence: str) -> tuple[ViewDefinition, ...]:
    return tuple(view for view in load_views() if view.cadence == cadence)
