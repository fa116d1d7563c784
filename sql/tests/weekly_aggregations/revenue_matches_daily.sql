-- Each week's revenue equals the sum of its days' revenue in daily_aggregations, for the weeks whose
-- seven days are all in the daily window: a row is a week where they differ. Warn only: the two views
-- are refreshed on different cadences, so a week can be compared before the daily view caught up.
-- Severity: warn
SELECT
    w.week_start,
    w.revenue,
    sum(d.revenue) AS daily_revenue
FROM weekly_aggregations AS w
INNER JOIN daily_aggregations AS d ON d.day >= w.week_start AND d.day < w.week_start + 7
GROUP BY w.week_start, w.revenue
HAVING count(*) = 7 AND w.revenue <> sum(d.revenue)
