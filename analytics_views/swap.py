"""Build-and-swap: refresh a large view without REFRESH ... CONCURRENTLY's row-by-row diff.

CONCURRENTLY compares the old and new contents row by row; on a view of a million rows that diff costs
several times the query itself. Here the new contents are built beside the view, in a new materialized
view with the same query, columns, indexes, owner, grants, comments and storage options; then, in a
savepoint with a short `lock_timeout` retried until the caller's lock wait runs out, the old view is
dropped and the new one renamed into its place. Readers keep reading the old contents while the new ones
are built (nothing locks the old view until the swap) and wait at most one short `lock_timeout` for it.

It runs inside the caller's transaction (refresh.py's, which holds the view's advisory lock and the
statement timeout): a failure anywhere rolls everything back and the view keeps its old contents.

When the view cannot be replaced faithfully (other objects depend on it, column privileges, security
labels, a non-default tablespace or access method, an index definition we cannot re-target), the
strategy does not apply and the caller falls back to CONCURRENTLY, saying why.
"""

import re
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

SWAP = "swap"
AUTO = "auto"
CONCURRENT = "concurrent"
STRATEGIES = (AUTO, CONCURRENT, SWAP)

# AUTO swaps views with at least this many rows: below it CONCURRENTLY's diff costs about as much as the
# query, and it keeps the relation (and its statistics) in place.
SWAP_MIN_ROWS = 100_000
# Longest a reader may queue behind the swap's lock request before we step back and try again.
SWAP_LOCK_TIMEOUT_S = 0.05
_SUFFIX = "__swap"
_PRIVILEGE = re.compile(r"^[A-Z ]+$")


class SwapNotPossible(Exception):
    """The view cannot be rebuilt faithfully beside itself; the message says why."""


@dataclass(frozen=True)
class _Index:
    name: str
    definition: str
    comment: str | None


@dataclass(frozen=True)
class _ViewShape:
    oid: int
    schema: str
    name: str
    owner: str
    query: str
    columns: list[tuple[str, str | None]]  # name, comment
    comment: str | None
    acl: list[str]  # aclitem texts, sorted
    options: list[str]  # reloptions, "key=value"
    indexes: list[_Index]


def _temp_name(name: str) -> str:
    return name[: 63 - len(_SUFFIX)] + _SUFFIX


def _one(conn: psycopg.Connection, query: str, params: dict) -> tuple:
    return conn.execute(query, params).fetchone()


def blockers(conn: psycopg.Connection, oid: int) -> list[str]:
    """What would stop a faithful rebuild of the view: dependent objects, column grants, labels, ..."""
    found = [
        f"{row[0]} depends on it"
        for row in conn.execute(
            """
            SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
            FROM pg_depend AS d
            JOIN pg_class AS c ON c.oid = %(oid)s
            WHERE d.deptype <> 'i'
              AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid)
                   OR (d.refclassid = 'pg_type'::regclass AND d.refobjid = c.reltype))
              AND NOT (d.classid = 'pg_class'::regclass
                       AND d.objid IN (SELECT indexrelid FROM pg_index WHERE indrelid = c.oid))
              AND NOT (d.classid = 'pg_rewrite'::regclass
                       AND d.objid IN (SELECT oid FROM pg_rewrite WHERE ev_class = c.oid))
            ORDER BY 1
            """,
            {"oid": oid},
        )
    ]
    checks = {
        "column privileges": "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = %(oid)s AND attacl IS NOT NULL)",
        "security labels": "SELECT EXISTS (SELECT FROM pg_seclabel WHERE objoid = %(oid)s)",
        "a non-default tablespace": """
            SELECT EXISTS (SELECT FROM pg_class WHERE oid = %(oid)s AND reltablespace <> 0)
                OR EXISTS (SELECT FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid
                           WHERE i.indrelid = %(oid)s AND ic.reltablespace <> 0)
            """,
        "a non-heap access method": """
            SELECT EXISTS (SELECT FROM pg_class AS c JOIN pg_am AS am ON am.oid = c.relam
                           WHERE c.oid = %(oid)s AND am.amname <> 'heap')
            """,
        "privileges granted by a role other than its owner": """
            SELECT EXISTS (SELECT FROM pg_class AS c, aclexplode(c.relacl) AS a
                           WHERE c.oid = %(oid)s AND a.grantor <> c.relowner)
            """,
        "an owner the refreshing role cannot act as": """
            SELECT NOT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class AS c WHERE c.oid = %(oid)s
            """,
    }
    found += [f"it has {what}" for what, query in checks.items() if _one(conn, query, {"oid": oid})[0]]
    return found


