"""Discovery: read materialized views made elsewhere from the catalog into a JSON state.

Dagster loads definitions many times (UI, daemon, every run), so they never query the database: they read
the state `discover` returns, which the component keeps as its Dagster defs state (`analytics-views discover`
or `dg utils refresh-defs-state` write it). The state holds, per selected view, its comment, columns (with
their comments), the relations it reads (from pg_depend through its pg_rewrite rule), its indexes (and which
one REFRESH ... CONCURRENTLY can use) and a fingerprint of its definition; and the same facts for every
relation those views read. Cadences are not in it: the component's defs.yaml assigns them when definitions
load. The JSON is sorted and holds no timestamps and no connection details, so rediscovering an unchanged
database writes it byte for byte. A selected view the role could not refresh, or named like one of the
project's own, is left out, and `not_taken` says why.
"""

import hashlib
import json
import keyword
import re
import unicodedata
from dataclasses import dataclass
from graphlib import TopologicalSorter

import psycopg

from analytics_views.postgres import database
from analytics_views.postgres.database import Column, connect
from analytics_views.errors import AnalyticsViewsError
from analytics_views.sql_files.managed import ManagedConfig, matches
from analytics_views.sql_files.views import ViewDefinition, load_views, on_cadences

STATE_VERSION = 1
KINDS = {"r": "table", "p": "table", "v": "view", "m": "materialized view", "f": "foreign table"}

# With what the role may do: REFRESH needs the owner's rights (PostgreSQL 17+: the MAINTAIN privilege), the
# checks and row counts need SELECT.
_MATVIEWS = """
SELECT c.oid, n.nspname, c.relname, obj_description(c.oid, 'pg_class'), pg_get_viewdef(c.oid),
       has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'),
       {may_refresh}, pg_get_userbyid(c.relowner)
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY n.nspname, c.relname
"""
_MAY_REFRESH = {True: "has_table_privilege(c.oid, 'MAINTAIN')", False: "pg_has_role(c.relowner, 'USAGE')"}

_OTHER_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind::text
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'f') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""

# Relations a view's rewrite rule reads: the dependencies PostgreSQL itself records, schema and all.
_READS = """
SELECT DISTINCT n.nspname, c.relname, c.relkind::text
FROM pg_rewrite AS r
JOIN pg_depend AS d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class AS c ON c.oid = d.refobjid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE r.ev_class = %s AND d.refobjid <> r.ev_class
ORDER BY 1, 2
"""

_RELATION = """
SELECT c.oid, c.relkind::text, obj_description(c.oid, 'pg_class')
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), col_description(a.attrelid, a.attnum)
FROM pg_attribute AS a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_INDEXES = "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s ORDER BY 1"


def _columns(conn: psycopg.Connection, oid: int) -> list[dict]:
    return [{"name": n, "type": t, "description": d} for n, t, d in conn.execute(_COLUMNS, [oid])]


def fingerprint(definition: str, columns: list[dict]) -> str:
    """What changes when a view is redefined: its query and its column names and types."""
    text = json.dumps([definition, [[c["name"], c["type"]] for c in columns]])
    return hashlib.md5(text.encode()).hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A materialized view `config` selects, and why it cannot be taken (None: it is taken)."""

    oid: int
    schema: str
    name: str
    comment: str | None
    definition: str
    not_taken: str | None


def _candidates(conn: psycopg.Connection, config: ManagedConfig, current_schema: str) -> list[Candidate]:
    views_dir = config.views_dir
    own = {view.name for view in load_views(views_dir)} if views_dir else set()
    query = _MATVIEWS.format(may_refresh=_MAY_REFRESH[conn.info.server_version >= 170000])
    candidates = []
    for oid, schema, name, comment, definition, may_read, may_refresh, owner in conn.execute(query).fetchall():
        if not config.selects(schema, name):
            continue
        if schema == current_schema and name in own:
            reason = (
                f"named like this project's own view ({views_dir.parent.name}/{views_dir.name}/{name}.sql), which "
                f"manages it: to adopt the database's view instead, remove sql_folder from {config.where}"
            )
        elif not may_read:
            reason = f"the role {conn.info.user!r} may not SELECT it: grant it USAGE on the schema and SELECT on the view"
        elif not may_refresh:
            reason = (
                f"only its owner {owner!r} may refresh it: run discover and refresh as {owner!r} or a member of it"
                + (", or GRANT MAINTAIN on it" if conn.info.server_version >= 170000 else "")
            )
        else:
            reason = None
        candidates.append(Candidate(oid, schema, name, comment, definition.strip(), reason))
    return candidates


