"""Which zone's date a view's SQL reads the clock by, from its text (sqlglot): the part of the source
fingerprint (source_fingerprint.py) that needs a parser, imported only when a view's query tree reads the
clock, so a refresh of a view that does not, and a process loading definitions, never import sqlglot.
"""

import functools
from collections.abc import Iterator

from sqlglot import exp, parse_one
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from analytics_views.postgres.source_fingerprint import CLOCK_NAMES, DAY_UNITS, SESSION_ZONE, TRANSACTION_CLOCK


def _is_clock(node: exp.Expression) -> bool:
    if isinstance(node, (exp.CurrentDate, exp.CurrentTime, exp.Localtime, exp.CurrentTimestamp, exp.Localtimestamp)):
        return True
    name = node.name.lower() if isinstance(node, exp.Anonymous) else ""
    return name in TRANSACTION_CLOCK or name in {"clock_timestamp", "timeofday"} or (
        name in {"age", "mxid_age"} and len(node.expressions) == 1  # from today's midnight, or the next xid
    )


def _reading_zone(clock: exp.Expression) -> str | None:
    """The zone whose date this clock reading is reduced to (SESSION_ZONE for the session's), None when
    the reading is not reduced to a date or coarser within the expression parsed."""
    if isinstance(clock, exp.CurrentDate):
        return SESSION_ZONE
    if isinstance(clock, (exp.CurrentTimestamp, exp.Localtimestamp)) or (
        isinstance(clock, exp.Anonymous) and clock.name.lower() in TRANSACTION_CLOCK
    ):
        return _day_zone(clock)
    return None


def _fragments(definition: str, tokens: list, clock: int) -> Iterator[str]:
    """The expressions around the clock token at index `clock`, innermost first: the token (with its own
    argument list), then up to three enclosing parentheses, each with the function name before it and a
    `::date` after it."""
    closing, stack = {}, []
    for index, token in enumerate(tokens):
        if token.token_type == TokenType.L_PAREN:
            stack.append(index)
        elif token.token_type == TokenType.R_PAREN and stack:
            closing[stack.pop()] = index
    enclosing = [i for i in closing if i < clock < closing[i]]
    enclosing.sort(reverse=True)
    own = clock + 1 if clock + 1 < len(tokens) and tokens[clock + 1].token_type == TokenType.L_PAREN else None
    groups = [(clock, closing.get(own, clock) if own else clock)] + [(i, closing[i]) for i in enclosing[:3]]
    for first, last in groups:
        starts = [first - 1, first] if first > 0 and tokens[first].token_type == TokenType.L_PAREN else [first]
        ends = [last]
        if last + 2 < len(tokens) and tokens[last + 1].token_type == TokenType.DCOLON and tokens[last + 2].text.lower() == "date":
            ends.insert(0, last + 2)
        for start in starts:
            for end in ends:
                yield definition[tokens[start].start : tokens[end].end + 1]


@functools.lru_cache(maxsize=256)  # a definition rarely changes; parsing it costs milliseconds
def clock_zones(definition: str) -> tuple[frozenset[str], str]:
    """The zones whose current date the query's result follows, or why its result follows the clock more
    finely than that (then the zones are meaningless). SESSION_ZONE stands for the session's TimeZone.

    Each word that may read the clock is judged within the smallest expression around it that reduces it
    to a date (pg_get_viewdef's text does not always parse whole: a parenthesized join of unnest() does not).
    """
    if not any(name in definition.lower() for name in CLOCK_NAMES):
        return frozenset(), ""
    try:
        tokens = Postgres().tokenize(definition)
    except SqlglotError:
        return frozenset(), "its SQL mentions the clock and could not be read to tell how"
    zones: set[str] = set()
    for index, token in enumerate(tokens):
        if token.text.lower() not in CLOCK_NAMES or token.token_type in (TokenType.STRING, TokenType.IDENTIFIER):
            continue
        verdict, readings = "", []
        for fragment in _fragments(definition, tokens, index):
            try:
                tree = parse_one(f"SELECT {fragment}", dialect="postgres")
            except SqlglotError:
                continue
            readings = [node for node in tree.walk() if _is_clock(node)]
            if not readings:
                break  # a column or alias named like a clock function
            found = [_reading_zone(node) for node in readings]
            if None not in found:
                zones.update(found)
                break
            verdict = _instant_reason(_outermost(readings[found.index(None)]))
        else:
            return frozenset(), verdict or f"its SQL reads the clock ({token.text}) in a way we could not read"
    return frozenset(zones), ""


def _instant_reason(node: exp.Expression) -> str:
    return f"its result follows the clock ({node.sql(dialect='postgres')}), finer than a day"


def _up(node: exp.Expression) -> exp.Expression | None:
    parent = node.parent
    while isinstance(parent, exp.Paren):
        parent = parent.parent
    return parent


def _literal(node: exp.Expression) -> str | None:
    while isinstance(node, (exp.Cast, exp.Paren)):
        node = node.this
    return node.this if isinstance(node, exp.Literal) and node.is_string else None


def _day_zone(clock: exp.Expression) -> str | None:
    """The zone in which this clock reading is reduced to a date (or coarser), None when it is not."""
    zone, node = SESSION_ZONE, clock
    parent = _up(node)
    if not isinstance(clock, exp.Localtimestamp) and isinstance(parent, exp.AtTimeZone) and parent.this.unnest() is node:
        zone = _literal(parent.args["zone"])
        if zone is None:
            return None
        node, parent = parent, _up(parent)
    if isinstance(parent, exp.Cast) and parent.to.is_type(exp.DataType.Type.DATE):
        return zone
    if isinstance(parent, exp.Date) and len(parent.expressions) == 0:
        return zone
    if isinstance(parent, (exp.TimestampTrunc, exp.DateTrunc)) and parent.this.unnest() is node:
        unit = parent.args.get("unit")
        if unit is None or unit.name.upper() not in DAY_UNITS:
            return None
        if parent.args.get("zone") is not None:
            if zone != SESSION_ZONE or node is not clock:
                return None
            zone = _literal(parent.args["zone"])
        return zone
    return None


def _outermost(clock: exp.Expression) -> exp.Expression:
    """The clock reading with the arithmetic around it, for the message."""
    node = clock
    while isinstance(node.parent, (exp.Paren, exp.Sub, exp.Add, exp.AtTimeZone, exp.Cast)):
        node = node.parent
    return node.unnest() if isinstance(node, exp.Paren) else node
