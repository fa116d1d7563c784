"""Build-and-swap: refresh a large view without REFRESH ... CONCURRENTLY's row-by-row diff.

CONCURRENTLY compares the old and new contents row by row; on a view of a million rows that diff costs
several times the query itself. Here a new, empty materialized view with the same query is created beside
the view (`WITH NO DATA`), given the old one's owner, storage, columns' settings and indexes, and filled by a
plain `REFRESH MATERIALIZED VIEW`: PostgreSQL runs the query as the owner (row-level security, privileges
and, from version 17, the restricted `search_path` all as for any REFRESH) and writes the rows frozen, so a
reader whose snapshot is older than the swap sees the new rows, never an empty view. Then comments, grants
and the `CLUSTER ON` mark are copied, the new view's catalog entries are compared with the old one's, and
in a savepoint with a short `lock_timeout`, retried until the caller's lock wait runs out, the old view is
dropped and the new one renamed into its place. Readers keep reading the old contents while the new ones
are built and wait at most one short `lock_timeout` for the swap.

It runs inside the caller's transaction (refresh.py's, which holds the view's advisory lock and set
`statement_timeout`): a failure anywhere rolls everything back and the view keeps its old contents. The
statement timeout in force bounds the whole refresh, not each statement: before each statement the time
left since the transaction began becomes its timeout.

Where the view cannot be replaced faithfully (other objects depend on it, column privileges, security
labels, extension membership, event triggers that would see the swap, a role that may not create beside it
or act as its owner, ...: `blockers`), or the rebuilt view's catalog entries differ from the old one's,
the strategy does not apply and the caller falls back to CONCURRENTLY, saying why.
"""

import re
import time
from dataclasses import dataclass, replace

import psycopg
from psycopg import errors, sql

from analytics_views.postgres.modes import RefreshMode, RefreshStrategy

# RefreshStrategy.AUTO swaps views with at least this many rows: below it CONCURRENTLY's diff costs about as much as the
# query, and it keeps the relation (and its statistics) in place.
SWAP_MIN_ROWS = 100_000
# Longest a reader may queue behind the swap's lock request before we step back and try again.
SWAP_LOCK_TIMEOUT_S = 0.05
_SUFFIX = "__swap"
_PRIVILEGE = re.compile(r"^[A-Z ]+$")
# Names are deparsed and parsed again under this search_path, so every name outside pg_catalog is qualified
# and no temporary object can stand in for one.
_QUALIFYING_SEARCH_PATH = "pg_catalog, pg_temp"
# The commands a swap runs: an enabled event trigger on any of them would see objects CONCURRENTLY never touches.
_SWAP_COMMAND_TAGS = [
    "CREATE MATERIALIZED VIEW", "ALTER MATERIALIZED VIEW", "DROP MATERIALIZED VIEW", "REFRESH MATERIALIZED VIEW",
    "CREATE INDEX", "ALTER INDEX", "ALTER TABLE", "COMMENT", "GRANT", "REVOKE",
]  # fmt: skip
_STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "x": "EXTENDED", "m": "MAIN"}
_COMPRESSION = {"p": "pglz", "l": "lz4"}
# The attribute options PostgreSQL defines for a column; a server may keep its own there too (one seen
# here stamps every new column with `pg_attver=<number>`), which a new column gets by itself.
_COLUMN_OPTIONS = r"^(n_distinct|n_distinct_inherited)="
_REPLICA_IDENTITY = {"d": None, "f": "FULL", "n": "NOTHING"}  # 'i' (USING INDEX) is a blocker


class SwapNotPossible(Exception):
    """The view cannot be rebuilt faithfully beside itself; the message says why."""


@dataclass(frozen=True)
class _Index:
    name: str
    unique: bool
    method_and_keys: str  # pg_get_indexdef after "USING ": access method, keys, options, predicate
    comment: str | None
    tablespace: str  # '' for the database's default
    clustered: bool
    statistics: tuple[tuple[int, int], ...]  # (index column number, statistics target) where set


@dataclass(frozen=True)
class _Column:
    name: str
    type: str
    collation: str | None
    comment: str | None
    statistics: int | None  # statistics target, None for the default
    options: tuple[str, ...]  # attoptions (n_distinct, ...), "key=value"
    storage: str | None  # attstorage where it differs from its type's default
    compression: str  # attcompression, '' for the default