def _shape(conn: psycopg.Connection, view: str) -> _ViewShape:
    oid, schema, name, owner, query, comment, acl, options = _one(
        conn,
        """
        SELECT c.oid, n.nspname, c.relname, c.relowner::regrole::text, pg_get_viewdef(c.oid),
               obj_description(c.oid, 'pg_class'),
               coalesce((SELECT array_agg(a::text ORDER BY a::text) FROM unnest(c.relacl) AS a), '{}'),
               coalesce(c.reloptions, '{}')
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE c.oid = %(view)s::regclass
        """,
        {"view": view},
    )
    columns = conn.execute(
        """
        SELECT attname, col_description(attrelid, attnum) FROM pg_attribute
        WHERE attrelid = %(oid)s AND attnum > 0 AND NOT attisdropped ORDER BY attnum
        """,
        {"oid": oid},
    ).fetchall()
    indexes = [
        _Index(*row)
        for row in conn.execute(
            """
            SELECT ic.relname, pg_get_indexdef(i.indexrelid), obj_description(i.indexrelid, 'pg_class')
            FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid
            WHERE i.indrelid = %(oid)s ORDER BY ic.relname
            """,
            {"oid": oid},
        )
    ]
    return _ViewShape(oid, schema, name, owner, query, columns, comment, list(acl), list(options), indexes)


def _index_statement(conn: psycopg.Connection, shape: _ViewShape, index: _Index) -> sql.Composed:
    """The index's own definition, re-targeted at the new view under a temporary name."""
    quoted_index, quoted_view = _one(
        conn, "SELECT format('%%I', %(i)s::text), format('%%I.%%I', %(s)s::text, %(v)s::text)",
        {"i": index.name, "s": shape.schema, "v": shape.name},
    )
    for unique in ("UNIQUE ", ""):
        prefix = f"CREATE {unique}INDEX {quoted_index} ON {quoted_view} USING "
        if index.definition.startswith(prefix):
            return sql.SQL("CREATE {unique}INDEX {index} ON {view} USING {rest}").format(
                unique=sql.SQL(unique),
                index=sql.Identifier(_temp_name(index.name)),
                view=sql.Identifier(shape.schema, _temp_name(shape.name)),
                rest=sql.SQL(index.definition[len(prefix) :]),  # access method and keys, from the catalog
            )
    raise SwapNotPossible(f"index {index.name} has a definition we cannot re-target ({index.definition})")


def _build(conn: psycopg.Connection, shape: _ViewShape) -> None:
    """The new view beside the old one, populated, with the old one's indexes, options, comments and grants."""
    new = sql.Identifier(shape.schema, _temp_name(shape.name))
    index_statements = [_index_statement(conn, shape, index) for index in shape.indexes]
    options = sql.SQL("")
    if shape.options:
        pairs = [option.split("=", 1) for option in shape.options]
        options = sql.SQL(" WITH ({})").format(
            sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in pairs)
        )
    conn.execute(
        sql.SQL("CREATE MATERIALIZED VIEW {new} ({columns}){options} AS {query} WITH DATA").format(
            new=new,
            columns=sql.SQL(", ").join(sql.Identifier(column) for column, _ in shape.columns),
            options=options,
            query=sql.SQL(shape.query.rstrip().rstrip(";")),  # the view's own query, from pg_get_viewdef
        )
    )
    for statement in index_statements:
        conn.execute(statement)
    conn.execute(sql.SQL("ANALYZE {}").format(new))  # readers' plans get statistics from the first query on
    if shape.comment is not None:
        conn.execute(sql.SQL("COMMENT ON MATERIALIZED VIEW {} IS {}").format(new, sql.Literal(shape.comment)))
    for column, comment in shape.columns:
        if comment is not None:
            conn.execute(
                sql.SQL("COMMENT ON COLUMN {} IS {}").format(
                    sql.Identifier(shape.schema, _temp_name(shape.name), column), sql.Literal(comment)
                )
            )
    for index in shape.indexes:
        if index.comment is not None:
            conn.execute(
                sql.SQL("COMMENT ON INDEX {} IS {}").format(
                    sql.Identifier(shape.schema, _temp_name(index.name)), sql.Literal(index.comment)
                )
            )
    conn.execute(sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {}").format(new, sql.Identifier(shape.owner)))
    if shape.acl:
        # Start from the owner's defaults, then grant what the old view had; the result is checked below.
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(new))
        grants = conn.execute(
            """
            SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE a.grantee::regrole::text END,
                   a.privilege_type, a.is_grantable
            FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = %(oid)s AND a.grantee <> c.relowner
            """,
            {"oid": shape.oid},
        ).fetchall()
        for grantee, privilege, grantable in grants:
            if not _PRIVILEGE.match(privilege):
                raise SwapNotPossible(f"unexpected privilege {privilege!r} in its grants")
            conn.execute(
                sql.SQL("GRANT {privilege} ON {new} TO {grantee}{option}").format(
                    privilege=sql.SQL(privilege),
                    new=new,
                    grantee=sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                    option=sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                )
            )
    acl = _one(
        conn,
        "SELECT coalesce((SELECT array_agg(a::text ORDER BY a::text) FROM unnest(relacl) AS a), '{}')"
        " FROM pg_class WHERE oid = %(new)s::regclass",
        {"new": new.as_string(conn)},
    )[0]
    if list(acl) != shape.acl:
        raise SwapNotPossible(f"its grants could not be reproduced exactly ({shape.acl} became {list(acl)})")


