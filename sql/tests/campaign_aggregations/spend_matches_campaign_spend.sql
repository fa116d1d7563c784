-- Each campaign's spend equals the sum of its campaign_spend over the window's 90 UTC days: a row is a
-- campaign where they differ.
-- Severity: error
SELECT
    ca.campaign_id,
    ca.spend,
    coalesce(s.amount, 0) AS campaign_spend
FROM campaign_aggregations AS ca
LEFT JOIN (
    SELECT
        cs.campaign_id,
        sum(cs.amount) AS amount
    FROM campaign_spend AS cs
    WHERE
        cs.spend_date >= (now() AT TIME ZONE 'UTC')::date - 90
        AND cs.spend_date < (now() AT TIME ZONE 'UTC')::date
    GROUP BY cs.campaign_id
) AS s ON ca.campaign_id = s.campaign_id
WHERE ca.spend <> coalesce(s.amount, 0)
