-- What did each campaign cost, how many users did it bring, and how much revenue do its users bring back?
-- Grain: one row per campaign in campaigns (organic users belong to no campaign and are left out).
-- Cadence: daily
--
-- Window: the 90 complete UTC days from today - 90 to today - 1; today (UTC) is left out.
-- Days are UTC days whatever the session TimeZone. Signups, spend and payments are filtered on their
-- indexed date or timestamp, so a refresh reads the window, not all history.
-- Spend and revenue are each summed in their own CTE per campaign, never after a join that could repeat a
-- row (to signups or activity rows), which would multiply them.
CREATE MATERIALIZED VIEW campaign_aggregations AS
WITH campaign_signups AS (
    SELECT
        u.campaign_id,
        count(*) AS signups
    FROM users AS u
    WHERE
        u.campaign_id IS NOT NULL
        AND u.signed_up_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND u.signed_up_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
    GROUP BY u.campaign_id
),

campaign_window_spend AS (
    SELECT
        cs.campaign_id,
        sum(cs.amount) AS spend
    FROM campaign_spend AS cs
    WHERE
        cs.spend_date >= (now() AT TIME ZONE 'UTC')::date - 90
        AND cs.spend_date < (now() AT TIME ZONE 'UTC')::date
    GROUP BY cs.campaign_id
),

-- Revenue is attributed through the payer's campaign (users.campaign_id), which no payment row carries. The
-- window's payments are read once (window_payments), and their payers looked up in one sorted pass over
-- users_payer_campaign_idx (user_id = ANY of the payers, which PostgreSQL 17+ reads leaf page by leaf page),
-- instead of one index descent per payment. Each payment matches one user at most (users.user_id is the
-- key), so no amount is counted twice.
window_payments AS MATERIALIZED (
    SELECT
        p.user_id,
        p.amount
    FROM payments AS p
    WHERE
        p.paid_at >= ((now() AT TIME ZONE 'UTC')::date - 90)::timestamp AT TIME ZONE 'UTC'
        AND p.paid_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
),

campaign_revenue AS (
    SELECT
        u.campaign_id,
        sum(wp.amount) AS revenue
    FROM window_payments AS wp
    INNER JOIN users AS u ON wp.user_id = u.user_id
    WHERE
        u.campaign_id IS NOT NULL
        AND u.user_id = ANY(ARRAY(SELECT DISTINCT w.user_id FROM window_payments AS w))
    GROUP BY u.campaign_id
)

SELECT
    c.campaign_id,
    c.name AS campaign_name,
    c.channel,
    c.started_on,
    coalesce(su.signups, 0) AS signups,
    coalesce(sp.spend, 0)::numeric(14, 2) AS spend,
    coalesce(rv.revenue, 0)::numeric(14, 2) AS revenue,
    round((coalesce(rv.revenue, 0) - sp.spend) / nullif(sp.spend, 0), 4) AS roi,
    round(coalesce(rv.revenue, 0) / nullif(sp.spend, 0), 4) AS roas,
    round(coalesce(sp.spend, 0) / nullif(su.signups, 0), 2)::numeric(14, 2) AS cac
FROM campaigns AS c
LEFT JOIN campaign_signups AS su ON c.campaign_id = su.campaign_id
LEFT JOIN campaign_window_spend AS sp ON c.campaign_id = sp.campaign_id
LEFT JOIN campaign_revenue AS rv ON c.campaign_id = rv.campaign_id
WITH NO DATA;

CREATE UNIQUE INDEX campaign_aggregations_key ON campaign_aggregations (campaign_id);

-- Column descriptions: the column schema in Dagster and \d+ campaign_aggregations in psql both show them.
COMMENT ON COLUMN campaign_aggregations.campaign_id IS 'Campaign identifier (the key).';
COMMENT ON COLUMN campaign_aggregations.campaign_name IS 'Human-readable campaign name.';
COMMENT ON COLUMN campaign_aggregations.channel IS 'Acquisition channel the campaign runs on.';
COMMENT ON COLUMN campaign_aggregations.started_on IS 'First day (UTC) the campaign ran.';
COMMENT ON COLUMN campaign_aggregations.signups IS
'Users acquired by the campaign whose signed_up_at falls in the window.';
COMMENT ON COLUMN campaign_aggregations.spend IS
'Sum of campaign_spend.amount over the window''s spend dates.';
COMMENT ON COLUMN campaign_aggregations.revenue IS
'Payments made in the window by every user the campaign ever acquired (not only the window''s signups).';
COMMENT ON COLUMN campaign_aggregations.roi IS
'Return on investment = (revenue - spend) / spend: the profit per unit spent; 0 is break-even; NULL without spend.';
COMMENT ON COLUMN campaign_aggregations.roas IS
'Return on ad spend = revenue / spend: the revenue per unit spent; 1 is break-even; NULL without spend.';
COMMENT ON COLUMN campaign_aggregations.cac IS
'Customer acquisition cost = spend / signups; NULL without signups in the window.';
