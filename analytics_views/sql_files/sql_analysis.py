"""The analysis behind sql_checks.py: a view's stored definition parsed with sqlglot, qualified against the
catalog and split into scopes, with the types, nullability and uniqueness the checks ask of its expressions.

Imported only when a check has to be computed (sql_checks.py caches the outcomes), so that a run worker whose
views and catalog did not change never imports sqlglot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from sqlglot import exp, parse_one
from sqlglot.errors import ParseError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, ScopeType, build_scope

from analytics_views.sql_files.sql_checks import NOT_NULL, NULLABLE, UNKNOWN, Finding, ViewFacts

# Type names as format_type() writes them, and as sqlglot parses casts, reduced to what the checks need.
_CATALOG_TYPES = {
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "time without time zone": "time",
    "time with time zone": "timetz",
    "interval": "interval",
}
_CAST_TYPES = {
    exp.DataType.Type.TIMESTAMPTZ: "timestamptz",
    exp.DataType.Type.TIMESTAMPLTZ: "timestamptz",
    exp.DataType.Type.TIMESTAMP: "timestamp",
    exp.DataType.Type.DATE: "date",
    exp.DataType.Type.TIME: "time",
    exp.DataType.Type.TIMETZ: "timetz",
    exp.DataType.Type.INTERVAL: "interval",
    exp.DataType.Type.TEXT: "text",
    exp.DataType.Type.VARCHAR: "text",
}
_NOW = (exp.CurrentTimestamp, exp.CurrentDatetime)
_SESSION_CLOCK = {
    exp.CurrentDate: "(now() AT TIME ZONE 'UTC')::date",
    exp.Localtimestamp: "now() AT TIME ZONE 'UTC'",
    exp.Localtime: "(now() AT TIME ZONE 'UTC')::time",
    exp.CurrentTime: "(now() AT TIME ZONE 'UTC')::time",
}
# Aggregates whose value repeated rows do not change.
_DUPLICATE_INSENSITIVE = (exp.Min, exp.Max, exp.LogicalAnd, exp.LogicalOr, exp.AnyValue)
# Casts that keep distinct values distinct, so an equality on the cast value is one on the value: PostgreSQL writes
# `(a.user_id)::text = (r.user_id)::text` for varchar, char and text-domain keys, `(d.level)::integer` for a domain.
_TEXT_TYPES = (exp.DataType.Type.TEXT, exp.DataType.Type.VARCHAR)
_CHAR_TYPES = (exp.DataType.Type.CHAR, exp.DataType.Type.BPCHAR)
_INTEGER_TYPES = (exp.DataType.Type.SMALLINT, exp.DataType.Type.INT, exp.DataType.Type.BIGINT)
_CALENDAR_INTERVAL = re.compile(r"\b(day|days|week|weeks|mon|mons|month|months|year|years)\b", re.IGNORECASE)


@dataclass(frozen=True)
class UniqueKey:
    columns: frozenset[str]
    nulls_equal: bool  # True when rows with NULL in the key are unique too (GROUP BY, DISTINCT, NOT NULL columns)


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str
    kind: str  # pg_class.relkind
    types: dict[str, str]  # column -> format_type()
    not_null: frozenset[str]
    unique_keys: tuple[UniqueKey, ...]
    definition: str | None  # views and materialized views
    base_types: dict[str, str] = field(default_factory=dict)  # column -> format_type() of its domain's base type

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"


_RELATION = """
SELECT c.oid, n.nspname, c.relname, c.relkind,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       format_type(coalesce(nullif(t.typbasetype, 0), a.atttypid), CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END)
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
# Unique indexes whose keys are plain columns and that cover every row (no WHERE clause).
_UNIQUE_KEYS = """
SELECT array_agg(a.attname::text), {nulls_not_distinct}
FROM pg_index AS i
JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1])
WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid, i.indisprimary{group_extra}
"""


class Catalog:
    """What the checks ask PostgreSQL, each relation looked up once per connection's checks."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._relations: dict[tuple[str | None, str], Relation | None] = {}
        self._analyses: dict[str, QueryAnalysis] = {}
        self._nulls_not_distinct = conn.info.server_version >= 150000

    def relation(self, schema: str | None, name: str) -> Relation | None:
        key = (schema, name)
        if key not in self._relations:
            self._relations[key] = self._load(schema, name)
        return self._relations[key]

    def _load(self, schema: str | None, name: str) -> Relation | None:
        text = sql.Identifier(name) if schema is None else sql.Identifier(schema, name)
        row = self.conn.execute(_RELATION, [text.as_string(self.conn)]).fetchone()
        if row is None:
            return None
        oid, schema_name, relname, kind, definition = row
        columns = self.conn.execute(_COLUMNS, [oid]).fetchall()
        query = _UNIQUE_KEYS.format(
            nulls_not_distinct="i.indisprimary OR i.indnullsnotdistinct" if self._nulls_not_distinct else "i.indisprimary",
            group_extra=", i.indnullsnotdistinct" if self._nulls_not_distinct else "",
        )
        not_null = frozenset(column for column, _, notnull, _ in columns if notnull)
        keys = tuple(
            UniqueKey(frozenset(names), bool(nulls_equal) or frozenset(names) <= not_null)
            for names, nulls_equal in self.conn.execute(query, [oid]).fetchall()
        )
        return Relation(
            schema=schema_name,
            name=relname,
            kind=kind,
            types={column: type_ for column, type_, _, _ in columns},
            not_null=not_null,
            unique_keys=keys,
            definition=definition.strip().rstrip(";") if definition else None,
            base_types={column: base for column, _, _, base in columns},
        )

    def analysis(self, relation: Relation) -> QueryAnalysis | None:
        """The parsed definition of a view the query reads, to follow its columns' nullability and keys."""
        if relation.definition is None:
            return None
        if relation.label not in self._analyses:
            try:
                self._analyses[relation.label] = QueryAnalysis(relation.definition, self)
            except Exception:  # a definition sqlglot cannot read: its properties stay unknown
                self._analyses[relation.label] = None
        return self._analyses[relation.label]