def read_catalog(conn: psycopg.Connection, config: ManagedConfig) -> dict:
    """The state for the views `config` selects, as the catalog describes them now."""
    current_schema = conn.execute("SELECT current_schema()").fetchone()[0]
    views, relations = [], {}
    for candidate in _candidates(conn, config, current_schema):
        if candidate.not_taken:
            continue
        oid, schema, name, definition = candidate.oid, candidate.schema, candidate.name, candidate.definition
        columns = _columns(conn, oid)
        reads = conn.execute(_READS, [oid]).fetchall()
        unique_index = database.view_state(conn, name, schema).unique_index
        views.append(
            {
                "schema": schema,
                "name": name,
                "comment": candidate.comment,
                "definition": definition,
                "columns": columns,
                "reads": [{"schema": s, "name": n} for s, n, _ in reads],
                "indexes": [row[0] for row in conn.execute(_INDEXES, [oid])],
                "unique_index": unique_index
                and conn.execute("SELECT pg_get_indexdef(%s::regclass)", [unique_index]).fetchone()[0],
                "fingerprint": fingerprint(definition, columns),
            }
        )
        for s, n, _ in reads:
            relations[(s, n)] = None
    for schema, name in relations:
        oid, kind, comment = conn.execute(_RELATION, [schema, name]).fetchone()
        relations[(schema, name)] = {
            "schema": schema,
            "name": name,
            "kind": KINDS.get(kind, kind),
            "comment": comment,
            "columns": _columns(conn, oid),
        }
    return {
        "version": STATE_VERSION,
        "current_schema": current_schema,
        "views": views,
        "relations": [relations[key] for key in sorted(relations)],
    }


def not_taken(conn: psycopg.Connection, config: ManagedConfig) -> list[str]:
    """One line per view `config` selects that discovery does not take, and per selection that finds none."""
    current_schema = conn.execute("SELECT current_schema()").fetchone()[0]
    candidates = _candidates(conn, config, current_schema)
    lines = [f"{c.schema}.{c.name}: not taken: {c.not_taken}" for c in candidates if c.not_taken]
    others = conn.execute(_OTHER_RELATIONS).fetchall()
    for pattern in config.names:
        if any(matches(pattern, c.schema, c.name) for c in candidates):
            continue
        kinds = [(s, n, KINDS[k]) for s, n, k in others if matches(pattern, s, n)]
        if kinds and not any(ch in pattern for ch in "*?["):
            schema, name, kind = kinds[0]
            lines.append(f"{schema}.{name}: not taken: a {kind}, not a materialized view (only those are refreshed)")
        else:
            lines.append(f"names entry {pattern!r} matches no materialized view: fix or remove it")
    for schema in config.schemas:
        if not any(c.schema == schema for c in candidates):
            lines.append(f"schemas entry {schema!r} holds no materialized view: fix or remove it")
    return lines


EMPTY_STATE = {"version": STATE_VERSION, "current_schema": None, "views": [], "relations": []}


def discover(url: str, config: ManagedConfig) -> dict:
    """The state of the views `config` selects, read from the catalog; nothing is read for a configuration
    that selects none."""
    if not config.discovers:
        return dict(EMPTY_STATE)
    with connect(url) as conn:
        return read_catalog(conn, config)


def state_text(state: dict) -> str:
    """The state as it is stored: sorted JSON, the same bytes for the same catalog."""
    return json.dumps(state, indent=2, sort_keys=True) + "\n"


def load_state(config: ManagedConfig) -> dict:
    never = (
        f"{config.where} selects views made elsewhere, and they were never discovered: run `analytics-views "
        "discover` (or `dg utils refresh-defs-state`) with DATABASE_URL set"
    )
    if config.state_file is None:
        raise AnalyticsViewsError(never)
    try:
        state = json.loads(config.state_file.read_text())
    except FileNotFoundError:
        raise AnalyticsViewsError(never) from None
    except (OSError, ValueError) as error:
        raise AnalyticsViewsError(f"cannot read {config.state_file} ({error}): run `analytics-views discover` again") from None
    if state.get("version") != STATE_VERSION:
        raise AnalyticsViewsError(f"{config.state_file} was written by another version: run `analytics-views discover`")
    return state


@dataclass(frozen=True)
class SourceRelation:
    """A relation a discovered view reads that is not itself a managed view: a source asset."""

    key: tuple[str, ...]
    schema: str
    name: str
    kind: str
    comment: str | None
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Discovered:
    views: tuple[ViewDefinition, ...]
    sources: tuple[SourceRelation, ...]


_DAGSTER_NAME = re.compile(r"[A-Za-z0-9_]+")
# Names Dagster refuses as op names: Python keywords and its own argument names (dagster's DISALLOWED_NAMES).
_RESERVED = frozenset(keyword.kwlist) | {
    "context", "conf", "config", "meta", "arg_dict", "dict", "input_arg_dict", "output_arg_dict",
    "int", "str", "float", "bool", "input", "output", "type",
}  # fmt: skip