@dataclass(frozen=True)
class _ViewShape:
    oid: int
    schema: str
    name: str
    owner: str
    query: str
    access_method: str
    tablespace: str  # '' for the database's default
    replica_identity: str
    comment: str | None
    acl: tuple[str, ...]  # effective aclitem texts (the owner's defaults when never granted), sorted
    options: tuple[str, ...]  # reloptions, then the TOAST table's as "toast.key=value"
    columns: tuple[_Column, ...]
    indexes: tuple[_Index, ...]


def _temp_name(name: str) -> str:
    return name[: 63 - len(_SUFFIX)] + _SUFFIX


def _one(conn: psycopg.Connection, query, params: dict | list | None = None) -> tuple:
    return conn.execute(query, params).fetchone()


def _oid(conn: psycopg.Connection, relation: str) -> int:
    return _one(conn, "SELECT %s::regclass::oid", [relation])[0]


class _Deadline:
    """The refresh's statement_timeout as a deadline for the whole transaction: each statement gets what is left.

    PostgreSQL bounds each statement by statement_timeout; a swap runs a dozen, so it could run for several
    timeouts. Measured from the transaction's start, which includes the wait for the view's advisory lock.
    """

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        timeout_ms, elapsed_ms, self.original = _one(
            conn,
            "SELECT setting::bigint, extract(epoch FROM clock_timestamp() - transaction_timestamp()) * 1000,"
            " current_setting('statement_timeout') FROM pg_settings WHERE name = 'statement_timeout'",
        )
        self.ends = None if timeout_ms == 0 else time.monotonic() + (timeout_ms - float(elapsed_ms)) / 1000

    def left_s(self) -> float:
        return float("inf") if self.ends is None else self.ends - time.monotonic()

    def apply(self) -> None:
        """Make what is left the timeout of the next statement."""
        if self.ends is not None:
            # At least 1 ms: 0 would mean no timeout; past the deadline the statement is cancelled at once.
            left_ms = max(1, int(self.left_s() * 1000))
            self.conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{left_ms}ms"])

    def execute(self, query, params: dict | list | None = None) -> psycopg.Cursor:
        self.apply()
        return self.conn.execute(query, params)

    def one(self, query, params: dict | list | None = None) -> tuple:
        return self.execute(query, params).fetchone()

    def restore(self) -> None:
        self.conn.execute("SELECT set_config('statement_timeout', %s, true)", [self.original])


_DEPENDANTS = """
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_depend AS d
JOIN pg_class AS c ON c.oid = %(oid)s
JOIN pg_type AS t ON t.oid = c.reltype
WHERE d.deptype <> 'i'
  AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid)
       OR (d.refclassid = 'pg_type'::regclass AND d.refobjid IN (t.oid, t.typarray)))
  AND NOT (d.classid = 'pg_class'::regclass
           AND d.objid IN (SELECT indexrelid FROM pg_index WHERE indrelid = c.oid))
  AND NOT (d.classid = 'pg_rewrite'::regclass
           AND d.objid IN (SELECT oid FROM pg_rewrite WHERE ev_class = c.oid))
ORDER BY 1
"""

