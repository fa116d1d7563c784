-- Source tables of the product-analytics app, with the indexes the materialized views read through.
-- Every timestamp is a timestamptz (an instant); views bucket instants into UTC days and weeks.
-- The runner applies this file once, inside a transaction of its own.

CREATE TABLE campaigns (
    campaign_id bigint PRIMARY KEY,
    name text NOT NULL,
    channel text NOT NULL,
    started_on date NOT NULL
);

COMMENT ON TABLE campaigns IS
'Paid acquisition campaigns. Users who came through no campaign are organic and have no row here.';
COMMENT ON COLUMN campaigns.campaign_id IS 'Campaign identifier, assigned by the marketing tool.';
COMMENT ON COLUMN campaigns.name IS 'Human-readable campaign name.';
COMMENT ON COLUMN campaigns.channel IS
'Acquisition channel the campaign runs on (search, social, display, email, podcast, ...).';
COMMENT ON COLUMN campaigns.started_on IS 'First day (UTC) the campaign ran.';

CREATE TABLE users (
    user_id bigint PRIMARY KEY,
    signed_up_at timestamptz NOT NULL,
    campaign_id bigint REFERENCES campaigns (campaign_id),
    country text NOT NULL,
    plan text NOT NULL
);

COMMENT ON TABLE users IS 'One row per user account, created at signup.';
COMMENT ON COLUMN users.user_id IS 'User identifier.';
COMMENT ON COLUMN users.signed_up_at IS
'Instant the account was created; its UTC day is the user''s signup cohort.';
COMMENT ON COLUMN users.campaign_id IS 'Campaign that acquired the user; NULL for organic users.';
COMMENT ON COLUMN users.country IS 'Country of the user at signup, ISO 3166-1 alpha-2 code.';
COMMENT ON COLUMN users.plan IS 'Current subscription plan (free, pro, team).';

-- Window reads of signups by time (daily, cohort, weekly, campaign views).
CREATE INDEX users_signed_up_at_idx ON users (signed_up_at) INCLUDE (campaign_id);
-- Foreign key lookups and per-campaign reads.
CREATE INDEX users_campaign_id_idx ON users (campaign_id);

CREATE TABLE events (
    event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (user_id),
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL
);

COMMENT ON TABLE events IS
'Product events emitted by users'' clients; any event makes its user active on that UTC day.';
COMMENT ON COLUMN events.event_id IS 'Event identifier, assigned on insert.';
COMMENT ON COLUMN events.user_id IS 'User who emitted the event.';
COMMENT ON COLUMN events.event_type IS
'Kind of event (signup, session_start, page_view, feature_used, search, invite_sent, ...).';
COMMENT ON COLUMN events.occurred_at IS 'Instant the event happened on the client.';

-- Window reads of activity (daily and weekly views): the INCLUDE column lets them count users from the index.
CREATE INDEX events_occurred_at_idx ON events (occurred_at) INCLUDE (user_id);
-- Foreign key lookups and per-user probes of one day (cohort retention).
CREATE INDEX events_user_id_occurred_at_idx ON events (user_id, occurred_at);

CREATE TABLE payments (
    payment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (user_id),
    amount numeric(12, 2) NOT NULL CHECK (amount > 0),
    paid_at timestamptz NOT NULL
);

COMMENT ON TABLE payments IS
'Successful payments (subscription renewals and one-off purchases); refunds are not recorded here.';
COMMENT ON COLUMN payments.payment_id IS 'Payment identifier, assigned on insert.';
COMMENT ON COLUMN payments.user_id IS 'User who paid.';
COMMENT ON COLUMN payments.amount IS 'Amount paid, in the reporting currency; always positive.';
COMMENT ON COLUMN payments.paid_at IS 'Instant the payment succeeded.';

-- Window reads of revenue: the INCLUDE columns let the views sum revenue from the index.
CREATE INDEX payments_paid_at_idx ON payments (paid_at) INCLUDE (user_id, amount);
-- Foreign key lookups and per-user revenue.
CREATE INDEX payments_user_id_idx ON payments (user_id);

CREATE TABLE campaign_spend (
    campaign_id bigint NOT NULL REFERENCES campaigns (campaign_id),
    spend_date date NOT NULL,
    amount numeric(12, 2) NOT NULL,
    PRIMARY KEY (campaign_id, spend_date)
);

COMMENT ON TABLE campaign_spend IS
'Advertising spend per campaign and UTC day, as billed by the ad platforms.';
COMMENT ON COLUMN campaign_spend.campaign_id IS 'Campaign the money was spent on.';
COMMENT ON COLUMN campaign_spend.spend_date IS 'UTC day the spend was incurred.';
COMMENT ON COLUMN campaign_spend.amount IS 'Amount spent that day, in the reporting currency.';

-- Window reads of spend across all campaigns (the primary key leads with campaign_id).
CREATE INDEX campaign_spend_spend_date_idx ON campaign_spend (spend_date) INCLUDE (campaign_id, amount);
