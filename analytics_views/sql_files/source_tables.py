"""The source tables as sql/migrations/ declare them: columns, types and `COMMENT ON` descriptions.

Read from the SQL files, never from a database: the webserver and the daemon load the definitions often,
and the migrations are the one place a table's shape and meaning are written down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from analytics_views.sql_files.parse_cache import cached
from analytics_views.paths import MIGRATIONS_DIR

if TYPE_CHECKING:
    from sqlglot import exp

# sqlglot is imported only where a file is parsed: with the parse cache (parse_cache.py) a process that loads
# unchanged migrations never imports it.


@dataclass(frozen=True)
class ColumnDoc:
    name: str
    type: str | None  # as PostgreSQL spells it in the migration (bigint, timestamptz, numeric(12, 2)); None if unknown
    description: str | None


@dataclass(frozen=True)
class SourceTable:
    name: str
    description: str | None
    columns: tuple[ColumnDoc, ...]
    path: Path  # the migration that creates it
    line: int  # of its CREATE TABLE, 1-based


def _type_name(kind: exp.DataType) -> str:
    # sqlglot writes numeric as DECIMAL; say it the way the migrations and psql do.
    return kind.sql(dialect="postgres").lower().replace("decimal", "numeric")


def _create_table_line(text: str, table: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.lower().replace("(", " ").split()
        if words[:2] == ["create", "table"] and table in words[2:4]:
            return number
    return 1


@dataclass
class _TableDraft:
    path: Path
    line: int
    columns: dict[str, str]
    description: str | None = None
    column_descriptions: dict[str, str] | None = None


def _apply(statement: exp.Expression, tables: dict[str, _TableDraft], path: Path, text: str) -> None:
    from sqlglot import exp

    if isinstance(statement, exp.Create) and statement.kind == "TABLE":
        name = statement.this.this.name
        columns = {
            column.name: _type_name(column.args["kind"])
            for column in statement.this.expressions
            if isinstance(column, exp.ColumnDef)
        }
        tables[name] = _TableDraft(path, _create_table_line(text, name), columns, column_descriptions={})
    elif isinstance(statement, exp.Drop) and statement.kind == "TABLE":
        tables.pop(statement.this.name, None)
    elif isinstance(statement, exp.Alter) and statement.args.get("kind") == "TABLE" and statement.this.name in tables:
        table = tables[statement.this.name]
        for action in statement.args.get("actions") or []:
            if isinstance(action, exp.ColumnDef):
                table.columns[action.name] = _type_name(action.args["kind"])
            elif isinstance(action, exp.Drop) and action.args.get("kind") == "COLUMN":
                table.columns.pop(action.this.name, None)
    elif isinstance(statement, exp.Comment) and statement.args.get("kind") in ("TABLE", "COLUMN"):
        target = statement.this
        text_value = statement.expression.name if isinstance(statement.expression, exp.Literal) else None
        if statement.args["kind"] == "TABLE" and target.name in tables:
            tables[target.name].description = text_value
        elif statement.args["kind"] == "COLUMN" and isinstance(target, exp.Column) and target.table in tables:
            tables[target.table].column_descriptions[target.name] = text_value


@cache
def load_source_tables(migrations_dir: Path = MIGRATIONS_DIR) -> dict[str, SourceTable]:
    """Every table the migrations leave behind, in name order of the files that create them; parsed again only
    when a migration or the code changed (parse_cache.py)."""
    return cached("source_tables", migrations_dir.glob("*.sql"), lambda: _parse_source_tables(migrations_dir))


def _parse_source_tables(migrations_dir: Path) -> dict[str, SourceTable]:
    import sqlglot

    drafts: dict[str, _TableDraft] = {}
    for path in sorted(migrations_dir.glob("*.sql")):
        text = path.read_text()
        for statement in sqlglot.parse(text, read="postgres"):
            if statement is not None:
                _apply(statement, drafts, path, text)
    return {
        name: SourceTable(
            name=name,
            description=draft.description,
            columns=tuple(
                ColumnDoc(column, type_name, (draft.column_descriptions or {}).get(column))
                for column, type_name in draft.columns.items()
            ),
            path=draft.path,
            line=draft.line,
        )
        for name, draft in drafts.items()
    }


def lineage_schema(tables: dict[str, SourceTable]) -> dict[str, dict[str, str]]:
    """{table: {column: type}}, the schema sqlglot needs to resolve columns."""
    return {table.name: {column.name: column.type or "unknown" for column in table.columns} for table in tables.values()}