# Each names something a rebuild cannot carry over, or a right the refreshing role lacks for one; they all
# read %(oid)s, the view. A rebuild also needs: CREATE on the schema for the refreshing role (superusers
# aside), which also must be able to act as the owner (use its rights, and SET ROLE to it to give it the
# new view, which needs the owner's CREATE on the schema too).
_BLOCKERS = {
    "column privileges": "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = %(oid)s AND attacl IS NOT NULL)",
    "security labels": """
        SELECT EXISTS (SELECT FROM pg_seclabel AS l JOIN pg_class AS c ON c.oid = %(oid)s
                       WHERE (l.classoid = 'pg_class'::regclass
                              AND l.objoid IN (SELECT c.oid UNION ALL
                                               SELECT indexrelid FROM pg_index WHERE indrelid = c.oid))
                          OR (l.classoid = 'pg_type'::regclass AND l.objoid = c.reltype))
        """,
    "privileges granted by a role other than its owner": """
        SELECT EXISTS (SELECT FROM pg_class AS c, aclexplode(c.relacl) AS a
                       WHERE c.oid = %(oid)s AND a.grantor <> c.relowner)
        """,
    "an extension it belongs to or depends on": """
        SELECT EXISTS (SELECT FROM pg_depend
                       WHERE classid = 'pg_class'::regclass AND deptype IN ('e', 'x')
                         AND objid IN (SELECT %(oid)s UNION ALL
                                       SELECT indexrelid FROM pg_index WHERE indrelid = %(oid)s))
        """,
    "an event trigger that would see the swap's commands": """
        SELECT EXISTS (SELECT FROM pg_event_trigger
                       WHERE evtenabled <> 'D' AND (evttags IS NULL OR evttags && %(tags)s::text[]))
        """,
    "an invalid index": """
        SELECT EXISTS (SELECT FROM pg_index WHERE indrelid = %(oid)s AND NOT (indisvalid AND indisready))
        """,
    "a comment on its rewrite rule": """
        SELECT EXISTS (SELECT FROM pg_description AS d JOIN pg_rewrite AS r ON r.oid = d.objoid
                       WHERE d.classoid = 'pg_rewrite'::regclass AND r.ev_class = %(oid)s)
        """,
    "a comment, grants or a security label on its row type": """
        SELECT EXISTS (SELECT FROM pg_class AS c JOIN pg_type AS t ON t.oid = c.reltype
                       WHERE c.oid = %(oid)s
                         AND (t.typacl IS NOT NULL
                              OR EXISTS (SELECT FROM pg_description AS d
                                         WHERE d.classoid = 'pg_type'::regclass AND d.objoid IN (t.oid, t.typarray))))
        """,
    "a replica identity using an index": """
        SELECT EXISTS (SELECT FROM pg_class WHERE oid = %(oid)s AND relreplident = 'i')
        """,
    "a tablespace the refreshing role may not create in": """
        SELECT EXISTS (SELECT FROM pg_class AS c JOIN pg_tablespace AS s ON s.oid = c.reltablespace
                       WHERE (c.oid = %(oid)s OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = %(oid)s))
                         AND NOT has_tablespace_privilege(s.oid, 'CREATE'))
        """,
    "an owner whose rights the refreshing role does not have (it must own the view or be a member of its owner)": """
        SELECT NOT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class AS c WHERE c.oid = %(oid)s
        """,
    "an owner the refreshing role cannot SET ROLE to, to give it the rebuilt view": """
        SELECT c.relowner <> r.oid AND NOT r.rolsuper
               AND NOT pg_has_role(current_user, c.relowner, CASE WHEN current_setting('server_version_num')::int
                                                                  >= 160000 THEN 'SET' ELSE 'MEMBER' END)
        FROM pg_class AS c, pg_roles AS r WHERE c.oid = %(oid)s AND r.rolname = current_user
        """,
    "a schema the refreshing role may not create in (grant it CREATE on the schema, or keep CONCURRENTLY)": """
        SELECT NOT has_schema_privilege(c.relnamespace, 'CREATE') FROM pg_class AS c WHERE c.oid = %(oid)s
        """,
    "a schema its owner may not create in, so the rebuilt view cannot be given to it": """
        SELECT c.relowner <> r.oid AND NOT r.rolsuper AND NOT has_schema_privilege(c.relowner, c.relnamespace, 'CREATE')
        FROM pg_class AS c, pg_roles AS r WHERE c.oid = %(oid)s AND r.rolname = current_user
        """,
    "a name the rebuilt view or one of its indexes would need taken by another object": """
        SELECT EXISTS (SELECT FROM pg_class AS c, pg_class AS other
                       WHERE c.oid = %(oid)s AND other.relnamespace = c.relnamespace
                         AND other.relname = ANY (%(names)s::text[]))
            OR EXISTS (SELECT FROM pg_class AS c, pg_type AS other
                       WHERE c.oid = %(oid)s AND other.typnamespace = c.relnamespace
                         AND other.typname = (%(names)s::text[])[1])
        """,
}


def blockers(conn: psycopg.Connection, oid: int) -> list[str]:
    """What would stop a faithful rebuild of the view: dependent objects, column grants, labels, rights, ..."""
    found = [f"{row[0]} depends on it" for row in conn.execute(_DEPENDANTS, {"oid": oid})]
    names = [
        _temp_name(name)
        for (name,) in conn.execute(
            "SELECT relname FROM pg_class WHERE oid = %(oid)s"
            " UNION ALL (SELECT ic.relname FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid"
            " WHERE i.indrelid = %(oid)s ORDER BY 1)",
            {"oid": oid},
        )
    ]
    params = {"oid": oid, "tags": _SWAP_COMMAND_TAGS, "names": names}
    found += [f"it has {what}" for what, query in _BLOCKERS.items() if _one(conn, query, params)[0]]
    if len(set(names)) < len(names):
        found.append("it has indexes whose names share their first 57 characters")
    return found


