"""Column-level lineage of a SELECT: which source-table columns each output column is computed from.

sqlglot parses the query (PostgreSQL dialect), qualifies its columns against the source tables' schema and
splits it into scopes (CTEs, derived tables, subqueries); we follow each output column through them to the
table columns its value is computed from. Rules where "computed from" needs one:
- columns that only filter or join rows (WHERE, ON) are not lineage: they decide which rows, not values;
- a column computed inside a subquery (EXISTS (...), a scalar subquery) has that subquery's columns;
- a column of a LATERAL subquery is traced through that subquery like a derived table's;
- `count(*)` has no column of its own: it counts the rows of each group, so its lineage is the group's
  key columns (GROUP BY), and those of the grouped relation it counts when that is grouped too;
- table functions (generate_series) and now() are not tables: a column computed only from them, like
  a report's calendar day, maps to no source column.
"""

from sqlglot import exp, parse_one
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, ScopeType, build_scope

SourceColumn = tuple[str, str]  # (table, column)


def _within(node: exp.Expression, ancestor: exp.Expression) -> bool:
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


class _Resolver:
    def __init__(self, root: Scope):
        self.root = root
        self.memo: dict[tuple[int, str], frozenset[SourceColumn]] = {}

    def column(self, scope: Scope, column: exp.Column) -> frozenset[SourceColumn]:
        while scope is not None and column.table not in scope.sources:
            scope = scope.parent  # a correlated subquery reads its enclosing query's relations
        if scope is None:
            return frozenset()
        source = scope.sources[column.table]
        if isinstance(source, exp.Table):
            if isinstance(source.this, exp.Identifier):
                return frozenset({(source.name, column.name)})
            return frozenset()  # a table function such as generate_series
        return self.output(source, column.name)

    def output(self, scope: Scope, name: str) -> frozenset[SourceColumn]:
        key = (id(scope), name)
        if key not in self.memo:
            self.memo[key] = frozenset()  # guards a self-reference (recursive CTE)
            if scope.scope_type == ScopeType.UDTF and scope.subquery_scopes:  # LATERAL (SELECT ...): its query
                self.memo[key] = self.output(scope.subquery_scopes[0], name)
            elif scope.set_operation_scopes:  # UNION: each branch contributes
                branches = scope.set_operation_scopes
                self.memo[key] = frozenset().union(*(self.output(branch, name) for branch in branches))
            else:
                projections = [p for p in scope.expression.selects if p.alias_or_name == name]
                self.memo[key] = frozenset().union(*(self.expression(scope, p) for p in projections))
        return self.memo[key]

    def group_keys(self, scope: Scope) -> frozenset[SourceColumn]:
        group = scope.expression.args.get("group")
        if group is None:
            return frozenset()
        return frozenset().union(*(self.expression(scope, key) for key in group.expressions))

    def expression(self, scope: Scope, expression: exp.Expression) -> frozenset[SourceColumn]:
        found: set[SourceColumn] = set()
        for column in scope.columns:
            if _within(column, expression):
                found |= self.column(scope, column)
        for subquery in scope.subquery_scopes:
            if _within(subquery.expression, expression):
                found |= self.subquery(subquery)
        if any(isinstance(count.this, exp.Star) for count in expression.find_all(exp.Count)):
            found |= self.group_keys(scope)
            for source in scope.selected_sources.values():
                if isinstance(source[1], Scope) and not source[1].set_operation_scopes:
                    found |= self.group_keys(source[1])  # a count of groups: the groups' keys
        return frozenset(found)

    def subquery(self, scope: Scope) -> frozenset[SourceColumn]:
        found: set[SourceColumn] = set()
        for column in scope.columns:
            found |= self.column(scope, column)
        for subquery in scope.subquery_scopes:
            found |= self.subquery(subquery)
        return frozenset(found)


def output_columns(query: str) -> tuple[str, ...]:
    """The names of a SELECT's output columns, in order."""
    return tuple(projection.alias_or_name for projection in parse_one(query, read="postgres").selects)


def column_lineage(query: str, schema: dict[str, dict[str, str]]) -> dict[str, tuple[SourceColumn, ...]]:
    """{output column: sorted (table, column) pairs it is computed from}, for every output column."""
    tree = qualify(
        parse_one(query, read="postgres"),
        schema=schema,
        dialect="postgres",
        validate_qualify_columns=False,
        quote_identifiers=False,
        expand_stars=False,
    )
    root = build_scope(tree)
    resolver = _Resolver(root)
    return {name: tuple(sorted(resolver.output(root, name))) for name in output_columns(query)}
