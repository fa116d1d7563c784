-- Demo data for the source tables: campaigns, users, events, payments and campaign spend covering the
-- `days` complete UTC days before today, generated set-based on the server.
--
-- Run inside one transaction, after setting its parameters with set_config(name, value, true):
--   analytics_seed.users  number of users (default 5000); events and payments grow linearly with it
--   analytics_seed.days   history length in days (default 730), ending yesterday (UTC)
--   analytics_seed.seed   any float8 (default 0); the same seed gives the same data
--
-- Shapes: signups grow over the period and dip on weekends; about a quarter of users are organic, the
-- rest come from the campaigns running on their signup day; each campaign spends daily from its start
-- in proportion to the signups it is expected to bring. Users fall into segments (bounce, casual, core)
-- with their own lifetime and activity rate; the chance of being active decays with age since signup
-- and is lower on weekends. Payers pay a monthly subscription while they stay; active users sometimes
-- buy one-off packs.
--
-- Determinism: every random draw is a hash of (seed, entity id, draw id), never random(), so the data
-- does not depend on the plan or the order rows are produced in; identities are assigned in an
-- explicit order. Everything is placed relative to today (UTC) and today itself is left empty, so two
-- runs with the same seed give the same rows, shifted only by the days elapsed between them.

-- One backend and in-memory sorts: the insert order that assigns identities stays explicit and fast.
-- No JIT: the temp tables have no statistics yet, and the compile time would outweigh the work.
SET LOCAL max_parallel_workers_per_gather = 0;
SET LOCAL work_mem = '256MB';
SET LOCAL jit = off;

TRUNCATE events, payments, campaign_spend, users, campaigns RESTART IDENTITY CASCADE;

CREATE TEMP TABLE seed_parameters ON COMMIT DROP AS
SELECT
    greatest(coalesce(nullif(current_setting('analytics_seed.users', true), '')::int, 5000), 0) AS users,
    greatest(coalesce(nullif(current_setting('analytics_seed.days', true), '')::int, 730), 1) AS days,
    hashfloat8extended(
        coalesce(nullif(current_setting('analytics_seed.seed', true), '')::float8, 0), 0
    ) AS salt,
    (now() AT TIME ZONE 'UTC')::date AS today;

-- Nothing below calls random(); seeding it anyway keeps any later use of it reproducible.
SELECT setseed((sp.salt % 1000000) / 1000000.0) FROM seed_parameters AS sp;

