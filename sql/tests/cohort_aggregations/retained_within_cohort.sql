-- No cohort retains more users than it has, and retention lies between 0 and 1: a row is a cohort that
-- breaks either.
-- Severity: error
SELECT
    cohort_day,
    cohort_size,
    d1_retained_users,
    d7_retained_users,
    d30_retained_users
FROM cohort_aggregations
WHERE
    d1_retained_users > cohort_size
    OR d7_retained_users > cohort_size
    OR d30_retained_users > cohort_size
    OR d1_retention NOT BETWEEN 0 AND 1
    OR d7_retention NOT BETWEEN 0 AND 1
    OR d30_retention NOT BETWEEN 0 AND 1