def key_part(name: str) -> str:
    """`name` when Dagster accepts it in an asset key, else a valid form of it with a hash of the original:
    deterministic, and two names never share one (`revenue report` -> `revenue_report_<hash>`)."""
    # Dagster joins a key's parts with `__` into op names: a part holding it could name another key's op.
    if _DAGSTER_NAME.fullmatch(name) and "__" not in name and name not in _RESERVED:
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9]+", "_", ascii_name).strip("_") or "relation"
    return f"{stem}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def asset_key(schema: str, name: str, current_schema: str) -> tuple[str, ...]:
    """A relation's asset key, a function of the relation alone so that it never changes when other views or
    schemas are discovered: its name in the schema discovery ran in (where the project's own tables and views
    live, so they keep their keys), [schema, name] elsewhere."""
    return (key_part(name),) if schema == current_schema else (key_part(schema), key_part(name))


def asset_keys(state: dict) -> dict[tuple[str, str], tuple[str, ...]]:
    """Asset key of each relation in the state (asset_key)."""
    relations = {(v["schema"], v["name"]) for v in state["views"]} | {(r["schema"], r["name"]) for r in state["relations"]}
    return {(schema, name): asset_key(schema, name, state["current_schema"]) for schema, name in relations}


def _column_tuple(columns: list[dict]) -> tuple[Column, ...]:
    return tuple(Column(c["name"], c["type"], c["description"]) for c in columns)


def discovered_views(config: ManagedConfig) -> Discovered:
    """The views made elsewhere that `config` selects, from the state file only (no database)."""
    if not config.discovers:
        return Discovered((), ())
    state = load_state(config)
    project = load_views(config.views_dir) if config.views_dir else ()
    keys = asset_keys(state)
    views = []
    for v in state["views"]:
        label = f"{v['schema']}.{v['name']}"
        summary = (v["comment"] or f"Materialized view {label}, made outside this project.").splitlines()[0]
        views.append(
            ViewDefinition(
                name=v["name"],
                path=None,
                sql=f"CREATE MATERIALIZED VIEW {label} AS\n{v['definition']}",
                unique_index=v.get("unique_index"),
                summary=summary,
                description=(v["comment"] or summary) + f"\n\nDiscovered in the catalog as {label}.",
                grain=None,
                cadence=config.cadence_of(v["schema"], v["name"]),
                deps=tuple(sorted("/".join(keys[(r["schema"], r["name"])]) for r in v["reads"])),
                schema=v["schema"],
                key=keys[(v["schema"], v["name"])],
                columns=_column_tuple(v["columns"]),
                fingerprint=v["fingerprint"],
            )
        )
    view_keys = {view.asset_key_path for view in views} | {(view.name,) for view in project}
    sources = tuple(
        SourceRelation(
            key=keys[(r["schema"], r["name"])],
            schema=r["schema"],
            name=r["name"],
            kind=r["kind"],
            comment=r["comment"],
            columns=_column_tuple(r["columns"]),
        )
        for r in state["relations"]
        if keys[(r["schema"], r["name"])] not in view_keys
    )
    return Discovered(tuple(views), sources)


def managed_views(config: ManagedConfig) -> Discovered:
    """Every managed view, the project's and the discovered, each after every managed view it reads;
    with the source relations the discovered ones read."""
    discovered = discovered_views(config)
    project = on_cadences(load_views(config.views_dir), config) if config.views_dir else ()
    views = {"/".join(v.asset_key_path): v for v in (*project, *discovered.views)}
    graph = {key: [dep for dep in view.deps if dep in views] for key, view in views.items()}
    return Discovered(tuple(views[key] for key in TopologicalSorter(graph).static_order()), discovered.sources)


@dataclass(frozen=True)
class Staleness:
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    redefined: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.dropped or self.redefined)

    def line(self, config: ManagedConfig) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (("added", self.added), ("dropped", self.dropped), ("redefined", self.redefined))
            if names
        ]
        return (
            f"the discovery state of {config.where} is out of date ({'; '.join(parts)}): "
            "run `analytics-views discover` and reload the definitions"
        )


def staleness(conn: psycopg.Connection, config: ManagedConfig) -> Staleness:
    """How the state file differs from the catalog now: views added, dropped or redefined since discovery."""
    if not config.discovers:
        return Staleness((), (), ())
    known = {f"{v['schema']}.{v['name']}": v["fingerprint"] for v in load_state(config)["views"]}
    now = {f"{v['schema']}.{v['name']}": v["fingerprint"] for v in read_catalog(conn, config)["views"]}
    return Staleness(
        added=tuple(sorted(now.keys() - known.keys())),
        dropped=tuple(sorted(known.keys() - now.keys())),
        redefined=tuple(sorted(name for name in now.keys() & known.keys() if now[name] != known[name])),
    )


def current_fingerprint(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    """The fingerprint the view has in the catalog now (None when it is gone)."""
    row = conn.execute(
        "SELECT c.oid, pg_get_viewdef(c.oid) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'm' AND n.nspname = %s AND c.relname = %s",
        [schema, name],
    ).fetchone()
    return fingerprint(row[1].strip(), _columns(conn, row[0])) if row else None
