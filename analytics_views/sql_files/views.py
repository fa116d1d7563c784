"""The materialized views, read from their SQL files: the one source of truth.

Each `sql/views/<name>.sql` holds a header comment, one `CREATE MATERIALIZED VIEW <name> AS ... WITH NO
DATA;`, the unique index that `REFRESH ... CONCURRENTLY` needs and a `COMMENT ON COLUMN <name>.<column>`
for each output column. Everything Python knows about a view (description, cadence, columns and their
descriptions, upstream tables and views, column lineage) is derived here, so adding a view is adding a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from graphlib import TopologicalSorter
from pathlib import Path
from typing import TYPE_CHECKING

from analytics_views.postgres.database import Column
from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.parse_cache import cached
from analytics_views.paths import VIEWS_DIR
from analytics_views.sql_files.source_tables import ColumnDoc, lineage_schema, load_source_tables
from analytics_views.postgres.modes import RefreshStrategy

if TYPE_CHECKING:
    from analytics_views.sql_files.lineage import SourceColumn
    from analytics_views.sql_files.managed import ManagedConfig

# sqlglot (through analytics_views.sql_files.lineage) is imported only where a file is parsed: with the parse cache
# (parse_cache.py) a process that loads unchanged views never imports it.

_CREATE_VIEW = re.compile(
    r"CREATE\s+MATERIALIZED\s+VIEW\s+(?P<name>\w+)\s+AS\s+(?P<query>.*?)\s+WITH\s+NO\s+DATA\s*;",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class ViewDefinition:
    name: str
    path: Path | None  # None for a view discovered in the catalog (made by someone else's migrations)
    sql: str
    summary: str  # the header's first line: what the view answers
    description: str  # the whole header
    grain: str | None
    cadence: str
    deps: tuple[str, ...]  # tables and views the query reads, sorted (asset key strings for discovered views)
    # Output columns in order: from the file's COMMENT ON COLUMN (project views) or the catalog (discovered).
    columns: tuple[ColumnDoc | Column, ...] = ()
    # Project views only: where the CREATE statement is (1-based) and each output column's sources.
    line: int | None = None
    column_lineage: Mapping[str, tuple[SourceColumn, ...]] = field(default_factory=dict)
    # Discovered views only (analytics_views/discovery.py); project views live in the current schema.
    schema: str | None = None
    key: tuple[str, ...] | None = None  # asset key path when not just the name (discovery.asset_key)
    fingerprint: str | None = None  # of the catalog definition, to tell when discovery is out of date
    unique_index: str | None = None  # the usable unique index discovery recorded (its CREATE statement)
    refresh_strategy: RefreshStrategy = RefreshStrategy.AUTO  # optional `-- Refresh: auto|concurrent|swap` header line
    # Why sqlglot could not read the query, when it could not: PostgreSQL judges the SQL (migrate), the view
    # is refreshed, its relations come from the query's tokens, and what needs the parse tree says why not.
    unparsed: str | None = None

    @property
    def asset_key_path(self) -> tuple[str, ...]:
        return self.key or (self.name,)

    @property
    def query(self) -> str:
        """What the view computes: a file's `CREATE MATERIALIZED VIEW ... AS <query> WITH NO DATA`, or the
        definition discovery read from the catalog (`pg_get_viewdef`); its code version hashes this."""
        match = _CREATE_VIEW.search(self.sql) if self.path is not None else None
        return (match["query"] if match else self.sql).strip()

    @property
    def label(self) -> str:
        """How messages and the CLI name the view: schema-qualified when discovered."""
        return f"{self.schema}.{self.name}" if self.schema else self.name


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
    import sqlglot
    from sqlglot import exp

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


def _create_statement(path: Path, text: str) -> re.Match:
    match = _CREATE_VIEW.search(text)
    if match is None:
        raise ValueError(f"{path}: no 'CREATE MATERIALIZED VIEW ... AS ... WITH NO DATA;' statement")
    if match["name"] != path.stem:
        raise ValueError(f"{path}: creates view {match['name']!r}; rename the file or the view to match")
    return match


def _column_comments(statements: str, view: str, columns: tuple[str, ...], path: Path) -> dict[str, str]:
    """The `COMMENT ON COLUMN view.column IS '...'` statements after the CREATE, checked against the view."""
    import sqlglot
    from sqlglot import exp

    comments = {}
    for statement in sqlglot.parse(statements, read="postgres"):
        if not isinstance(statement, exp.Comment):
            continue
        target = statement.this
        if statement.args.get("kind") != "COLUMN":
            raise ValueError(
                f"{path}: COMMENT ON {statement.args.get('kind')} {target.sql()}: the header comment is the "
                "view's description (migrate writes it to the database); only COMMENT ON COLUMN belongs here"
            )
        if target.table != view or target.name not in columns:
            raise ValueError(f"{path}: COMMENT ON COLUMN {target.sql()} names no column of {view}")
        comments[target.name] = statement.expression.name
    return comments


def parse_view_file(path: Path, schema: dict[str, dict[str, str]] | None = None) -> ViewDefinition:
    """One view file; `schema` ({table: {column: type}}) resolves columns the query leaves unqualified."""
    from sqlglot.errors import SqlglotError

    from analytics_views.sql_files.lineage import column_lineage, output_columns

    text = path.read_text()
    match = _create_statement(path, text)
    header = _header(text)
    if not header or not header[0]:
        raise ValueError(f"{path}: starts without a header comment saying what the view answers")
    cadence = _field(header, "cadence", path).lower()  # checked against the configured cadences: on_cadences()
    query, unparsed = match["query"], None
    try:
        columns, deps = output_columns(query), query_dependencies(query)
        lineage = column_lineage(query, schema or {})
        comments = _column_comments(text[match.end() :], path.stem, columns, path)
    except SqlglotError as error:
        columns, deps, lineage, comments = (), relations_in_tokens(query), {}, {}
        reason = " ".join(str(error).split("\n")[0].split())
        unparsed = f"sqlglot cannot read the query of {path.name} ({reason})"
    try:
        strategy = RefreshStrategy.named(_field(header, "refresh", path, default=RefreshStrategy.AUTO).lower())
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return ViewDefinition(
        name=path.stem,
        path=path,
        sql=text,
        summary=header[0],
        description="\n".join(header).strip(),
        grain=_field(header, "grain", path),
        cadence=cadence,
        deps=deps,
        line=text.count("\n", 0, match.start()) + 1,
        columns=tuple(ColumnDoc(name, None, comments.get(name)) for name in columns),
        column_lineage=lineage,
        refresh_strategy=strategy,
        unparsed=unparsed,
    )


def relations_in_tokens(query: str) -> tuple[str, ...]:
    """The relations named after FROM and JOIN, from the query's tokens alone: for SQL sqlglot cannot parse
    (a typo PostgreSQL will name, or PostgreSQL sqlglot does not know). CTE names and functions are left out."""
    from sqlglot import tokenize
    from sqlglot.errors import SqlglotError
    from sqlglot.tokens import TokenType

    try:
        tokens = tokenize(query, read="postgres")
    except SqlglotError:
        return ()
    ctes = {tokens[i].text for i in range(len(tokens) - 2)
            if tokens[i].token_type == TokenType.VAR and tokens[i + 1].token_type == TokenType.ALIAS
            and tokens[i + 2].token_type == TokenType.L_PAREN}
    found = set()
    for i, token in enumerate(tokens[:-1]):
        if token.token_type not in (TokenType.FROM, TokenType.JOIN):
            continue
        name, j = [], i + 1
        while j < len(tokens) and tokens[j].token_type == TokenType.VAR:
            name.append(tokens[j].text)
            if j + 1 < len(tokens) and tokens[j + 1].token_type == TokenType.DOT:
                j += 2
            else:
                break
        followed_by_call = j + 1 < len(tokens) and tokens[j + 1].token_type == TokenType.L_PAREN
        if name and not followed_by_call and name[-1] not in ctes:
            found.add(name[-1])
    return tuple(sorted(found))


def migrations_dir(views_dir: Path) -> Path:
    """Where the tables a views folder's views read are declared: `migrations/` beside it (sql/views, sql/migrations)."""
    return views_dir.parent / "migrations"