def _data_type(format_type: str | None) -> exp.DataType | None:
    if format_type is None:
        return None
    try:
        return exp.DataType.build(format_type, dialect="postgres")
    except Exception:  # a type sqlglot does not know: no cast of it is seen through
        return None


def _keeps_distinct(target: exp.DataType, source: exp.DataType | None) -> bool:
    """Whether a cast from `source` (None: unknown) to `target` maps distinct values to distinct values."""
    if target.this in _TEXT_TYPES and not target.expressions:  # the text of a value; no length to truncate to
        return True
    if source is None:
        return False
    if target.this == exp.DataType.Type.BPCHAR and not target.expressions:  # drops trailing spaces, as char does
        return source.this in _CHAR_TYPES
    if source.this == target.this and (not target.expressions or target.expressions == source.expressions):
        return True  # a domain to its base type
    return source.this in _INTEGER_TYPES and (
        target.this in _INTEGER_TYPES or (target.this == exp.DataType.Type.DECIMAL and not target.expressions)
    )


def _strip_parens(node: exp.Expression) -> exp.Expression:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _plain(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Paren) and not isinstance(node.this, exp.Binary):
        return node.this
    if isinstance(node, exp.Cast) and isinstance(_strip_parens(node.this), exp.Literal) and node.to.this in (
        exp.DataType.Type.TEXT,
        exp.DataType.Type.DECIMAL,
    ):  # 'UTC'::text, (0)::numeric: casts pg_get_viewdef writes out
        return _strip_parens(node.this)
    return node


def display(node: exp.Expression) -> str:
    """An expression as SQL for a message, without the parentheses and literal casts pg_get_viewdef adds."""
    node = node.copy()
    for _ in range(8):  # transform() does not descend into a node it replaced: ((a)::text = ...) needs a second pass
        plain = node.transform(_plain)
        if plain == node:
            break
        node = plain
    return node.sql(dialect="postgres", normalize_functions="lower")


def _flatten_joins(tree: exp.Expression) -> None:
    """pg_get_viewdef writes `FROM ((a JOIN b ON ...) JOIN c ON ...)`: make it `FROM a JOIN b ... JOIN c ...`."""
    for select in list(tree.find_all(exp.Select)):
        source = select.args.get("from_")
        if source is None:
            continue
        inner, nested = source.this, []
        while isinstance(inner, exp.Subquery) and not inner.alias and not isinstance(inner.this, (exp.Select, exp.SetOperation)):
            nested.append(inner.args.get("joins") or [])
            inner = inner.this
        if not nested:
            continue
        joins = list(inner.args.get("joins") or [])
        for level in reversed(nested):
            joins.extend(level)
        inner.set("joins", None)
        source.set("this", inner)
        select.set("joins", [*joins, *(select.args.get("joins") or [])])


_FROM_PARENS = re.compile(r"\bFROM\s+(\(\s*)+(?!\s*(SELECT|WITH|VALUES)\b)", re.IGNORECASE)


def _unparenthesized_joins(query: str) -> str:
    """`FROM (unnest(a) x JOIN ...)` without its grouping parentheses, which sqlglot cannot parse when the
    group starts with a function; pg_get_viewdef groups joins left to right, so dropping them keeps the meaning."""
    drop: set[int] = set()
    for match in _FROM_PARENS.finditer(query):
        opens = [i for i in range(match.start(), match.end()) if query[i] == "("]
        for start in opens:
            depth, quoted = 0, False
            for i in range(start, len(query)):
                char = query[i]
                if char == "'":
                    quoted = not quoted
                elif not quoted and char == "(":
                    depth += 1
                elif not quoted and char == ")":
                    depth -= 1
                    if depth == 0:
                        drop.update((start, i))
                        break
    return "".join(" " if i in drop else char for i, char in enumerate(query))


def _conjuncts(condition: exp.Expression | None) -> list[exp.Expression]:
    if condition is None:
        return []
    condition = _strip_parens(condition)
    if isinstance(condition, exp.And):
        return _conjuncts(condition.this) + _conjuncts(condition.expression)
    return [condition]


def _equality(condition: exp.Expression) -> tuple[exp.Expression, exp.Expression, bool] | None:
    """(left, right, nulls_equal) of `a = b` or `a IS NOT DISTINCT FROM b` (written `NOT (a IS DISTINCT FROM b)`)."""
    condition = _strip_parens(condition)
    if isinstance(condition, exp.EQ):
        return _strip_parens(condition.this), _strip_parens(condition.expression), False
    if isinstance(condition, exp.NullSafeEQ):
        return _strip_parens(condition.this), _strip_parens(condition.expression), True
    if isinstance(condition, exp.Not) and isinstance(_strip_parens(condition.this), exp.NullSafeNEQ):
        inner = _strip_parens(condition.this)
        return _strip_parens(inner.this), _strip_parens(inner.expression), True
    return None


