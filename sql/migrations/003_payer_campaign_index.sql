-- campaign_aggregations attributes each payment of its window to the payer's campaign (users.campaign_id).
-- This index hands it (user_id, campaign_id) for the users who came through a campaign, in user_id order,
-- so the view looks up all of the window's payers in one sorted pass over a small index (no heap visits),
-- rather than one descent of users_pkey and one heap fetch per payment: at the reference size (bench/)
-- 14k payers read about 900 blocks instead of 56k. Organic users (campaign_id NULL) are left out.
-- The runner applies this file once, inside a transaction of its own; CREATE INDEX holds off writes to
-- users while it builds, for a time that grows with the number of users.
CREATE INDEX users_payer_campaign_idx ON users (user_id) INCLUDE (campaign_id) WHERE campaign_id IS NOT NULL;