def _swap(conn: psycopg.Connection, shape: _ViewShape, lock_wait_s: float) -> int:
    """Drop the old view and rename the new one into place; returns the number of attempts."""
    deadline = time.monotonic() + lock_wait_s
    previous_timeout = _one(conn, "SELECT current_setting('lock_timeout')", {})[0]
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(SWAP_LOCK_TIMEOUT_S * 1000)}ms"])
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                with conn.transaction():  # a savepoint: a lock timeout undoes only the swap, not the build
                    conn.execute(
                        sql.SQL("DROP MATERIALIZED VIEW {}").format(sql.Identifier(shape.schema, shape.name))
                    )
                    conn.execute(
                        sql.SQL("ALTER MATERIALIZED VIEW {} RENAME TO {}").format(
                            sql.Identifier(shape.schema, _temp_name(shape.name)), sql.Identifier(shape.name)
                        )
                    )
                    for index in shape.indexes:
                        conn.execute(
                            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                                sql.Identifier(shape.schema, _temp_name(index.name)), sql.Identifier(index.name)
                            )
                        )
                return attempt
            except errors.LockNotAvailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.02 * attempt, 0.5))  # let the readers that queued behind us through
    finally:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [previous_timeout])


def rows_at_least(conn: psycopg.Connection, view: str, rows: int) -> bool:
    """Whether the view holds at least `rows` rows, reading no more than that many."""
    query = sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT %s) AS sample").format(sql.Identifier(view))
    return conn.execute(query, [rows]).fetchone()[0] >= rows


def choose(conn: psycopg.Connection, view: str, strategy: str) -> tuple[str, str]:
    """SWAP or CONCURRENT for a populated view, and why (empty when the strategy applies as asked)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"refresh strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == CONCURRENT:
        return CONCURRENT, ""
    if strategy == AUTO and not rows_at_least(conn, view, SWAP_MIN_ROWS):
        return CONCURRENT, ""
    found = blockers(conn, _one(conn, "SELECT %(view)s::regclass::oid", {"view": view})[0])
    if found:
        return CONCURRENT, f"build-and-swap does not apply: {'; '.join(found)}"
    return SWAP, ""


def build_and_swap(conn: psycopg.Connection, view: str, *, lock_wait_s: float) -> str:
    """Rebuild the view beside itself and swap it in; returns a note. Must run inside a transaction."""
    shape = _shape(conn, view)
    _build(conn, shape)
    attempts = _swap(conn, shape, lock_wait_s)
    return "" if attempts == 1 else f"swapped after {attempts} tries for its lock"


def refresh_populated(conn: psycopg.Connection, view: str, strategy: str, *, lock_wait_s: float) -> tuple[str, str]:
    """Refresh a populated view by build-and-swap or CONCURRENTLY; returns the mode used and a note."""
    mode, note = choose(conn, view, strategy)
    if mode == SWAP:
        try:
            with conn.transaction():  # a savepoint: a swap that cannot be faithful leaves nothing behind
                return SWAP, build_and_swap(conn, view, lock_wait_s=lock_wait_s)
        except SwapNotPossible as reason:
            mode, note = CONCURRENT, f"build-and-swap does not apply: {reason}"
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.Identifier(view)))
    return mode, note
