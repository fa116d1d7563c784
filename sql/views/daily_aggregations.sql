-- How many users were active, signed up and paid on each UTC day, and how much revenue came in?
-- Grain: one row per UTC calendar day, for the 90 complete UTC days before today.
-- Cadence: daily
--
-- Window: the 90 UTC days from today - 90 to today - 1; today (UTC) is still running at refresh time
-- and is left out. Every day of the window has a row; a day without activity shows zeros.
-- Days are UTC days whatever the session TimeZone: instants are bucketed with AT TIME ZONE 'UTC'.
-- Each source is filtered on an indexed timestamp or UTC day, so a refresh reads the window, not all history.
-- Revenue is summed in its own CTE, never after a join to activity rows, which would multiply each
-- payment by the payer's events.
CREATE MATERIALIZED VIEW daily_aggregations AS
WITH report_days AS (
    SELECT (now() AT TIME ZONE 'UTC')::date - days_ago.n AS day
    FROM generate_series(1, 90) AS days_ago (n)
),

-- Active users and events per day. Within each half of the window, (day, user) pairs come in order
-- straight from events_utc_day_user_idx and are grouped as they stream past, without hashing or sorting the
-- window's events (count(DISTINCT user_id) per day would sort them all in one process). The two halves
-- are the same query on different days, so PostgreSQL reads them at the same time, one process each
-- (Parallel Append): keep them alike.
daily_activity AS (
    SELECT
        uad.day,
        count(*) AS active_users,
        sum(uad.events)::bigint AS events
    FROM (
        SELECT
            (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
            e.user_id,
            count(*) AS events
        FROM events AS e
        WHERE
            (e.occurred_at AT TIME ZONE 'UTC')::date >= (now() AT TIME ZONE 'UTC')::date - 90
            AND (e.occurred_at AT TIME ZONE 'UTC')::date < (now() AT TIME ZONE 'UTC')::date - 45
        GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.user_id
    ) AS uad
    GROUP BY uad.day

    UNION ALL

    SELECT
        uad.day,
        count(*) AS active_users,
        sum(uad.events)::bigint AS events
    FROM (
        SELECT
            (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
            e.user_id,
            count(*) AS events
        FROM events AS e
        WHERE
            (e.occurred_at AT TIME ZONE 'UTC')::date >= (now() AT TIME ZONE 'UTC')::date - 45
            AND (e.occurred_at AT TIME ZONE 'UTC')::date < (now() AT TIME ZONE 'UTC')::date
        GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.user_id
    ) AS uad
    GROUP BY uad.day
),

daily_signups AS (
    SELECT
        (u.signed_up_at AT TIME ZONE 'UTC')::date AS day,
        count(*) AS new_users
    FROM users AS u
    WHERE
        u.signed_up_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND u.signed_up_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
    GROUP BY (u.signed_up_at AT TIME ZONE 'UTC')::date
),

daily_revenue AS (
    SELECT
        (p.paid_at AT TIME ZONE 'UTC')::date AS day,
        sum(p.amount) AS revenue,
        count(DISTINCT p.user_id) AS paying_users
    FROM payments AS p
    WHERE
        p.paid_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND p.paid_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
    GROUP BY (p.paid_at AT TIME ZONE 'UTC')::date
)

SELECT
    rd.day,
    coalesce(da.active_users, 0) AS active_users,
    coalesce(ds.new_users, 0) AS new_users,
    coalesce(da.events, 0) AS events,
    coalesce(dr.revenue, 0)::numeric(14, 2) AS revenue,
    coalesce(dr.paying_users, 0) AS paying_users,
    round(coalesce(dr.revenue, 0) / nullif(da.active_users, 0), 4) AS arpdau
FROM report_days AS rd
LEFT JOIN daily_activity AS da ON rd.day = da.day
LEFT JOIN daily_signups AS ds ON rd.day = ds.day
LEFT JOIN daily_revenue AS dr ON rd.day = dr.day
WITH NO DATA;

CREATE UNIQUE INDEX daily_aggregations_key ON daily_aggregations (day);

-- Column descriptions: the column schema in Dagster and \d+ daily_aggregations in psql both show them.
COMMENT ON COLUMN daily_aggregations.day IS 'UTC calendar day of the row; every day of the window has one.';
COMMENT ON COLUMN daily_aggregations.active_users IS 'Distinct users with at least one event that day.';
COMMENT ON COLUMN daily_aggregations.new_users IS 'Users whose signed_up_at falls on that day.';
COMMENT ON COLUMN daily_aggregations.events IS 'Number of events that day.';
COMMENT ON COLUMN daily_aggregations.revenue IS 'Sum of payments that day.';
COMMENT ON COLUMN daily_aggregations.paying_users IS 'Distinct users with at least one payment that day.';
COMMENT ON COLUMN daily_aggregations.arpdau IS
'Average revenue per daily active user, revenue / active_users; NULL when nobody was active.';