def _shape(run: _Deadline, oid: int) -> _ViewShape:
    """Everything a rebuild carries over, read from the catalog. Run it under _QUALIFYING_SEARCH_PATH."""
    row = run.one(
        """
        SELECT n.nspname, c.relname, c.relowner::regrole::text, pg_get_viewdef(c.oid), am.amname,
               coalesce(s.spcname, ''), c.relreplident, obj_description(c.oid, 'pg_class'),
               (SELECT array_agg(a::text ORDER BY a::text)
                FROM unnest(coalesce(c.relacl, acldefault('r', c.relowner))) AS a),
               coalesce(c.reloptions, '{}')
               || coalesce((SELECT array_agg('toast.' || o ORDER BY o) FROM pg_class AS t, unnest(t.reloptions) AS o
                            WHERE t.oid = c.reltoastrelid), '{}')
        FROM pg_class AS c
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        JOIN pg_am AS am ON am.oid = c.relam
        LEFT JOIN pg_tablespace AS s ON s.oid = c.reltablespace
        WHERE c.oid = %(oid)s
        """,
        {"oid": oid},
    )
    columns = tuple(
        _Column(name, type_, collation, comment, statistics, tuple(options), storage, compression)
        for name, type_, collation, comment, statistics, options, storage, compression in run.execute(
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod),
                   CASE WHEN a.attcollation <> 0 THEN a.attcollation::regcollation::text END,
                   col_description(a.attrelid, a.attnum),
                   CASE WHEN coalesce(a.attstattarget::int, -1) >= 0 THEN a.attstattarget::int END,
                   ARRAY(SELECT o FROM unnest(a.attoptions) AS o WHERE o ~ %(column_options)s ORDER BY o),
                   CASE WHEN a.attstorage <> t.typstorage THEN a.attstorage::text END, a.attcompression::text
            FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
            WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
            """,
            {"oid": oid, "column_options": _COLUMN_OPTIONS},
        )
    )
    schema, name = row[0], row[1]
    indexes = tuple(
        _index(run, schema, name, *index)
        for index in run.execute(
            """
            SELECT ic.relname, i.indisunique, pg_get_indexdef(i.indexrelid), obj_description(i.indexrelid, 'pg_class'),
                   coalesce(s.spcname, ''), i.indisclustered,
                   coalesce((SELECT array_agg(ARRAY[a.attnum::int, a.attstattarget::int] ORDER BY a.attnum)
                             FROM pg_attribute AS a
                             WHERE a.attrelid = i.indexrelid AND coalesce(a.attstattarget::int, -1) >= 0), '{}')
            FROM pg_index AS i
            JOIN pg_class AS ic ON ic.oid = i.indexrelid
            LEFT JOIN pg_tablespace AS s ON s.oid = ic.reltablespace
            WHERE i.indrelid = %(oid)s ORDER BY ic.relname
            """,
            {"oid": oid},
        )
    )
    return _ViewShape(oid, *row[:8], tuple(row[8]), tuple(row[9]), columns, indexes)


def _index(run: _Deadline, schema: str, view: str, name: str, unique: bool, definition: str, *rest) -> _Index:
    """An index of the view, its definition cut after `USING ` so that it can be re-targeted at another view."""
    quoted_index, quoted_view = run.one(
        "SELECT format('%%I', %s::text), format('%%I.%%I', %s::text, %s::text)", [name, schema, view]
    )
    prefix = f"CREATE {'UNIQUE ' if unique else ''}INDEX {quoted_index} ON {quoted_view} USING "
    if not definition.startswith(prefix):
        raise SwapNotPossible(f"index {name} has a definition we cannot re-target ({definition})")
    comment, tablespace, clustered, statistics = rest
    statistics = tuple(map(tuple, statistics))
    return _Index(name, unique, definition[len(prefix) :], comment, tablespace, clustered, statistics)


def _options(options: tuple[str, ...]) -> sql.Composable:
    pairs = [option.split("=", 1) for option in options]
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.SQL(".").join(map(sql.Identifier, key.split("."))), sql.Literal(value))
        for key, value in pairs
    )


def _in_tablespace(run: _Deadline, tablespace: str) -> None:
    """Create the next relation in `tablespace` ('' the database's default), whatever the session's default."""
    run.execute("SELECT set_config('default_tablespace', %s, true)", [tablespace])


def _set_search_path(conn: psycopg.Connection, search_path: str) -> None:
    conn.execute("SELECT set_config('search_path', %s, true)", [search_path])


def _build(run: _Deadline, shape: _ViewShape, search_path: str) -> None:
    """The new view beside the old one, filled by REFRESH (as its owner), with everything `_shape` reads.

    Runs under _QUALIFYING_SEARCH_PATH, in which `shape` was read; `search_path` is the caller's."""
    temp = _temp_name(shape.name)
    new = sql.Identifier(shape.schema, temp)
    _in_tablespace(run, shape.tablespace)
    run.execute(
        sql.SQL("CREATE MATERIALIZED VIEW {new} ({columns}) USING {method}{options} AS {query} WITH NO DATA").format(
            new=new,
            columns=sql.SQL(", ").join(sql.Identifier(column.name) for column in shape.columns),
            method=sql.Identifier(shape.access_method),
            options=sql.SQL(" WITH ({})").format(_options(shape.options)) if shape.options else sql.SQL(""),
            query=sql.SQL(shape.query.rstrip().rstrip(";")),  # pg_get_viewdef's, with every name qualified
        )
    )
    run.execute(sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {}").format(new, sql.Identifier(shape.owner)))
    # Column settings and indexes before the data: compression applies as rows are written, and REFRESH
    # builds the indexes once the rows are in (as a plain REFRESH of the old view would).
    for column in shape.columns:
        target = sql.Identifier(column.name)
        alter = sql.SQL("ALTER MATERIALIZED VIEW {} ALTER COLUMN {} ").format(new, target)
        if column.statistics is not None:
            run.execute(alter + sql.SQL("SET STATISTICS {}").format(sql.Literal(column.statistics)))
        if column.options:
            run.execute(alter + sql.SQL("SET ({})").format(_options(column.options)))
        if column.storage is not None:
            run.execute(alter + sql.SQL("SET STORAGE {}").format(sql.SQL(_STORAGE[column.storage])))
        if column.compression:
            run.execute(alter + sql.SQL("SET COMPRESSION {}").format(sql.SQL(_COMPRESSION[column.compression])))
    if (identity := _REPLICA_IDENTITY[shape.replica_identity]) is not None:
        run.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(new, sql.SQL(identity)))
    for index in shape.indexes:
        temp_index = sql.Identifier(shape.schema, _temp_name(index.name))
        _in_tablespace(run, index.tablespace)
        run.execute(
            sql.SQL("CREATE {unique}INDEX {index} ON {view} USING {rest}").format(
                unique=sql.SQL("UNIQUE " if index.unique else ""),
                index=sql.Identifier(_temp_name(index.name)),
                view=new,
                rest=sql.SQL(index.method_and_keys),  # access method, keys, options, predicate: the catalog's
            )
        )
        for column_number, target in index.statistics:
            run.execute(
                sql.SQL("ALTER INDEX {} ALTER COLUMN {} SET STATISTICS {}").format(
                    temp_index, sql.Literal(column_number), sql.Literal(target)
                )
            )
        if index.comment is not None:
            run.execute(sql.SQL("COMMENT ON INDEX {} IS {}").format(temp_index, sql.Literal(index.comment)))
        if index.clustered:
            run.execute(
                sql.SQL("ALTER MATERIALIZED VIEW {} CLUSTER ON {}").format(new, sql.Identifier(_temp_name(index.name)))
            )
    # The owner's rights and row security, the caller's search_path (PostgreSQL 17+ replaces it with
    # pg_catalog, pg_temp), the rows frozen: as a plain REFRESH of the old view would.
    _set_search_path(run.conn, search_path)
    run.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(new))
    run.execute(sql.SQL("ANALYZE {}").format(new))  # readers' plans get statistics from the first query on
    _set_search_path(run.conn, _QUALIFYING_SEARCH_PATH)
    if shape.comment is not None:
        run.execute(sql.SQL("COMMENT ON MATERIALIZED VIEW {} IS {}").format(new, sql.Literal(shape.comment)))
    for column in shape.columns:
        if column.comment is not None:
            run.execute(
                sql.SQL("COMMENT ON COLUMN {} IS {}").format(
                    sql.Identifier(shape.schema, temp, column.name), sql.Literal(column.comment)
                )
            )
    _grant(run, shape, new)


def _grant(run: _Deadline, shape: _ViewShape, new: sql.Identifier) -> None:
    """The old view's grants on the new one, and nothing else (default privileges may have added some)."""
    new_oid = _oid(run.conn, new.as_string(run.conn))
    added = run.execute(
        """
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN NULL ELSE a.grantee::regrole::text END
        FROM pg_class AS c, aclexplode(c.relacl) AS a WHERE c.oid = %(oid)s AND a.grantee <> c.relowner
        """,
        {"oid": new_oid},
    ).fetchall()
    for (grantee,) in added:
        role = sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
        run.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(new, role))
    grants = run.execute(
        """
        SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE a.grantee::regrole::text END, a.privilege_type, a.is_grantable
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = %(oid)s AND a.grantee <> c.relowner
        """,
        {"oid": shape.oid},
    ).fetchall()
    for grantee, privilege, grantable in grants:
        if not _PRIVILEGE.match(privilege):
            raise SwapNotPossible(f"unexpected privilege {privilege!r} in its grants")
        run.execute(
            sql.SQL("GRANT {privilege} ON {new} TO {grantee}{option}").format(
                privilege=sql.SQL(privilege),
                new=new,
                grantee=sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                option=sql.SQL(" WITH GRANT OPTION" if grantable else ""),
            )
        )


