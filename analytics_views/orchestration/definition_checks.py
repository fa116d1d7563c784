"""How the checks that follow a view's definition, not its rows, are evaluated: view_checks.py's DEFINITION
checks (the static checks of sql_checks.py and `matches_discovery`).

They read the view's stored definition and catalog facts (its indexes and columns, the keys, constraints and
NOT NULL columns of the relations it reads), which a refresh does not change: evaluating them in every refresh
run would cost their planned and result events at every tick, for the same answers. So they are evaluated by a
job of their own, `definition_checks_job`:
- when a view's definition or those catalog facts change: `definition_checks_sensor` reads a digest of them
  for every view each minute (one catalog query over one connection) and asks for the checks of the views whose
  digest moved since its last tick (every view on its first tick), so the UI always shows their latest result;
- on demand: launching the job (or a check, from the view's page) in the UI.
`unique_key_not_null` also counts NULL keys in the view's rows: that count is as of its last evaluation.
"""

import hashlib
import json
from collections.abc import Mapping

import dagster as dg
import psycopg

from analytics_views.orchestration.resources import AnalyticsDatabase
from analytics_views.orchestration.view_checks import DEFINITION, CheckInput, checks_following
from analytics_views.postgres import database
from analytics_views.sql_files.views import ViewDefinition

JOB_NAME = "definition_checks_job"
SENSOR_NAME = "definition_checks_sensor"
SENSOR_INTERVAL_S = 60

# One row per view: a digest of what the definition checks read. pg_get_viewdef waits for a lock on the
# view's sources: the sensor's session bounds it with lock_timeout.
_FACTS = """
WITH view AS (
    SELECT label, to_regclass(relation) AS oid FROM unnest(%(labels)s::text[], %(relations)s::text[]) AS v (label, relation)
),
reads AS (
    SELECT DISTINCT view.label, dep.refobjid AS oid
    FROM view
    JOIN pg_rewrite AS rule ON rule.ev_class = view.oid
    JOIN pg_depend AS dep ON dep.classid = 'pg_rewrite'::regclass AND dep.objid = rule.oid
        AND dep.refclassid = 'pg_class'::regclass AND dep.refobjid <> view.oid
),
relation_facts AS (
    SELECT rel.oid, concat_ws(
        ':',
        rel.oid::regclass::text,
        (SELECT string_agg(pg_get_indexdef(i.indexrelid) || i.indisvalid::text, ';' ORDER BY i.indexrelid)
         FROM pg_index AS i WHERE i.indrelid = rel.oid),
        (SELECT string_agg(pg_get_constraintdef(c.oid), ';' ORDER BY c.oid) FROM pg_constraint AS c WHERE c.conrelid = rel.oid),
        (SELECT string_agg(a.attname || ' ' || a.atttypid::regtype::text || ' ' || a.attnotnull::text, ',' ORDER BY a.attnum)
         FROM pg_attribute AS a WHERE a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped)
    ) AS facts
    FROM (SELECT oid FROM view WHERE oid IS NOT NULL UNION SELECT oid FROM reads) AS rel
)
SELECT view.label,
       CASE WHEN view.oid IS NOT NULL THEN md5(concat_ws(
           '|',
           pg_get_viewdef(view.oid),
           (SELECT facts FROM relation_facts WHERE relation_facts.oid = view.oid),
           (SELECT string_agg(relation_facts.facts, ';' ORDER BY relation_facts.facts)
            FROM reads JOIN relation_facts USING (oid) WHERE reads.label = view.label)
       )) END
FROM view
"""


def check_names(view: ViewDefinition) -> list[str]:
    return [check.name for check in checks_following(DEFINITION, view)]


def check_keys(views: Mapping[dg.AssetKey, ViewDefinition]) -> list[dg.AssetCheckKey]:
    """The definition checks of `views` (each view by its asset key)."""
    return [dg.AssetCheckKey(key, name) for key, view in views.items() for name in check_names(view)]


def definition_facts(conn: psycopg.Connection, views: list[ViewDefinition]) -> dict[str, str | None]:
    """Each view's digest of its definition (in the catalog and as the definitions know it) and of the catalog
    facts the checks read; None for a view missing from the database."""
    relations = [database.relation_text(conn, view.name, view.schema) for view in views]
    rows = dict(conn.execute(_FACTS, {"labels": [view.label for view in views], "relations": relations}).fetchall())
    return {
        view.label: None if rows.get(view.label) is None else f"{rows[view.label]}:{_known_definition(view)}"
        for view in views
    }


def _known_definition(view: ViewDefinition) -> str:
    """What the definitions know of the view (its SQL file, or what discovery recorded), as a short digest."""
    return hashlib.md5(f"{view.sql}\0{view.fingerprint or ''}\0{view.unique_index or ''}".encode()).hexdigest()[:12]


def definition_checks(by_key: Mapping[dg.AssetKey, ViewDefinition]) -> dg.AssetChecksDefinition:
    """Every view's static checks (and `matches_discovery` for a discovered view), evaluated over one connection;
    subsettable: the sensor and the UI ask for some. `by_key`: each view by its asset key."""
    @dg.multi_asset_check(
        name="check_view_definitions",
        description="The checks of the views' definitions (static SQL checks, matches_discovery), evaluated when "
        "a definition or the catalog facts they read change.",
        specs=[check.spec(key) for key, view in by_key.items() for check in checks_following(DEFINITION, view)],
        can_subset=True,
    )
    def check_view_definitions(context: dg.AssetCheckExecutionContext, analytics_db: AnalyticsDatabase):
        wanted: dict[dg.AssetKey, set[str]] = {}
        for check in context.selected_asset_check_keys:
            wanted.setdefault(check.asset_key, set()).add(check.name)
        with analytics_db.connection(f"analytics-views definition checks run {context.run.run_id[:8]}") as conn:
            for key, names in wanted.items():
                view = by_key[key]
                facts = CheckInput(conn, view, key, database.view_state(conn, view.name, view.schema))
                for check in checks_following(DEFINITION, view):
                    if check.name in names:
                        yield check.evaluate(facts)

    return check_view_definitions


def definition_checks_job(views: Mapping[dg.AssetKey, ViewDefinition]):
    return dg.define_asset_job(
        name=JOB_NAME,
        selection=dg.AssetSelection.checks(*check_keys(views)),
        description="Evaluates the views' definition checks (static SQL checks, matches_discovery): launched by "
        f"{SENSOR_NAME} when a definition or the catalog facts they read change, or by hand.",
    )


def definition_checks_sensor(views: Mapping[dg.AssetKey, ViewDefinition]) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        job_name=JOB_NAME,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Asks for the definition checks of the views whose definition or catalog facts changed since "
        "its last tick (every view on its first).",
    )
    def sensor(context: dg.SensorEvaluationContext, analytics_db: AnalyticsDatabase):
        with analytics_db.connection("analytics-views definition checks sensor") as conn:
            conn.execute("SET lock_timeout = '2s'")
            facts = definition_facts(conn, list(views.values()))
        seen = json.loads(context.cursor) if context.cursor else {}
        changed = {key: view for key, view in views.items() if view.label not in seen or seen[view.label] != facts[view.label]}
        context.update_cursor(json.dumps(facts, sort_keys=True))
        if not changed:
            return dg.SkipReason(f"no view's definition or catalog facts changed ({len(views)} views)")
        return dg.RunRequest(asset_check_keys=check_keys(changed), tags={"analytics_views/changed_views": str(len(changed))})

    return sensor
