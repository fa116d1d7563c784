-- Indexes that hand the activity views their (UTC day, user) and (UTC week, user) pairs already sorted.
-- The runner applies this file once, inside a transaction of its own; on a large events table each
-- CREATE INDEX holds off writes to events while it builds (about 30 s for 11M rows, bench/).
--
-- Counting distinct users per day or week from events (occurred_at) means hashing or sorting every event
-- of the window (count(DISTINCT ...) cannot run in parallel): about 7x the time of reading the window
-- (docs/benchmarks.md). Keyed on the UTC bucket and the user, an index returns each bucket's users in
-- order, so the views group them as they stream past, reading only the window's entries.
-- occurred_at is INCLUDEd because PostgreSQL's planner considers an index-only scan only when the index
-- holds every column the query mentions, even one it reads only through the key's expression.

-- daily_aggregations: active users and events per UTC day.
CREATE INDEX events_utc_day_user_idx
ON events (((occurred_at AT TIME ZONE 'UTC')::date), user_id) INCLUDE (occurred_at);

-- weekly_aggregations: active users per ISO week (Monday, UTC), and those also active the week before.
CREATE INDEX events_utc_week_user_idx
ON events ((date_trunc('week', occurred_at AT TIME ZONE 'UTC')::date), user_id) INCLUDE (occurred_at);
