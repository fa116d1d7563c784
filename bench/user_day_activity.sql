-- Which users were active on which UTC day of the last year, and how many events did each emit?
-- Grain: one row per user and UTC day with at least one event, for the 365 complete UTC days before today.
-- Cadence: daily
--
-- The benchmark's stand-in for the large views users will add (about a million rows at the reference
-- size): a users x days view whose REFRESH ... CONCURRENTLY diff costs far more than its query.
-- Events are read for the window only, through events (occurred_at) INCLUDE (user_id).
CREATE MATERIALIZED VIEW user_day_activity AS
SELECT
    e.user_id,
    (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
    count(*) AS events
FROM events AS e
WHERE
    e.occurred_at >= ((now() AT TIME ZONE 'UTC')::date - 365)::timestamp AT TIME ZONE 'UTC'
    AND e.occurred_at < ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
GROUP BY e.user_id, (e.occurred_at AT TIME ZONE 'UTC')::date
WITH NO DATA;

CREATE UNIQUE INDEX user_day_activity_key ON user_day_activity (user_id, day);