def _by_name(indexes) -> tuple[_Index, ...]:
    return tuple(sorted(indexes, key=lambda index: index.name))


def _differences(old: _ViewShape, new: _ViewShape) -> list[str]:
    """What the rebuilt view does not reproduce, by catalog property; empty when it is faithful."""
    # Compared as the rebuilt view is before the rename: under its temporary name, with its indexes'.
    old = replace(old, oid=0, name="", indexes=_by_name(replace(i, name=_temp_name(i.name)) for i in old.indexes))
    new = replace(new, oid=0, name="", indexes=_by_name(new.indexes))
    found = [
        f"its {field} ({getattr(old, field)!r} became {getattr(new, field)!r})"
        for field in ("owner", "query", "access_method", "tablespace", "replica_identity", "comment", "acl", "options")
        if getattr(old, field) != getattr(new, field)
    ]
    found += [f"column {a.name} ({a} became {b})" for a, b in zip(old.columns, new.columns) if a != b]
    if len(old.columns) != len(new.columns):
        found.append("its columns")
    if old.indexes != new.indexes:
        found.append(f"its indexes ({old.indexes} became {new.indexes})")
    return found


def _swap(run: _Deadline, shape: _ViewShape, lock_wait_s: float) -> int:
    """Drop the old view and rename the new one into place; returns the number of attempts."""
    conn = run.conn
    deadline = time.monotonic() + min(lock_wait_s, run.left_s())
    previous_timeout = _one(conn, "SELECT current_setting('lock_timeout')")[0]
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(SWAP_LOCK_TIMEOUT_S * 1000)}ms"])
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                with conn.transaction():  # a savepoint: a lock timeout undoes only the swap, not the build
                    run.execute(sql.SQL("DROP MATERIALIZED VIEW {}").format(sql.Identifier(shape.schema, shape.name)))
                    run.execute(
                        sql.SQL("ALTER MATERIALIZED VIEW {} RENAME TO {}").format(
                            sql.Identifier(shape.schema, _temp_name(shape.name)), sql.Identifier(shape.name)
                        )
                    )
                    for index in shape.indexes:
                        run.execute(
                            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                                sql.Identifier(shape.schema, _temp_name(index.name)), sql.Identifier(index.name)
                            )
                        )
                return attempt
            except errors.LockNotAvailable:
                if time.monotonic() >= deadline:
                    # A long reader (a report, pg_dump) holds the view: CONCURRENTLY, which readers do not
                    # block, refreshes it where another rebuild would wait for the same reader again.
                    raise SwapNotPossible(
                        f"a session held the view for over {lock_wait_s:g} s ({_holders(conn, shape)}), so its swap "
                        "could not take the view's lock; refreshed CONCURRENTLY, which readers do not block"
                    ) from None
                time.sleep(min(0.02 * attempt, 0.5))  # let the readers that queued behind us through
            except errors.DependentObjectsStillExist as error:  # one our catalog check did not foresee
                raise SwapNotPossible(error.diag.message_detail or str(error)) from None
    finally:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [previous_timeout])