def _null_rejected(condition: exp.Expression | None) -> set[tuple[str, str] | str]:
    """What a WHERE or inner ON condition proves NOT NULL in the rows it keeps: (relation, column) pairs, and the
    SQL of other expressions (`WHERE COALESCE(a.k, b.k) IS NOT NULL`)."""
    proven: set[tuple[str, str] | str] = set()
    if isinstance(condition, exp.Where):
        condition = condition.this

    def add(side: exp.Expression) -> None:
        side = _strip_parens(side)
        proven.add((side.table, side.name) if isinstance(side, exp.Column) else display(side))

    for part in _conjuncts(condition):
        negated = isinstance(part, exp.Not) and isinstance(_strip_parens(part.this), exp.Is)
        if negated or (isinstance(part, exp.Is) and part.args.get("negate")):  # x IS NOT NULL
            part = _strip_parens(part.this) if negated else part
            if isinstance(part.expression, exp.Null):
                add(part.this)
        elif isinstance(part, (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):  # strict comparisons
            for side in (part.this, part.expression):
                add(side)
    return proven


def _is_aggregate_query(select: exp.Expression) -> bool:
    if not isinstance(select, exp.Select):
        return False
    if select.args.get("group"):
        return True
    return any(_own_aggregates(select))


def _own_aggregates(select: exp.Select):
    """Aggregates that group this SELECT's rows: not in a window, not in a nested query."""
    for projection in [*select.expressions, select.args.get("having")]:
        if projection is None:
            continue
        for agg in projection.find_all(exp.AggFunc):
            if agg.find_ancestor(exp.Window, exp.Select) is select:  # nearest: not OVER (...), not a subquery
                yield agg


def _combine(*states: str) -> str:
    if NULLABLE in states:
        return NULLABLE
    if UNKNOWN in states:
        return UNKNOWN
    return NOT_NULL


@dataclass
class _Join:
    alias: str
    node: exp.Join | None
    nullable: bool = False


class QueryAnalysis:
    """One SELECT (a view's definition) qualified against the catalog and split into scopes."""

    def __init__(self, query: str, catalog: Catalog):
        self.catalog = catalog
        try:
            tree = parse_one(query, read="postgres")
        except ParseError:
            tree = parse_one(_unparenthesized_joins(query), read="postgres")
        _flatten_joins(tree)
        ctes = {cte.alias for cte in tree.find_all(exp.CTE)}
        schema: dict[str, dict[str, dict[str, str]]] = {}
        self.tables: dict[int, Relation] = {}
        for table in tree.find_all(exp.Table):
            if not isinstance(table.this, exp.Identifier) or (not table.db and table.name in ctes):
                continue
            relation = catalog.relation(table.db or None, table.name)
            if relation is None:
                continue
            table.set("db", exp.to_identifier(relation.schema))
            schema.setdefault(relation.schema, {})[relation.name] = dict.fromkeys(relation.types, "unknown")
        self.tree = qualify(
            tree,
            schema=schema,
            dialect="postgres",
            validate_qualify_columns=False,
            quote_identifiers=False,
            expand_stars=False,
        )
        self.root = build_scope(self.tree)
        self._memo: dict[tuple, object] = {}

    # --- relations and columns

    def relation_of(self, table: exp.Table) -> Relation | None:
        if not isinstance(table.this, exp.Identifier) or not table.db:
            return None
        return self.catalog.relation(table.db, table.name)

    def source_of(self, scope: Scope, column: exp.Column) -> tuple[Scope, object] | None:
        """The scope a column's relation belongs to (a correlated column: an enclosing one) and the source."""
        while scope is not None and column.table not in scope.sources:
            scope = scope.parent
        if scope is None:
            return None
        return scope, scope.sources[column.table]

    @staticmethod
    def query_scope(source: Scope) -> Scope:
        if source.scope_type == ScopeType.UDTF and source.subquery_scopes:  # LATERAL (SELECT ...)
            return source.subquery_scopes[0]
        return source

    def projections(self, scope: Scope, name: str) -> list[tuple[Scope, exp.Expression]]:
        scope = self.query_scope(scope)
        if scope.set_operation_scopes:
            return [item for branch in scope.set_operation_scopes for item in self.projections(branch, name)]
        selects = scope.expression.selects if isinstance(scope.expression, exp.Query) else []
        return [(scope, p.unalias()) for p in selects if p.alias_or_name == name]

    # --- types

    def type_of(self, scope: Scope, node: exp.Expression) -> str | None:
        """The type of an expression as far as the checks need it (see _CATALOG_TYPES); None: unknown."""
        node = _strip_parens(node)
        if isinstance(node, exp.Alias):
            return self.type_of(scope, node.this)
        if isinstance(node, exp.Column):
            return self.column_type(scope, node)
        if isinstance(node, exp.Cast):
            return _CAST_TYPES.get(node.to.this, "other")
        if isinstance(node, _NOW):
            return "timestamptz"
        if isinstance(node, exp.CurrentDate):
            return "date"
        if isinstance(node, exp.Localtimestamp):
            return "timestamp"
        if isinstance(node, (exp.Localtime,)):
            return "time"
        if isinstance(node, exp.AtTimeZone):
            inner = self.type_of(scope, node.this)
            return {"timestamptz": "timestamp", "timestamp": "timestamptz", "date": "timestamptz"}.get(inner, inner)
        if isinstance(node, exp.Date):
            return "date"
        if isinstance(node, exp.TimestampTrunc):
            inner = self.type_of(scope, node.this)
            return "timestamptz" if inner == "date" else inner
        if isinstance(node, (exp.Min, exp.Max, exp.Coalesce, exp.AnyValue)):
            for argument in [node.this, *node.expressions]:
                found = self.type_of(scope, argument)
                if found is not None:
                    return found
            return None
        if isinstance(node, (exp.Add, exp.Sub)):
            left, right = self.type_of(scope, node.this), self.type_of(scope, node.expression)
            if left == "date" and right == "date" and isinstance(node, exp.Sub):
                return "other"
            for moment in ("timestamptz", "timestamp"):
                if moment in (left, right):
                    return moment
            if "date" in (left, right):
                return "timestamp" if "interval" in (left, right) else "date"
            return left if left == right else ("other" if None not in (left, right) else None)
        if isinstance(node, (exp.Literal, exp.Boolean, exp.Null, exp.Predicate, exp.Connector, exp.Not, exp.AggFunc)):
            return "other"
        if isinstance(node, (exp.Extract, exp.TimeToStr, exp.Binary, exp.Length)):
            return "other"
        return None

    def column_source(self, scope: Scope, column: exp.Column) -> tuple[object | None, Relation | None]:
        """What a column is read from (a table or function, a CTE's or subquery's scope; None: unknown) and, for a
        table or view, its catalog relation."""
        found = self.source_of(scope, column)
        source = found[1] if found is not None else None
        return source, self.relation_of(source) if isinstance(source, exp.Table) else None

    def column_type(self, scope: Scope, column: exp.Column) -> str | None:
        source, relation = self.column_source(scope, column)
        if source is None:
            return None
        if relation is not None:
            type_ = relation.types.get(column.name)
            return _CATALOG_TYPES.get(type_, "other") if type_ else None
        if isinstance(source, exp.Table):
            function = source.this
            if isinstance(function, (exp.GenerateSeries, exp.ExplodingGenerateSeries)):
                return self.type_of(scope, function.args.get("start")) or "other"
            return None
        return self._agreed("type", source, column.name, self.type_of)

    def _agreed(self, kind: str, source: Scope, name: str, value) -> object | None:
        """`value(scope, projection)` of a CTE's or subquery's output column, when all its branches agree."""
        key = (kind, id(source), name)
        if key not in self._memo:
            self._memo[key] = None  # a recursive CTE refers to itself
            found = [value(inner, p) for inner, p in self.projections(source, name)]
            self._memo[key] = found[0] if found and all(f == found[0] for f in found) else None
        return self._memo[key]

    def base_type(self, scope: Scope, column: exp.Column) -> exp.DataType | None:
        """A column's type as its relation declares it, a domain read as its base type; None: unknown."""
        source, relation = self.column_source(scope, column)
        if source is None or isinstance(source, exp.Table):
            return _data_type(relation.base_types.get(column.name)) if relation is not None else None

        def declared(inner: Scope, projection: exp.Expression) -> exp.DataType | None:
            projection = _strip_parens(projection)
            if isinstance(projection, exp.Column):
                return self.base_type(inner, projection)
            return projection.to if isinstance(projection, exp.Cast) else None

        return self._agreed("base type", source, column.name, declared)

    def through_casts(self, scope: Scope, node: exp.Expression) -> exp.Expression:
        """The expression under the casts that keep distinct values distinct (see _keeps_distinct)."""
        node = _strip_parens(node)
        while isinstance(node, exp.Cast):
            inner = _strip_parens(node.this)
            if isinstance(inner, exp.Column):
                source = self.base_type(scope, inner)
            else:
                source = inner.to if isinstance(inner, exp.Cast) else None
            if not _keeps_distinct(node.to, source):
                break
            node = inner
        return node

    # --- nullability

    def joins(self, select: exp.Select) -> list[_Join]:
        """FROM's relations in order, with the side an outer join may fill with NULLs."""
        source = select.args.get("from_")
        if source is None:
            return []
        items = [_Join(source.this.alias_or_name, None)]
        for join in select.args.get("joins") or []:
            side = (join.side or "").upper()
            item = _Join(join.this.alias_or_name, join, nullable=side in ("LEFT", "FULL"))
            if side in ("RIGHT", "FULL"):
                for earlier in items:
                    earlier.nullable = True
            items.append(item)
        return items

    def proven_not_null(self, select: exp.Select) -> set[tuple[str, str] | str]:
        key = ("proven", id(select))
        if key not in self._memo:
            proven = _null_rejected(select.args.get("where"))
            for join in select.args.get("joins") or []:
                if not join.side:  # columns only: a later outer join may still null an expression of them
                    proven |= {found for found in _null_rejected(join.args.get("on")) if isinstance(found, tuple)}
            self._memo[key] = proven
        return self._memo[key]

    def null_extensions(self, select: exp.Select) -> list[frozenset[str]] | None:
        """The sets of relations an outer join can fill with NULLs together in one row (None: too many to list).
        A FULL JOIN fills one side or the other, never both: COALESCE over its sides is NOT NULL when each is."""
        source = select.args.get("from_")
        if source is None:
            return [frozenset()]
        before = [source.this.alias_or_name]
        extensions = {frozenset()}
        for join in select.args.get("joins") or []:
            alias, side = join.this.alias_or_name, (join.side or "").upper()
            unmatched_right = {frozenset(before)} if side in ("RIGHT", "FULL") else set()
            unmatched_left = {e | {alias} for e in extensions} if side in ("LEFT", "FULL") else set()
            extensions |= unmatched_right | unmatched_left
            before.append(alias)
            if len(extensions) > 256:
                return None
        return sorted(extensions, key=sorted)

    def output_nullability(self, name: str, scope: Scope | None = None) -> str:
        scope = scope or self.root
        key = ("null", id(scope), name)
        if key not in self._memo:
            self._memo[key] = UNKNOWN
            states = [self.nullability(inner, p) for inner, p in self.projections(scope, name)]
            self._memo[key] = _combine(*states) if states else UNKNOWN
        return self._memo[key]

    def column_nullability(self, scope: Scope, column: exp.Column, nulled: frozenset[str] | None = None) -> str:
        """`nulled`: in rows where exactly these relations of the scope's FROM are filled with NULLs by outer joins."""
        found = self.source_of(scope, column)
        if found is None:
            return UNKNOWN
        owner, source = found
        select = owner.expression
        if isinstance(select, exp.Select):
            if (column.table, column.name) in self.proven_not_null(select):
                return NOT_NULL
            if nulled is not None and owner is scope:
                if column.table in nulled:
                    return NULLABLE
            elif any(item.nullable and item.alias == column.table for item in self.joins(select)):
                return NULLABLE
        if isinstance(source, exp.Table):
            relation = self.relation_of(source)
            if relation is None:
                function = source.this
                return NOT_NULL if isinstance(function, (exp.GenerateSeries, exp.ExplodingGenerateSeries)) else UNKNOWN
            if column.name in relation.not_null:
                return NOT_NULL
            analysis = self.catalog.analysis(relation)
            if analysis is not None:
                return analysis.output_nullability(column.name)
            return NULLABLE if relation.kind in ("r", "p") else UNKNOWN
        return self.output_nullability(column.name, source)

    def nullability(self, scope: Scope, node: exp.Expression, nulled: frozenset[str] | None = None) -> str:
        node = _strip_parens(node)
        if isinstance(node, exp.Alias):
            return self.nullability(scope, node.this, nulled)
        if isinstance(node, exp.Column):
            return self.column_nullability(scope, node, nulled)
        select = scope.expression
        if isinstance(select, exp.Select):
            proven = self.proven_not_null(select)
            if any(isinstance(found, str) for found in proven) and display(node) in proven:
                return NOT_NULL
        if isinstance(node, exp.Null):
            return NULLABLE
        if isinstance(node, (exp.Literal, exp.Boolean, exp.CurrentDate, exp.Localtimestamp, exp.Localtime, *_NOW)):
            return NOT_NULL
        if isinstance(node, exp.Count):
            return NOT_NULL
        if isinstance(node, exp.AggFunc):
            grouped = isinstance(scope.expression, exp.Select) and scope.expression.args.get("group")
            if grouped and not isinstance(node.parent, exp.Filter) and not isinstance(node, (exp.ArrayAgg, exp.GroupConcat)):
                return _combine(*(self.nullability(scope, arg, nulled) for arg in node.iter_expressions()))
            return NULLABLE
        if isinstance(node, exp.Coalesce):
            arguments = [node.this, *node.expressions]
            states = [self.nullability(scope, arg, nulled) for arg in arguments]
            if NOT_NULL in states:
                return NOT_NULL
            extensions = self.null_extensions(select) if nulled is None and isinstance(select, exp.Select) else None
            if extensions and len(extensions) > 1 and all(
                any(self.nullability(scope, arg, extension) == NOT_NULL for arg in arguments) for extension in extensions
            ):  # COALESCE(a.k, b.k) over a FULL JOIN: whichever side is filled with NULLs, another argument is not
                return NOT_NULL
            return _combine(*states)
        if isinstance(node, (exp.Nullif, exp.Subquery, exp.Window, exp.Anonymous, exp.Bracket)):
            return NULLABLE if isinstance(node, (exp.Nullif, exp.Subquery)) else UNKNOWN
        if isinstance(node, exp.Case):
            if node.args.get("default") is None:
                return NULLABLE
            return _combine(*(self.nullability(scope, branch.args["true"], nulled) for branch in node.args["ifs"]),
                            self.nullability(scope, node.args["default"], nulled))
        if isinstance(node, exp.Exists):
            return NOT_NULL
        if isinstance(node, (exp.Func, exp.Binary, exp.Cast, exp.AtTimeZone, exp.Unary, exp.Predicate)):
            # built-in operators and functions return NULL only for a NULL input
            children = [child for child in node.iter_expressions() if not isinstance(child, exp.DataType)]
            return _combine(*(self.nullability(scope, child, nulled) for child in children)) if children else NOT_NULL
        return UNKNOWN

    # --- uniqueness

    def unique_keys(self, scope: Scope) -> list[UniqueKey]:
        """Sets of output columns no two rows of a CTE, subquery or view share."""
        scope = self.query_scope(scope)
        key = ("keys", id(scope))
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = []
        query = scope.expression
        outputs = [p.alias_or_name for p in query.selects] if isinstance(query, exp.Query) else []
        keys: list[UniqueKey] = []
        if isinstance(query, exp.Union) and query.args.get("distinct"):
            keys.append(UniqueKey(frozenset(outputs), True))
        elif isinstance(query, exp.Select):
            if query.args.get("distinct") and not query.args["distinct"].args.get("on"):
                keys.append(UniqueKey(frozenset(outputs), True))
            group = query.args.get("group")
            if group is not None:
                by_sql = {_strip_parens(p.unalias()).sql(): p.alias_or_name for p in query.selects}
                names = [by_sql.get(_strip_parens(g).sql()) for g in group.expressions]
                if None not in names and not group.args.get("rollup") and not group.args.get("cube"):
                    keys.append(UniqueKey(frozenset(names), True))
            elif any(_own_aggregates(query)):
                keys.append(UniqueKey(frozenset(), True))  # one row
            else:
                keys.extend(self._keys_through_projection(scope, query))
        self._memo[key] = keys
        return keys

    def _keys_through_projection(self, scope: Scope, query: exp.Select) -> list[UniqueKey]:
        """A query without grouping keeps the keys of its first relation if every join is a lookup."""
        items = self.joins(query)
        if not items or any(self.fanout_reason(scope, item) for item in items[1:]):
            return []
        base = scope.sources.get(items[0].alias)
        renamed = {}
        for projection in query.selects:
            column = self.through_casts(scope, projection.unalias())
            if isinstance(column, exp.Column) and column.table == items[0].alias:
                renamed.setdefault(column.name, projection.alias_or_name)
        keys = []
        for key in self.source_keys(base):
            if key.columns <= set(renamed):
                keys.append(UniqueKey(frozenset(renamed[c] for c in key.columns), key.nulls_equal))
        return keys

    def source_keys(self, source) -> list[UniqueKey]:
        if isinstance(source, exp.Table):
            relation = self.relation_of(source)
            if relation is None:
                return []
            keys = list(relation.unique_keys)
            analysis = self.catalog.analysis(relation)
            if analysis is not None:
                keys.extend(analysis.unique_keys(analysis.root))
            return keys
        if isinstance(source, Scope):
            return self.unique_keys(source)
        return []

    def fanout_reason(self, scope: Scope, item: _Join) -> str | None:
        """Why joining this relation can repeat the rows before it; None when it is unique on its join columns."""
        join = item.node
        source = scope.sources.get(item.alias)
        on = join.args.get("on") if join is not None else None
        equated: dict[str, bool] = {}  # join column of this relation -> compared with IS NOT DISTINCT FROM
        lossy: list[str] = []  # casts of its columns that can make distinct values equal (::varchar(1), ::date)
        for part in _conjuncts(on):
            found = _equality(part)
            if found is None:
                continue
            left, right, nulls_equal = found
            left, right = self.through_casts(scope, left), self.through_casts(scope, right)
            for mine, other in ((left, right), (right, left)):
                if isinstance(mine, exp.Column) and mine.table == item.alias and item.alias not in {
                    c.table for c in other.find_all(exp.Column)
                }:
                    equated[mine.name] = equated.get(mine.name, False) or nulls_equal
                elif isinstance(mine, exp.Cast) and {c.table for c in mine.find_all(exp.Column)} == {item.alias}:
                    lossy.append(display(mine))
        keys = self.source_keys(source)
        if isinstance(source, Scope) and source.scope_type == ScopeType.UDTF:
            keys = self.unique_keys(source)
        for key in keys:
            if not key.columns <= set(equated):
                continue
            null_safe = [c for c in key.columns if equated[c]]
            if key.nulls_equal or not null_safe or all(
                self.output_nullability_of_source(source, c) == NOT_NULL for c in null_safe
            ):
                return None
        name = self.source_label(source, item.alias)
        if not equated and lossy:
            return (f"{name} is joined on {', '.join(lossy)}, a cast that can make distinct values equal, so several "
                    "of its rows can match each row before it")
        if not equated:
            return f"{name} is joined without an equality on its key, so each of its rows repeats the rows before it"
        columns = ", ".join(sorted(equated))
        known = "; ".join(f"({', '.join(sorted(key.columns))})" for key in keys if key.columns)
        unique_on = f"it is unique only on {known}" if known else "no primary key, unique index, GROUP BY or DISTINCT makes it unique"
        return f"{name} is not unique on ({columns}): {unique_on}"

    def output_nullability_of_source(self, source, name: str) -> str:
        if isinstance(source, Scope):
            return self.output_nullability(name, source)
        relation = self.relation_of(source) if isinstance(source, exp.Table) else None
        if relation is not None and name in relation.not_null:
            return NOT_NULL
        analysis = self.catalog.analysis(relation) if relation is not None else None
        return analysis.output_nullability(name) if analysis is not None else UNKNOWN

    def source_label(self, source, alias: str) -> str:
        if isinstance(source, exp.Table):
            relation = self.relation_of(source)
            label = relation.label if relation is not None else display(source.this)
        else:
            node = source.expression.parent if isinstance(source, Scope) else None
            label = node.alias if isinstance(node, exp.CTE) else "the subquery"
        return label if label == alias else f"{label} AS {alias}"


# --- the four checks


def timezone_findings(analysis: QueryAnalysis) -> tuple[list[Finding], list[str]]:
    findings: list[Finding] = []
    undecided: list[str] = []

    def operand(scope: Scope, node: exp.Expression, argument: exp.Expression, problem: str, fix: str) -> None:
        kind = analysis.type_of(scope, argument)
        if kind == "timestamptz":
            findings.append(Finding(display(node), problem, fix))
        elif kind is None:
            undecided.append(f"{display(node)}: the type of {display(argument)} is unknown")

    for scope in analysis.root.traverse():
        for node in scope.expression.walk():
            if _owner(node, scope) is not scope:
                continue
            arg = _strip_parens(node.this) if isinstance(node, (exp.Date, exp.Cast, exp.TimestampTrunc, exp.TimeToStr)) else None
            if isinstance(node, exp.Date) and not node.expressions:
                operand(scope, node, arg, "date() of a timestamptz is the date in the session's time zone",
                        f"({display(arg)} AT TIME ZONE 'UTC')::date")
            elif isinstance(node, exp.Cast):
                target = _CAST_TYPES.get(node.to.this)
                if target in ("date", "time", "timestamp", "text") and not isinstance(arg, exp.Literal):
                    if isinstance(arg, exp.TimestampTrunc) and _date_trunc_of_date(analysis, scope, arg):
                        continue
                    kind = analysis.type_of(scope, arg)
                    if kind == "timestamptz":
                        findings.append(Finding(display(node), f"a timestamptz cast to {target} is read in the session's time zone",
                                                f"({display(arg)} AT TIME ZONE 'UTC')::{target}"))
                    elif kind is None and target != "text":
                        undecided.append(f"{display(node)}: the type of {display(arg)} is unknown")
                elif target == "timestamptz" and not isinstance(arg, exp.Literal):
                    kind = analysis.type_of(scope, arg)
                    if kind == "timestamp" or (kind == "date" and not _truncated_back_to_date(node)):
                        findings.append(Finding(display(node), f"a {kind} cast to timestamptz is taken in the session's time zone",
                                                f"{display(arg)}::timestamp AT TIME ZONE 'UTC'"))
                    elif kind is None:
                        undecided.append(f"{display(node)}: the type of {display(arg)} is unknown")
            elif isinstance(node, exp.TimestampTrunc) and node.args.get("zone") is None and not _date_trunc_of_date(analysis, scope, node):
                unit = display(node.args["unit"])
                operand(scope, node, arg, "date_trunc of a timestamptz truncates in the session's time zone",
                        f"date_trunc({unit}, {display(arg)}, 'UTC'), or date_trunc({unit}, {display(arg)} AT TIME ZONE 'UTC')")
            elif isinstance(node, exp.TimeToStr):
                operand(scope, node, arg, "to_char of a timestamptz formats it in the session's time zone",
                        f"to_char({display(arg)} AT TIME ZONE 'UTC', ...)")
            elif isinstance(node, exp.Extract) and node.this.name.lower() != "epoch":
                argument = _strip_parens(node.expression)
                operand(scope, node, argument, "extract/date_part of a timestamptz reads its field in the session's time zone",
                        f"extract({node.this.name.lower()} FROM {display(argument)} AT TIME ZONE 'UTC')")
            elif type(node) in _SESSION_CLOCK:
                findings.append(Finding(display(node), f"{display(node)} follows the session's time zone", _SESSION_CLOCK[type(node)]))
            elif isinstance(node, (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
                sides = {analysis.type_of(scope, side): side for side in (node.this, node.expression)}
                local = next((_strip_parens(sides[kind]) for kind in ("date", "timestamp") if kind in sides), None)
                if "timestamptz" in sides and local is not None:
                    findings.append(Finding(display(node), f"comparing a timestamptz with {display(local)} converts the "
                                            "latter in the session's time zone",
                                            f"({display(local)})::timestamp AT TIME ZONE 'UTC'"))
            elif isinstance(node, (exp.Add, exp.Sub)):
                left, right = _strip_parens(node.this), _strip_parens(node.expression)
                interval = right if isinstance(right, (exp.Cast, exp.Interval)) else None
                if interval is not None and analysis.type_of(scope, left) == "timestamptz" and _CALENDAR_INTERVAL.search(interval.sql()):
                    findings.append(Finding(display(node), "days, months or years added to a timestamptz follow the "
                                            "session time zone's daylight saving changes",
                                            f"(({display(left)} AT TIME ZONE 'UTC') {'+' if isinstance(node, exp.Add) else '-'} "
                                            f"{display(right)}) AT TIME ZONE 'UTC'"))
    return _unique(findings), sorted(set(undecided))


def _date_trunc_of_date(analysis: QueryAnalysis, scope: Scope, trunc: exp.TimestampTrunc) -> bool:
    """date_trunc('week', <date>::timestamptz)::date: a whole date in, a whole date out (see below)."""
    inner = _strip_parens(trunc.this)
    return (
        isinstance(inner, exp.Cast)
        and inner.to.this == exp.DataType.Type.TIMESTAMPTZ
        and analysis.type_of(scope, inner.this) == "date"
        and _truncated_back_to_date(inner)
    )


def _truncated_back_to_date(cast: exp.Cast) -> bool:
    """date_trunc('week', <date>::timestamptz)::date: midnight of any day exists in the zone the day is
    read back in, so the date that comes out does not depend on the session time zone."""
    trunc = cast.parent
    while isinstance(trunc, exp.Paren):
        trunc = trunc.parent
    if not isinstance(trunc, exp.TimestampTrunc) or trunc.args.get("zone") is not None:
        return False
    back = trunc.parent
    while isinstance(back, exp.Paren):
        back = back.parent
    return isinstance(back, exp.Cast) and back.to.this == exp.DataType.Type.DATE


def _owner(node: exp.Expression, scope: Scope) -> Scope | None:
    """Each expression is checked once, in the scope whose query holds it directly."""
    query = node.find_ancestor(exp.Query) if not isinstance(node, exp.Query) else node
    return scope if query is scope.expression else None


def _unique(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))


def fanout_findings(analysis: QueryAnalysis) -> list[Finding]:
    findings = []
    for scope in analysis.root.traverse():
        select = scope.expression
        if not _is_aggregate_query(select):
            continue
        items = analysis.joins(select)
        if len(items) < 2:
            continue
        # anchor: the relation whose rows each relation's rows follow; a fan-out join starts a new one
        anchor_parent: dict[int, int | None] = {0: None}
        anchor_of = {items[0].alias: 0}
        fanouts: dict[int, tuple[_Join, str]] = {}
        for index, item in enumerate(items[1:], start=1):
            on = item.node.args.get("on")
            referenced = [c.table for c in on.find_all(exp.Column) if c.table in anchor_of] if on is not None else []
            parent = anchor_of[referenced[-1]] if referenced else 0
            reason = analysis.fanout_reason(scope, item)
            if reason is None:
                anchor_of[item.alias] = parent
            else:
                anchor_parent[index] = parent
                anchor_of[item.alias] = index
                fanouts[index] = (item, reason)

        def ancestors(anchor: int) -> set[int]:
            found = set()
            while anchor is not None:
                found.add(anchor)
                anchor = anchor_parent[anchor]
            return found

        for agg in _own_aggregates(select):
            if isinstance(agg, _DUPLICATE_INSENSITIVE) or agg.find(exp.Distinct) is not None:
                continue
            if isinstance(agg, exp.Count) and isinstance(agg.this, exp.Star):
                continue
            relations = {c.table for c in agg.find_all(exp.Column) if c.table in anchor_of}
            joins = {
                index: fanouts[index]
                for relation in relations
                for index in fanouts
                if index not in ancestors(anchor_of[relation])
            }
            if not joins:
                continue
            described = "; ".join(
                f"the join to {analysis.source_label(scope.sources.get(item.alias), item.alias)} "
                f"ON {display(item.node.args['on']) if item.node.args.get('on') is not None else 'true'} ({reason})"
                for item, reason in (joins[i] for i in sorted(joins))
            )
            readers = ", ".join(analysis.source_label(scope.sources.get(r), r) for r in sorted(relations))
            sides = ", ".join(analysis.source_label(scope.sources.get(joins[i][0].alias), joins[i][0].alias) for i in sorted(joins))
            findings.append(
                Finding(
                    display(agg),
                    f"{display(agg)} adds up rows of {readers} that {described} repeats before grouping",
                    f"compute {display(agg)} in its own CTE, grouped by the key it is joined on, then join that CTE "
                    f"(or reduce {sides} to one row per join key before joining)",
                )
            )
    return _unique(findings)


def key_nullability(analysis: QueryAnalysis, key_columns: list[str]) -> dict[str, str]:
    return {column: analysis.output_nullability(column) for column in key_columns}


class _Determined:
    """What fixing the values of some expressions of one SELECT fixes too (functional dependencies, as PostgreSQL's
    GROUP BY accepts for a primary key): their columns, every column of a relation unique on fixed columns, and the
    other side of an equality every row satisfies (WHERE, inner ON; a LEFT JOIN's ON toward its joined side)."""

    def __init__(self, analysis: QueryAnalysis, scope: Scope, given: list[exp.Expression]):
        self.analysis, self.scope = analysis, scope
        self.expressions: set[str] = set()
        self.columns: set[tuple[str, str]] = set()
        self.relations: set[str] = set()
        for node in given:
            self._fix(node)
        self._close()

    def _fix(self, node: exp.Expression) -> None:
        node = self.analysis.through_casts(self.scope, node)
        self.expressions.add(display(node))  # compared without the parentheses pg_get_viewdef adds
        if isinstance(node, exp.Column):
            self.columns.add((node.table, node.name))

    def fixed(self, node: exp.Expression) -> bool:
        node = _strip_parens(node)
        if {display(node), display(self.analysis.through_casts(self.scope, node))} & self.expressions:
            return True
        if isinstance(node, exp.Column):
            return (node.table, node.name) in self.columns or node.table in self.relations
        if isinstance(node, (exp.Query, exp.Subquery, exp.AggFunc, exp.Window, exp.Rand)):
            return False
        # a literal, or an operator or function of fixed values
        return all(self.fixed(child) for child in node.iter_expressions() if not isinstance(child, exp.DataType))

    def _equalities(self) -> list[tuple[exp.Expression, exp.Expression]]:
        """(one, other): pairs where the value of `one` fixes that of `other` in every row of the SELECT."""
        select = self.scope.expression
        where = select.args.get("where")
        pairs = []
        conditions = [(where.this if where is not None else None, None, "")]
        conditions += [(j.args.get("on"), j.this.alias_or_name, (j.side or "").upper()) for j in select.args.get("joins") or []]
        for condition, alias, side in conditions:
            for part in _conjuncts(condition):
                found = _equality(part)
                if found is None or side in ("FULL", "RIGHT"):
                    continue
                left, right, _ = found
                for one, other in ((left, right), (right, left)):
                    # a LEFT JOIN's unmatched rows keep the preserved side's values: only its joined side follows
                    if side == "LEFT" and {c.table for c in other.find_all(exp.Column)} != {alias}:
                        continue
                    pairs.append((one, other))
        return pairs

    def _close(self) -> None:
        equalities = self._equalities()
        changed = True
        while changed:
            changed = False
            for item in self.analysis.joins(self.scope.expression):
                if item.alias in self.relations:
                    continue
                source = self.scope.sources.get(item.alias)
                keys = self.analysis.source_keys(source)
                if isinstance(source, Scope) and source.scope_type == ScopeType.UDTF:
                    keys = self.analysis.unique_keys(source)
                if any(key.nulls_equal and all((item.alias, c) in self.columns for c in key.columns) for key in keys):
                    self.relations.add(item.alias)
                    changed = True
            for one, other in equalities:
                if self.fixed(one) and not self.fixed(other):
                    self._fix(other)
                    changed = True


def grouping_findings(analysis: QueryAnalysis, key_columns: list[str]) -> tuple[list[Finding], list[str], list[str], list[str]]:
    """The view's GROUP BY (or DISTINCT) expressions that its unique index neither holds nor determines.

    Returns (findings, undecided, the grouping's names, the columns of an index that would cover it); a view
    without GROUP BY or DISTINCT at the top of its query has no grouping to compare."""
    scope = analysis.query_scope(analysis.root)
    select = scope.expression
    if not key_columns or not isinstance(select, exp.Select):
        return [], [], [], []
    group, distinct = select.args.get("group"), select.args.get("distinct")
    projected = [p.unalias() for p in select.selects]
    if group is not None:
        if any(isinstance(g, (exp.Rollup, exp.Cube, exp.GroupingSets)) for g in group.expressions) or any(
            group.args.get(kind) for kind in ("rollup", "cube", "grouping_sets")
        ):
            return [], ["ROLLUP, CUBE and GROUPING SETS are not compared with the unique index"], [], []
        clause = "GROUP BY"
        grouping = [
            projected[int(g.name) - 1] if isinstance(g, exp.Literal) and g.is_int and 0 < int(g.name) <= len(projected) else g
            for g in group.expressions
        ]
    elif distinct is not None:
        on = distinct.args.get("on")
        clause = "DISTINCT ON" if on is not None else "DISTINCT"
        grouping = list(on.expressions) if on is not None else projected
    else:
        return [], [], [], []
    names = {}
    for projection in select.selects:
        names.setdefault(display(projection.unalias()), projection.alias_or_name)
    key_expressions = []
    for column in key_columns:
        found = [p.unalias() for p in select.selects if p.alias_or_name == column]
        if len(found) != 1:
            return [], [f"the unique index's column {column} is not one column of the view's SELECT"], [], []
        key_expressions.append(found[0])
    determined = _Determined(analysis, scope, key_expressions)
    key = ", ".join(key_columns)
    findings, index = [], list(key_columns)
    for expression in grouping:
        if determined.fixed(expression):
            continue
        name = names.get(display(expression))
        nullable = analysis.nullability(scope, expression) != NOT_NULL
        shown = display(expression)
        problem = (
            f"the view's {clause} holds {shown}, which the unique index ({key}) neither holds nor determines: two "
            f"groups that differ only in it ({'a NULL and a value, or ' if nullable else ''}two values) share an "
            "index key, and the refresh fails on them"
        )
        if name is None:
            fix = f"select {shown} as a column and add it to the unique index, or leave it out of the {clause}"
            index = []
        else:
            coalesce = f", selected as coalesce({shown}, <a value no row has>) AS {name}, as it can be NULL" if nullable else ""
            fix = f"add {name} to the unique index{coalesce}; or leave {shown} out of the {clause}"
            if index:
                index.append(name)
        findings.append(Finding(shown, problem, fix))
    grouping_names = [names.get(display(g), display(g)) for g in grouping]
    return _unique(findings), [], grouping_names, index if findings else []


def analyse_view(conn: psycopg.Connection, definition: str, key_columns: list[str]) -> ViewFacts:
    """What the four checks need of a view's definition; a check the analysis cannot serve gets its error."""
    catalog = Catalog(conn)
    try:
        analysis = QueryAnalysis(definition, catalog)
    except Exception as error:  # sqlglot cannot read the definition
        reason = f"the checks could not read the definition ({_error_line(error)})"
        return ViewFacts(timezone_error=reason, fanout_error=reason, grouping_error=reason)
    facts = {}
    try:
        findings, undecided = timezone_findings(analysis)
        facts.update(timezone_findings=tuple(findings), timezone_undecided=tuple(undecided))
    except Exception as error:  # SQL the analysis does not handle: the outcome says so instead of failing the step
        facts["timezone_error"] = f"the check does not handle this SQL ({_error_line(error)})"
    try:
        facts["fanout_findings"] = tuple(fanout_findings(analysis))
    except Exception as error:
        facts["fanout_error"] = f"the check does not handle this SQL ({_error_line(error)})"
    try:
        findings, undecided, grouping, index = grouping_findings(analysis, key_columns)
        facts.update(grouping_findings=tuple(findings), grouping_undecided=tuple(undecided), grouping=tuple(grouping),
                     grouping_index=tuple(index))
    except Exception as error:
        facts["grouping_error"] = f"the check does not handle this SQL ({_error_line(error)})"
    try:
        facts["key_nullability"] = key_nullability(analysis, key_columns)
    except Exception:  # nullability not inferable: the NULL-key count alone decides, and the outcome says so
        facts["key_nullability"] = dict.fromkeys(key_columns, UNKNOWN)
    return ViewFacts(**facts)


def _error_line(error: Exception) -> str:
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()[:1]
    return f"{type(error).__name__}: {' '.join(first_line)}"
