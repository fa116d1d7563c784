-- How many users were active, signed up and paid each ISO week, and what share of last week's came back?
-- Grain: one row per ISO week (Monday 00:00 UTC start), for the 52 complete weeks before the current week.
-- Cadence: weekly
--
-- Window: the 52 weeks from current week start - 52 weeks to current week start - 1 week; the current
-- week is still running and is left out. The window starts on a Monday, so the oldest week is a full
-- week. Every week of the window has a row; a week without activity shows zeros.
-- Weeks are UTC weeks whatever the session TimeZone: instants are bucketed with AT TIME ZONE 'UTC'.
-- Each source is filtered on an indexed timestamp or UTC week, so a refresh reads the window, not all history.
-- Revenue is summed in its own CTE, never after a join to activity rows. Week-over-week retention of
-- the oldest week needs its previous week, so activity is read for 53 weeks and 52 are reported.
CREATE MATERIALIZED VIEW weekly_aggregations AS
WITH report_weeks AS (
    SELECT date_trunc('week', now() AT TIME ZONE 'UTC')::date - 7 * weeks_ago.n AS week_start
    FROM generate_series(1, 52) AS weeks_ago (n)
),

-- The 52 reported weeks and the one before them (for the oldest week's retention).
activity_weeks AS (
    SELECT date_trunc('week', now() AT TIME ZONE 'UTC')::date - 7 * weeks_ago.n AS week_start
    FROM generate_series(1, 53) AS weeks_ago (n)
),

-- Per week: its active users, as one array, and its events. events_utc_week_user_idx returns one week's
-- users in user order, so they are grouped as they stream past: each week's index entries are read once,
-- with no hash or sort of the window's events. Only the window's weeks are read.
week_users AS (
    SELECT
        aw.week_start,
        activity.users,
        activity.events
    FROM activity_weeks AS aw
    CROSS JOIN LATERAL (
        SELECT
            array_agg(user_week.user_id) AS users,
            coalesce(sum(user_week.events), 0) AS events
        FROM (
            SELECT
                e.user_id,
                count(*) AS events
            FROM events AS e
            WHERE date_trunc('week', e.occurred_at AT TIME ZONE 'UTC')::date = aw.week_start
            GROUP BY e.user_id
        ) AS user_week
    ) AS activity
),

-- Users active in a week who were also active in the week before: the two weeks' arrays intersected.
weekly_activity AS (
    SELECT
        this_week.week_start,
        coalesce(cardinality(this_week.users), 0) AS weekly_active_users,
        this_week.events,
        (
            SELECT count(*)
            FROM unnest(this_week.users) AS this_week_user (user_id)
            INNER JOIN unnest(previous_week.users) AS previous_week_user (user_id)
                ON this_week_user.user_id = previous_week_user.user_id
        ) AS returning_users
    FROM week_users AS this_week
    LEFT JOIN week_users AS previous_week ON this_week.week_start - 7 = previous_week.week_start
),

weekly_signups AS (
    SELECT
        date_trunc('week', u.signed_up_at AT TIME ZONE 'UTC')::date AS week_start,
        count(*) AS new_users
    FROM users AS u
    WHERE
        u.signed_up_at
        >= (date_trunc('week', now() AT TIME ZONE 'UTC') - interval '52 weeks') AT TIME ZONE 'UTC'
        AND u.signed_up_at < date_trunc('week', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    GROUP BY date_trunc('week', u.signed_up_at AT TIME ZONE 'UTC')::date
),

weekly_revenue AS (
    SELECT
        date_trunc('week', p.paid_at AT TIME ZONE 'UTC')::date AS week_start,
        sum(p.amount) AS revenue
    FROM payments AS p
    WHERE
        p.paid_at >= (date_trunc('week', now() AT TIME ZONE 'UTC') - interval '52 weeks') AT TIME ZONE 'UTC'
        AND p.paid_at < date_trunc('week', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    GROUP BY date_trunc('week', p.paid_at AT TIME ZONE 'UTC')::date
)

SELECT
    rw.week_start,
    coalesce(wa.weekly_active_users, 0) AS weekly_active_users,
    coalesce(ws.new_users, 0) AS new_users,
    coalesce(wa.events, 0)::bigint AS events,
    coalesce(wr.revenue, 0)::numeric(14, 2) AS revenue,
    round(coalesce(wa.returning_users, 0)::numeric / nullif(previous_wa.weekly_active_users, 0), 4)
        AS wow_retention
FROM report_weeks AS rw
LEFT JOIN weekly_activity AS wa ON rw.week_start = wa.week_start
LEFT JOIN weekly_activity AS previous_wa ON rw.week_start - 7 = previous_wa.week_start
LEFT JOIN weekly_signups AS ws ON rw.week_start = ws.week_start
LEFT JOIN weekly_revenue AS wr ON rw.week_start = wr.week_start
WITH NO DATA;

CREATE UNIQUE INDEX weekly_aggregations_key ON weekly_aggregations (week_start);

-- Column descriptions: the column schema in Dagster and \d+ weekly_aggregations in psql both show them.
COMMENT ON COLUMN weekly_aggregations.week_start IS
'Monday (UTC) the ISO week starts on; every week of the window has a row.';
COMMENT ON COLUMN weekly_aggregations.weekly_active_users IS
'Distinct users with at least one event in the week.';
COMMENT ON COLUMN weekly_aggregations.new_users IS 'Users whose signed_up_at falls in the week.';
COMMENT ON COLUMN weekly_aggregations.events IS 'Number of events in the week.';
COMMENT ON COLUMN weekly_aggregations.revenue IS 'Sum of payments in the week.';
COMMENT ON COLUMN weekly_aggregations.wow_retention IS
'Week-over-week retention: the share of the previous week''s active users who are active again this week; NULL when nobody was active the previous week.';