def _holders(conn: psycopg.Connection, shape: "_ViewShape") -> str:
    """The sessions holding a lock on the view, as pids and application names."""
    rows = conn.execute(
        """
        SELECT DISTINCT l.pid, coalesce(nullif(a.application_name, ''), a.usename::text, '?')
        FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a USING (pid)
        WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
          AND l.relation = to_regclass(%s) ORDER BY 1
        """,
        [sql.Identifier(shape.schema, shape.name).as_string(conn)],
    ).fetchall()
    return ", ".join(f"pid {pid} ({name})" for pid, name in rows) or "it has since let go"


def rows_at_least(conn: psycopg.Connection, view: str, rows: int) -> bool:
    """Whether the view holds at least `rows` rows, reading no more than that many."""
    query = sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT %s) AS sample").format(sql.Identifier(view))
    return conn.execute(query, [rows]).fetchone()[0] >= rows


def choose(conn: psycopg.Connection, view: str, strategy: RefreshStrategy) -> tuple[RefreshMode, str]:
    """SWAP or CONCURRENT for a populated view, and why (empty when the strategy applies as asked)."""
    strategy = RefreshStrategy.named(strategy)
    if strategy == RefreshStrategy.CONCURRENT:
        return RefreshMode.CONCURRENT, ""
    if strategy == RefreshStrategy.AUTO and not rows_at_least(conn, view, SWAP_MIN_ROWS):
        return RefreshMode.CONCURRENT, ""
    found = blockers(conn, _oid(conn, view))
    if found:
        return RefreshMode.CONCURRENT, f"build-and-swap does not apply: {'; '.join(found)}"
    return RefreshMode.SWAP, ""