-- A uniform draw in [0, 1) for one entity (user, day, campaign), one stream (what the draw decides)
-- and one index within the stream (a day, a slot): 53 bits of a seeded hash.
CREATE OR REPLACE FUNCTION pg_temp.seed_uniform(
    salt bigint, entity bigint, stream int, draw_index bigint DEFAULT 0
)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (hashint8extended(entity, salt # ((stream::bigint << 40) + draw_index)) & 9007199254740991)::float8
        / 9007199254740992
$$;

-- Campaign profile 0 is organic. start_fraction: when in the history the campaign starts;
-- target_cac: what it pays per signup; bounce/core_share: the quality of the users it brings.
CREATE TEMP TABLE seed_profiles ON COMMIT DROP AS
SELECT
    profile.profile_id,
    profile.campaign_name,
    profile.channel,
    profile.start_fraction,
    profile.target_cac,
    profile.bounce_share,
    profile.core_share
FROM (
    VALUES
    (0, NULL, NULL, 0.00, 0.00, 0.40, 0.22),
    (1, 'Brand search', 'search', 0.00, 12.00, 0.35, 0.25),
    (2, 'Short video ads', 'social', 0.15, 7.00, 0.50, 0.14),
    (3, 'Display retargeting', 'display', 0.35, 4.50, 0.55, 0.12),
    (4, 'Partner newsletter', 'email', 0.55, 9.00, 0.40, 0.22),
    (5, 'Podcast sponsorship', 'podcast', 0.75, 15.00, 0.42, 0.24)
) AS profile (profile_id, campaign_name, channel, start_fraction, target_cac, bounce_share, core_share);

INSERT INTO campaigns (campaign_id, name, channel, started_on)
SELECT
    pr.profile_id,
    pr.campaign_name,
    pr.channel,
    sp.today - sp.days + floor(sp.days * pr.start_fraction)::int
FROM seed_profiles AS pr
CROSS JOIN seed_parameters AS sp
WHERE pr.profile_id > 0
ORDER BY pr.profile_id;

-- One row per day of history: its weekday and how many users sign up on it. Signups follow a weight
-- (growth over the period, weekend dip, noise); cumulative floors make the counts add up to `users`.
CREATE TEMP TABLE seed_days ON COMMIT DROP AS
WITH day_weights AS (
    SELECT
        d.day_index,
        sp.today - sp.days + d.day_index AS day,
        extract(ISODOW FROM sp.today - sp.days + d.day_index) IN (6, 7) AS is_weekend,
        round((
            (1 + d.day_index::float8 / sp.days)
            * CASE WHEN extract(ISODOW FROM sp.today - sp.days + d.day_index) IN (6, 7) THEN 0.7 ELSE 1 END
            * (0.85 + 0.3 * pg_temp.seed_uniform(sp.salt, d.day_index, 1))
        )::numeric, 6) AS signup_weight
    FROM seed_parameters AS sp
    CROSS JOIN generate_series(0, sp.days - 1) AS d (day_index)
),

cumulative_weights AS (
    SELECT
        dw.day_index,
        dw.day,
        dw.is_weekend,
        dw.signup_weight,
        sum(dw.signup_weight) OVER (ORDER BY dw.day_index) AS weight_through,
        sum(dw.signup_weight) OVER () AS total_weight
    FROM day_weights AS dw
)

SELECT
    cw.day_index,
    cw.day,
    cw.day::timestamp AT TIME ZONE 'UTC' AS day_start,
    cw.is_weekend,
    -- Weekends are quieter: fewer users come back.
    CASE WHEN cw.is_weekend THEN 0.7 ELSE 1 END::float8 AS activity_factor,
    floor(sp.users * (cw.weight_through - cw.signup_weight) / cw.total_weight)::bigint AS users_before,
    floor(sp.users * cw.weight_through / cw.total_weight)::bigint AS users_through,
    (sp.users * cw.signup_weight / cw.total_weight)::float8 AS expected_signups,
    (SELECT count(*) FROM campaigns AS c WHERE c.started_on <= cw.day) AS running_campaigns
FROM cumulative_weights AS cw
CROSS JOIN seed_parameters AS sp;

ANALYZE seed_days;

-- Behaviour of each user segment: mean lifetime in days, chance of being active on a day early in the
-- lifetime (it decays later), chance of becoming a paying subscriber.
CREATE TEMP TABLE seed_segments ON COMMIT DROP AS
SELECT
    segment.segment_name,
    segment.mean_lifetime_days,
    segment.activity_rate,
    segment.payer_rate
FROM (
    VALUES
    ('bounce', 2::float8, 0.45::float8, 0.005::float8),
    ('casual', 40, 0.32, 0.06),
    ('core', 300, 0.60, 0.35)
) AS segment (segment_name, mean_lifetime_days, activity_rate, payer_rate);

-- One row per user with the hidden traits that drive the generation.
CREATE TEMP TABLE seed_users ON COMMIT DROP AS
WITH day_users AS (
    SELECT
        sd.users_before + k.n AS user_id,
        sd.day_index,
        sd.day_start,
        sd.running_campaigns
    FROM seed_days AS sd
    CROSS JOIN LATERAL generate_series(1, sd.users_through - sd.users_before) AS k (n)
),

drawn_users AS (
    SELECT
        du.user_id,
        du.day_index AS signup_day_index,
        -- Signups peak around midday UTC (mean of two uniform draws).
        du.day_start + interval '24 hours' * (
            pg_temp.seed_uniform(sp.salt, du.user_id, 2) + pg_temp.seed_uniform(sp.salt, du.user_id, 3)
        ) / 2 AS signed_up_at,
        CASE
            WHEN pg_temp.seed_uniform(sp.salt, du.user_id, 4) < 0.25 THEN 0
            ELSE 1 + floor(pg_temp.seed_uniform(sp.salt, du.user_id, 5) * du.running_campaigns)::int
        END AS profile_id,
        pg_temp.seed_uniform(sp.salt, du.user_id, 6) AS segment_draw,
        -ln(1 - pg_temp.seed_uniform(sp.salt, du.user_id, 7)) AS lifetime_draw,
        pg_temp.seed_uniform(sp.salt, du.user_id, 8) AS payer_draw,
        pg_temp.seed_uniform(sp.salt, du.user_id, 9) AS plan_draw,
        pg_temp.seed_uniform(sp.salt, du.user_id, 10) AS country_draw,
        -ln(1 - pg_temp.seed_uniform(sp.salt, du.user_id, 11)) AS conversion_lag_draw,
        sp.days - 1 - du.day_index AS days_left
    FROM day_users AS du
    CROSS JOIN seed_parameters AS sp
),

user_traits AS (
    SELECT
        dr.user_id,
        dr.signup_day_index,
        dr.signed_up_at,
        dr.profile_id,
        dr.plan_draw,
        dr.country_draw,
        dr.conversion_lag_draw,
        dr.days_left,
        sg.activity_rate,
        -- Days since signup of the user's last possible active day (exponential lifetime).
        floor(dr.lifetime_draw * sg.mean_lifetime_days)::int AS lifetime_days,
        dr.payer_draw < sg.payer_rate AS is_payer
    FROM drawn_users AS dr
    INNER JOIN seed_profiles AS pr ON dr.profile_id = pr.profile_id
    INNER JOIN seed_segments AS sg
        ON sg.segment_name = CASE
            WHEN dr.segment_draw < pr.bounce_share THEN 'bounce'
            WHEN dr.segment_draw < 1 - pr.core_share THEN 'casual'
            ELSE 'core'
        END
)

SELECT
    ut.user_id,
    ut.signup_day_index,
    ut.signed_up_at,
    nullif(ut.profile_id, 0) AS campaign_id,
    ut.activity_rate,
    least(ut.lifetime_days, ut.days_left) AS last_active_age,
    ut.is_payer,
    CASE WHEN ut.plan_draw < 0.75 THEN 'pro' ELSE 'team' END AS paid_plan,
    -- Current plan: payers still around at the end of the history keep their paid plan.
    CASE
        WHEN ut.is_payer AND ut.lifetime_days >= ut.days_left
            THEN CASE WHEN ut.plan_draw < 0.75 THEN 'pro' ELSE 'team' END
        ELSE 'free'
    END AS plan,
    CASE
        WHEN ut.country_draw < 0.32 THEN 'US'
        WHEN ut.country_draw < 0.42 THEN 'GB'
        WHEN ut.country_draw < 0.51 THEN 'DE'
        WHEN ut.country_draw < 0.58 THEN 'FR'
        WHEN ut.country_draw < 0.66 THEN 'BR'
        WHEN ut.country_draw < 0.78 THEN 'IN'
        WHEN ut.country_draw < 0.84 THEN 'CA'
        WHEN ut.country_draw < 0.89 THEN 'AU'
        WHEN ut.country_draw < 0.94 THEN 'JP'
        ELSE 'ES'
    END AS country,
    -- Days from signup to the first subscription payment (exponential, mean 4 days).
    least(floor(4 * ut.conversion_lag_draw)::int, ut.lifetime_days, ut.days_left) AS first_payment_age
FROM user_traits AS ut;

ANALYZE seed_users;

INSERT INTO users (user_id, signed_up_at, campaign_id, country, plan)
SELECT su.user_id, su.signed_up_at, su.campaign_id, su.country, su.plan
FROM seed_users AS su
ORDER BY su.user_id;

-- One row per user and day the user is active. The signup day is always active; later days are active
-- with a probability per segment that decays with age since signup and drops on weekends.
CREATE TEMP TABLE seed_active_days ON COMMIT DROP AS
SELECT
    su.user_id,
    sd.day_index,
    age.days_since_signup = 0 AS is_signup_day,
    greatest(sd.day_start, su.signed_up_at) AS active_from,
    sd.day_start + interval '24 hours' AS active_until,
    -- Events that day: 1 + a geometric count (mean about 2.5 more).
    1 + least(floor(-3 * ln(1 - pg_temp.seed_uniform(sp.salt, su.user_id, 21, sd.day_index)))::int, 30)
        AS event_count
FROM seed_users AS su
CROSS JOIN seed_parameters AS sp
CROSS JOIN LATERAL generate_series(0, su.last_active_age) AS age (days_since_signup)
INNER JOIN seed_days AS sd ON su.signup_day_index + age.days_since_signup = sd.day_index
WHERE
    age.days_since_signup = 0
    OR pg_temp.seed_uniform(sp.salt, su.user_id, 20, sd.day_index)
    < su.activity_rate * sd.activity_factor * (0.6 + 0.4 * exp(age.days_since_signup / -14::float8));

ANALYZE seed_active_days;

-- The events of an active day form one session: it starts somewhere in the first 80% of the user's
-- day (at signup on the signup day) and its events are spread over the next fifth of the day.
INSERT INTO events (user_id, event_type, occurred_at)
SELECT
    ev.user_id,
    ev.event_type,
    ev.occurred_at
FROM (
    SELECT
        ad.user_id,
        slot.n AS slot,
        CASE
            WHEN slot.n = 1 AND ad.is_signup_day THEN 'signup'
            WHEN slot.n = 1 THEN 'session_start'
            WHEN type_draw.u < 0.55 THEN 'page_view'
            WHEN type_draw.u < 0.80 THEN 'feature_used'
            WHEN type_draw.u < 0.95 THEN 'search'
            ELSE 'invite_sent'
        END AS event_type,
        ad.active_from + (ad.active_until - ad.active_from) * (
            CASE
                WHEN ad.is_signup_day THEN 0
                ELSE 0.8 * pg_temp.seed_uniform(sp.salt, ad.user_id, 22, ad.day_index)
            END
            + 0.2::float8 * (slot.n - 1) / ad.event_count
        ) AS occurred_at
    FROM seed_active_days AS ad
    CROSS JOIN seed_parameters AS sp
    CROSS JOIN LATERAL generate_series(1, ad.event_count) AS slot (n)
    CROSS JOIN LATERAL (
        SELECT pg_temp.seed_uniform(sp.salt, ad.user_id, 23, (ad.day_index << 8) + slot.n) AS u
    ) AS type_draw
) AS ev
ORDER BY ev.occurred_at, ev.user_id, ev.slot;

-- Subscription renewals every 30 days from the first payment while the payer stays, plus one-off packs
-- bought on about 1.5% of active days.
INSERT INTO payments (user_id, amount, paid_at)
SELECT
    pm.user_id,
    pm.amount,
    pm.paid_at
FROM (
    SELECT
        su.user_id,
        CASE su.paid_plan WHEN 'pro' THEN 12.00 ELSE 49.00 END AS amount,
        greatest(sd.day_start, su.signed_up_at)
        + (sd.day_start + interval '24 hours' - greatest(sd.day_start, su.signed_up_at))
        * pg_temp.seed_uniform(sp.salt, su.user_id, 30, sd.day_index) AS paid_at
    FROM seed_users AS su
    CROSS JOIN seed_parameters AS sp
    CROSS JOIN LATERAL generate_series(su.first_payment_age, su.last_active_age, 30) AS renewal (age)
    INNER JOIN seed_days AS sd ON su.signup_day_index + renewal.age = sd.day_index
    WHERE su.is_payer

    UNION ALL

    SELECT
        ad.user_id,
        CASE floor(4 * pg_temp.seed_uniform(sp.salt, ad.user_id, 32, ad.day_index))
            WHEN 0 THEN 2.99
            WHEN 1 THEN 4.99
            WHEN 2 THEN 9.99
            ELSE 19.99
        END AS amount,
        ad.active_from
        + (ad.active_until - ad.active_from) * pg_temp.seed_uniform(sp.salt, ad.user_id, 33, ad.day_index)
            AS paid_at
    FROM seed_active_days AS ad
    CROSS JOIN seed_parameters AS sp
    WHERE pg_temp.seed_uniform(sp.salt, ad.user_id, 31, ad.day_index) < 0.015
) AS pm
ORDER BY pm.paid_at, pm.user_id;

-- Each campaign spends every day from its start, in proportion to the signups it is expected to bring
-- that day (a share of the paid signups), at its own cost per signup, with day-to-day noise.
INSERT INTO campaign_spend (campaign_id, spend_date, amount)
SELECT
    c.campaign_id,
    sd.day,
    round((
        sd.expected_signups * 0.75 / sd.running_campaigns * pr.target_cac
        * (0.8 + 0.4 * pg_temp.seed_uniform(sp.salt, c.campaign_id, 40, sd.day_index))
    )::numeric, 2)
FROM campaigns AS c
INNER JOIN seed_profiles AS pr ON c.campaign_id = pr.profile_id
INNER JOIN seed_days AS sd ON c.started_on <= sd.day
CROSS JOIN seed_parameters AS sp
ORDER BY c.campaign_id, sd.day;

DROP FUNCTION pg_temp.seed_uniform(bigint, bigint, int, bigint);

ANALYZE campaigns, users, events, payments, campaign_spend;
