-- The view holds exactly the 90 complete UTC days before today: a row is a day missing or one too many.
-- Severity: error
WITH expected AS (
    SELECT (now() AT TIME ZONE 'UTC')::date - days_ago.n AS day
    FROM generate_series(1, 90) AS days_ago (n)
)

SELECT
    coalesce(e.day, d.day) AS day,
    CASE WHEN d.day IS NULL THEN 'missing' ELSE 'outside the window' END AS problem
FROM expected AS e
FULL JOIN daily_aggregations AS d ON e.day = d.day
WHERE e.day IS NULL OR d.day IS NULL