def _build_and_swap(run: _Deadline, view: str, lock_wait_s: float) -> str:
    """Rebuild the view beside itself and swap it in; returns a note. Must run inside a transaction."""
    conn = run.conn
    oid = _oid(conn, view)  # by the caller's search_path, like the rest of refresh.py
    search_path, default_tablespace = _one(
        conn, "SELECT current_setting('search_path'), current_setting('default_tablespace')"
    )
    _set_search_path(conn, _QUALIFYING_SEARCH_PATH)
    shape = _shape(run, oid)
    _build(run, shape, search_path)
    rebuilt = _shape(run, _oid(conn, sql.Identifier(shape.schema, _temp_name(shape.name)).as_string(conn)))
    if differences := _differences(shape, rebuilt):
        raise SwapNotPossible(f"the rebuilt view would lose {'; '.join(differences)}")
    attempts = _swap(run, shape, lock_wait_s)
    conn.execute(
        "SELECT set_config('search_path', %s, true), set_config('default_tablespace', %s, true)",
        [search_path, default_tablespace],
    )
    return "" if attempts == 1 else f"swapped after {attempts} tries for its lock"


def refresh_populated(
    conn: psycopg.Connection, view: str, strategy: RefreshStrategy, *, lock_wait_s: float
) -> tuple[RefreshMode, str]:
    """Refresh a populated view by build-and-swap or CONCURRENTLY; returns the mode used and a note.

    Either is bounded as a whole by the statement_timeout in force, counted from the transaction's start
    (see `_Deadline`); a caller that sets none (0) gets no bound."""
    run = _Deadline(conn)
    run.apply()  # choose reads up to SWAP_MIN_ROWS rows of the view
    mode, note = choose(conn, view, strategy)
    if mode == RefreshMode.SWAP:
        try:
            with conn.transaction():  # a savepoint: a swap that cannot be faithful leaves nothing behind
                note = _build_and_swap(run, view, lock_wait_s)
            run.restore()
            return RefreshMode.SWAP, note
        except SwapNotPossible as reason:
            mode, note = RefreshMode.CONCURRENT, f"build-and-swap does not apply: {reason}"
    run.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.Identifier(view)))
    run.restore()
    return mode, note
