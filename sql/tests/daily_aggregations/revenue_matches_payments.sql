-- Each day's revenue equals the sum of the payments made that UTC day, and the window's total equals
-- the sum of the payments in the window: a row is a day where they differ.
-- Severity: error
SELECT
    d.day,
    d.revenue,
    coalesce(p.amount, 0) AS payments
FROM daily_aggregations AS d
LEFT JOIN (
    SELECT
        (pay.paid_at AT TIME ZONE 'UTC')::date AS day,
        sum(pay.amount) AS amount
    FROM payments AS pay
    GROUP BY (pay.paid_at AT TIME ZONE 'UTC')::date
) AS p ON d.day = p.day
WHERE d.revenue <> coalesce(p.amount, 0)
