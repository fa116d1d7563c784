-- Of the users who signed up each UTC day, how many came back on day 1, 7 and 30, and what have they paid?
-- Grain: one row per signup cohort, the UTC day of signed_up_at, for the 90 complete UTC days before today.
-- Cadence: daily
--
-- Window: cohorts from today - 90 to today - 1 (UTC); every cohort day has a row, even an empty one.
-- Days are UTC days whatever the session TimeZone: instants are bucketed with AT TIME ZONE 'UTC'.
-- Signups and payments are read for the window only; retention probes read one user-day each.
-- Day-N retention is NULL while day N has not completed (cohort_day + N >= today), not 0: the users
-- may still come back that day. Revenue is summed in its own CTE, never after a join to activity
-- rows, which would multiply it.
CREATE MATERIALIZED VIEW cohort_aggregations AS
WITH report_cohorts AS (
    SELECT (now() AT TIME ZONE 'UTC')::date - days_ago.n AS cohort_day
    FROM generate_series(1, 90) AS days_ago (n)
),

cohort_users AS (
    SELECT
        u.user_id,
        (u.signed_up_at AT TIME ZONE 'UTC')::date AS cohort_day
    FROM users AS u
    WHERE
        u.signed_up_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND u.signed_up_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
),

-- One row per cohort user: was the user active on the UTC day 1, 7 and 30 days after signup?
-- Each probe reads one user's events of one day through events (user_id, occurred_at).
user_returns AS (
    SELECT
        cu.user_id,
        cu.cohort_day,
        EXISTS (
            SELECT FROM events AS e
            WHERE
                e.user_id = cu.user_id
                AND e.occurred_at >= (cu.cohort_day + 1)::timestamp AT TIME ZONE 'UTC'
                AND e.occurred_at < (cu.cohort_day + 2)::timestamp AT TIME ZONE 'UTC'
        ) AS active_on_day_1,
        EXISTS (
            SELECT FROM events AS e
            WHERE
                e.user_id = cu.user_id
                AND e.occurred_at >= (cu.cohort_day + 7)::timestamp AT TIME ZONE 'UTC'
                AND e.occurred_at < (cu.cohort_day + 8)::timestamp AT TIME ZONE 'UTC'
        ) AS active_on_day_7,
        EXISTS (
            SELECT FROM events AS e
            WHERE
                e.user_id = cu.user_id
                AND e.occurred_at >= (cu.cohort_day + 30)::timestamp AT TIME ZONE 'UTC'
                AND e.occurred_at < (cu.cohort_day + 31)::timestamp AT TIME ZONE 'UTC'
        ) AS active_on_day_30
    FROM cohort_users AS cu
),

cohort_returns AS (
    SELECT
        ur.cohort_day,
        count(*) AS cohort_size,
        count(*) FILTER (WHERE ur.active_on_day_1) AS d1_retained_users,
        count(*) FILTER (WHERE ur.active_on_day_7) AS d7_retained_users,
        count(*) FILTER (WHERE ur.active_on_day_30) AS d30_retained_users
    FROM user_returns AS ur
    GROUP BY ur.cohort_day
),

-- Payments joined to their payer's cohort only: one row per payment, so no amount is counted twice.
cohort_revenue AS (
    SELECT
        cu.cohort_day,
        sum(p.amount) AS revenue_to_date
    FROM payments AS p
    INNER JOIN cohort_users AS cu ON p.user_id = cu.user_id
    WHERE
        p.paid_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND p.paid_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
    GROUP BY cu.cohort_day
),

-- Day N of a cohort has completed once cohort_day + N is before today (UTC).
cohort_completed_days AS (
    SELECT
        rc.cohort_day,
        rc.cohort_day + 1 < (now() AT TIME ZONE 'UTC')::date AS day_1_completed,
        rc.cohort_day + 7 < (now() AT TIME ZONE 'UTC')::date AS day_7_completed,
        rc.cohort_day + 30 < (now() AT TIME ZONE 'UTC')::date AS day_30_completed
    FROM report_cohorts AS rc
)

SELECT
    ccd.cohort_day,
    coalesce(cr.cohort_size, 0) AS cohort_size,
    CASE WHEN ccd.day_1_completed THEN coalesce(cr.d1_retained_users, 0) END AS d1_retained_users,
    CASE
        WHEN ccd.day_1_completed THEN round(cr.d1_retained_users::numeric / nullif(cr.cohort_size, 0), 4)
    END AS d1_retention,
    CASE WHEN ccd.day_7_completed THEN coalesce(cr.d7_retained_users, 0) END AS d7_retained_users,
    CASE
        WHEN ccd.day_7_completed THEN round(cr.d7_retained_users::numeric / nullif(cr.cohort_size, 0), 4)
    END AS d7_retention,
    CASE WHEN ccd.day_30_completed THEN coalesce(cr.d30_retained_users, 0) END AS d30_retained_users,
    CASE
        WHEN ccd.day_30_completed THEN round(cr.d30_retained_users::numeric / nullif(cr.cohort_size, 0), 4)
    END AS d30_retention,
    coalesce(rev.revenue_to_date, 0)::numeric(14, 2) AS revenue_to_date,
    round(coalesce(rev.revenue_to_date, 0) / nullif(cr.cohort_size, 0), 4) AS ltv_per_user
FROM cohort_completed_days AS ccd
LEFT JOIN cohort_returns AS cr ON ccd.cohort_day = cr.cohort_day
LEFT JOIN cohort_revenue AS rev ON ccd.cohort_day = rev.cohort_day
WITH NO DATA;

CREATE UNIQUE INDEX cohort_aggregations_key ON cohort_aggregations (cohort_day);

-- Column descriptions: the column schema in Dagster and \d+ cohort_aggregations in psql both show them.
COMMENT ON COLUMN cohort_aggregations.cohort_day IS
'Signup cohort: the UTC day of signed_up_at; every day of the window has a row, even an empty one.';
COMMENT ON COLUMN cohort_aggregations.cohort_size IS 'Users who signed up that UTC day.';
COMMENT ON COLUMN cohort_aggregations.d1_retained_users IS
'Cohort users with at least one event on the UTC day cohort_day + 1; NULL until that day has completed.';
COMMENT ON COLUMN cohort_aggregations.d1_retention IS
'd1_retained_users / cohort_size; NULL until day 1 has completed, and for an empty cohort.';
COMMENT ON COLUMN cohort_aggregations.d7_retained_users IS
'Cohort users with at least one event on the UTC day cohort_day + 7; NULL until that day has completed.';
COMMENT ON COLUMN cohort_aggregations.d7_retention IS
'd7_retained_users / cohort_size; NULL until day 7 has completed, and for an empty cohort.';
COMMENT ON COLUMN cohort_aggregations.d30_retained_users IS
'Cohort users with at least one event on the UTC day cohort_day + 30; NULL until that day has completed.';
COMMENT ON COLUMN cohort_aggregations.d30_retention IS
'd30_retained_users / cohort_size; NULL until day 30 has completed, and for an empty cohort.';
COMMENT ON COLUMN cohort_aggregations.revenue_to_date IS
'All payments of the cohort''s users from signup until the end of yesterday (UTC).';
COMMENT ON COLUMN cohort_aggregations.ltv_per_user IS
'revenue_to_date / cohort_size: revenue to date per signed-up user; NULL for an empty cohort.';