@cache
def load_views(views_dir: Path = VIEWS_DIR) -> tuple[ViewDefinition, ...]:
    """All views of the folder, ordered so that a view comes after every view it reads; parsed again only when a
    view file, a migration or the code changed (parse_cache.py)."""
    inputs = [*views_dir.glob("*.sql"), *migrations_dir(views_dir).glob("*.sql")]
    return cached("views", inputs, lambda: _parse_views(views_dir))


def _parse_views(views_dir: Path) -> tuple[ViewDefinition, ...]:
    from sqlglot.errors import SqlglotError

    from analytics_views.sql_files.lineage import output_columns

    paths = sorted(views_dir.glob("*.sql"))
    # Columns resolve against the source tables and the other views, so one view may read another.
    schema = lineage_schema(load_source_tables(migrations_dir(views_dir)))
    for path in paths:
        try:
            columns = output_columns(_create_statement(path, path.read_text())["query"])
        except SqlglotError:  # parse_view_file says why
            columns = ()
        schema[path.stem] = dict.fromkeys(columns, "unknown")
    views = {view.name: view for view in (parse_view_file(path, schema) for path in paths)}
    graph = {name: [dep for dep in view.deps if dep in views] for name, view in views.items()}
    return tuple(views[name] for name in TopologicalSorter(graph).static_order())


def source_tables(views: tuple[ViewDefinition, ...]) -> tuple[str, ...]:
    """Relations read by the views that are not views themselves."""
    names = {view.name for view in views}
    return tuple(sorted({dep for view in views for dep in view.deps} - names))


def view_names() -> tuple[str, ...]:
    return tuple(view.name for view in load_views())


def on_cadences(views: tuple[ViewDefinition, ...], config: ManagedConfig) -> tuple[ViewDefinition, ...]:
    """The SQL folder's views on their configured cadence: the first matching `cadence` pattern of the
    configuration, else the file header's `-- Cadence:`, which must name a cadence the configuration defines."""
    known = config.cadence_names
    for view in views:
        if view.cadence not in known:
            raise AnalyticsViewsError(
                f"{view.path}: cadence {view.cadence!r} is not one of {', '.join(known)}: "
                f"define it under attributes.cadences in {config.where}, or change the header"
            )
    return tuple(_on_cadence(view, config.cadence_of(None, view.name, view.cadence)) for view in views)


def _on_cadence(view: ViewDefinition, cadence: str) -> ViewDefinition:
    if cadence == view.cadence:
        return view
    # The description is the header: say there which cadence the view is on now, and why not the header's.
    line = f"Cadence: {cadence} (defs.yaml cadence; the header says {view.cadence})"
    description = re.sub(r"^cadence\s*:.*$", line, view.description, count=1, flags=re.IGNORECASE | re.MULTILINE)
    return replace(view, cadence=cadence, description=description)


def views_with_cadence(cadence: str) -> tuple[ViewDefinition, ...]:
    return tuple(view for view in load_views() if view.cadence == cadence)
