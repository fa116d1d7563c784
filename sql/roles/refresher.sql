-- A least-privilege role for refreshing: it can refresh the project's views and read what they read,
-- and it cannot write any source table.
--
-- Run as a superuser (or the views' owner) after `analytics-views migrate`, and again after migrate
-- recreates a view. The role is analytics_refresher unless the session sets another name first:
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 \
--     -c "SET analytics_views.refresher_role = 'analytics_refresher'" -f sql/roles/refresher.sql
-- It is created NOLOGIN; let a login role use it with `GRANT analytics_refresher TO refresh_user`.
--
-- PostgreSQL 17 and newer have the MAINTAIN privilege, which allows REFRESH MATERIALIZED VIEW to a
-- non-owner (the query still runs with the owner's rights): the role gets MAINTAIN and SELECT on each view.
-- Older servers let only the owner refresh, so there the role becomes the views' owner, and gets SELECT
-- on the tables the views read, since the owner's rights run the query. Prefer 17+: an owner may also drop.
--
-- Large views are refreshed by build-and-swap (analytics_views/swap.py), which creates a new view beside the
-- old one and drops the old: that needs CREATE on the schema and the view's ownership, which this role does
-- not get (17+: not the owner; older: no CREATE on the schema). For it, such refreshes fall back to
-- CONCURRENTLY (slower on large views, never wrong) and say so in `refresh_note`. Before 17, granting the
-- role CREATE on the schema lets it swap, at the price of letting it create objects there.
DO $refresher$
DECLARE
    refresher text := coalesce(
        nullif(current_setting('analytics_views.refresher_role', true), ''), 'analytics_refresher'
    );
    has_maintain boolean := current_setting('server_version_num')::int >= 170000;
    managed_view regclass;
    source_table regclass;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = refresher) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', refresher);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), refresher);
    -- A skip is proven only when every other session is seen idle (write_quiescence.py); without this
    -- role, other roles' sessions show no state, and no view is ever skipped.
    EXECUTE format('GRANT pg_read_all_stats TO %I', refresher);

    -- The views this project manages: those `analytics-views migrate` recorded.
    FOR managed_view IN
        SELECT to_regclass(quote_ident(regexp_replace(ledger.name, '^views/(.*)\.sql$', '\1')))
        FROM analytics_views_migrations AS ledger
        WHERE ledger.name LIKE 'views/%'
    LOOP
        CONTINUE WHEN managed_view IS NULL;
        IF has_maintain THEN
            EXECUTE format('GRANT SELECT, MAINTAIN ON %s TO %I', managed_view, refresher);
        ELSE
            EXECUTE format('ALTER MATERIALIZED VIEW %s OWNER TO %I', managed_view, refresher);
            -- As owner, the role's own rights run the view's query: it reads the tables the view reads.
            FOR source_table IN
                SELECT DISTINCT dep.refobjid::regclass
                FROM pg_rewrite AS rule
                INNER JOIN pg_depend AS dep
                    ON dep.classid = 'pg_rewrite'::regclass AND dep.objid = rule.oid
                INNER JOIN pg_class AS rel ON rel.oid = dep.refobjid
                WHERE rule.ev_class = managed_view AND dep.refobjid <> managed_view AND rel.relkind IN ('r', 'p', 'v', 'm')
            LOOP
                EXECUTE format('GRANT SELECT ON %s TO %I', source_table, refresher);
            END LOOP;
        END IF;
    END LOOP;
END
$refresher$;
