-- Schedules: schedule / unschedule / the schedules view, the cron
-- arithmetic across daylight-saving changes, and _fire_schedules (the
-- background worker's part): one run per tick with idempotency key
-- schedule:<name>:<tick in UTC>, only the most recent missed tick after
-- downtime, overlap 'skip'. Ticks are made due by moving next_run_at (in the
-- transaction that fires them, so that the background worker never sees a
-- due tick of these schedules) or by firing at a later time.
SET timezone = 'UTC';
SELECT baton.define_workflow('sc_job', '{"queue": "sc_q", "steps": [{"name": "s"}]}');

-- schedule: create with the defaults, then replace.
SELECT baton.schedule('sc_daily', '0 0 * * *', 'sc_job', '{"report": "daily"}');
SELECT name, cron, timezone, workflow, input, overlap, paused,
       next_run_at = date_trunc('day', now()) + interval '1 day' AS next_midnight, last_run_at, last_run_id
  FROM baton.schedules WHERE name = 'sc_daily';
SELECT baton.schedule('sc_daily', '30 6 * * 1-5', 'sc_job', timezone => 'Europe/Berlin', overlap => 'skip', paused => true);
SELECT name, cron, timezone, input, overlap, paused,
       next_run_at = baton._cron_next('30 6 * * 1-5', 'Europe/Berlin', now()) AS next_ok,
       to_char(next_run_at AT TIME ZONE 'Europe/Berlin', 'HH24:MI') AS local_time
  FROM baton.schedules WHERE name = 'sc_daily';
SELECT count(*) AS schedules FROM baton.schedule_entries;
SELECT baton.unschedule('sc_daily') AS removed, baton.unschedule('sc_daily') AS again, baton.unschedule('sc_none') AS unknown;
SELECT count(*) AS schedules FROM baton.schedules;
-- @-names
SELECT baton.schedule('sc_hourly', '@hourly', 'sc_job');
SELECT next_run_at = date_trunc('hour', now()) + interval '1 hour' AS next_hour FROM baton.schedules WHERE name = 'sc_hourly';
SELECT baton.unschedule('sc_hourly');

-- Validation: 22023 for a bad cron, time zone or overlap (croner's own
-- words follow the first part of a bad cron's message), 42704 for an
-- unknown workflow, 22004 for NULLs.
SELECT substring(sqlstate_of($$SELECT baton.schedule('sc_bad', '61 * * * *', 'sc_job')$$) FROM '^.*is not a valid schedule') AS bad_minute,
       substring(sqlstate_of($$SELECT baton.schedule('sc_bad', '* * *', 'sc_job')$$) FROM '^.*is not a valid schedule') AS three_fields,
       substring(sqlstate_of($$SELECT baton.schedule('sc_bad', '', 'sc_job')$$) FROM '^.*is not a valid schedule') AS empty_cron,
       substring(sqlstate_of($$SELECT baton.schedule('sc_bad', '@often', 'sc_job')$$) FROM '^.*is not a valid schedule') AS bad_name;
SELECT sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', 'sc_job', timezone => 'Mars/Olympus')$$) AS bad_timezone;
SELECT sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', 'sc_job', overlap => 'queue')$$) AS bad_overlap,
       sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', 'sc_job', overlap => NULL)$$) AS null_overlap;
SELECT sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', 'sc_nope')$$) AS unknown_workflow;
SELECT sqlstate_of($$SELECT baton.schedule('', '0 * * * *', 'sc_job')$$) AS empty_name,
       sqlstate_of($$SELECT baton.schedule(NULL, '0 * * * *', 'sc_job')$$) AS null_name,
       sqlstate_of($$SELECT baton.schedule('sc_bad', NULL, 'sc_job')$$) AS null_cron,
       sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', NULL)$$) AS null_workflow,
       sqlstate_of($$SELECT baton.schedule('sc_bad', '0 * * * *', 'sc_job', timezone => NULL)$$) AS null_timezone;
SELECT count(*) AS schedules FROM baton.schedules;

-- Cron arithmetic across daylight-saving changes. _cron_next: the first
-- tick after; _cron_prev: the last tick at or before.
-- America/New_York springs forward on 2024-03-10 (02:00 EST -> 03:00 EDT):
-- a 02:30 daily job fires at 03:00 EDT that day.
SELECT a AS after, baton._cron_next('30 2 * * *', 'America/New_York', a) AS next_tick,
       baton._cron_next('30 2 * * *', 'America/New_York', a) AT TIME ZONE 'America/New_York' AS local
  FROM unnest(ARRAY['2024-03-09 08:00Z', '2024-03-10 05:00Z', '2024-03-10 07:00Z']::timestamptz[]) a;
SELECT a AS at, baton._cron_prev('30 2 * * *', 'America/New_York', a) AS prev_tick
  FROM unnest(ARRAY['2024-03-10 06:59Z', '2024-03-10 07:00Z', '2024-03-10 12:00Z', '2024-03-11 06:29:59Z',
                    '2024-03-11 06:30Z']::timestamptz[]) a;
-- ... and falls back on 2024-11-03 (02:00 EDT -> 01:00 EST): a fixed time
-- that happens twice fires once; an hourly job fires every real hour, in
-- both 01:00s (as croner and classic cron run wildcard-hour jobs).
WITH RECURSIVE t(tick, n) AS (
    SELECT baton._cron_next('0 * * * *', 'America/New_York', '2024-11-03 03:30Z'), 1
    UNION ALL SELECT baton._cron_next('0 * * * *', 'America/New_York', tick), n + 1 FROM t WHERE n < 4)
SELECT tick, tick AT TIME ZONE 'America/New_York' AS local FROM t;
SELECT baton._cron_next('30 1 * * *', 'America/New_York', '2024-11-02 12:00Z') AS first,
       baton._cron_next('30 1 * * *', 'America/New_York', '2024-11-03 05:30Z') AS after_first,
       baton._cron_prev('30 1 * * *', 'America/New_York', '2024-11-03 06:45Z') AS prev_in_second_hour,
       baton._cron_prev('0 * * * *', 'America/New_York', '2024-11-03 06:30Z') AS hourly_prev_in_second_hour;
-- Europe/Berlin: 2024-03-31 02:00 CET -> 03:00 CEST, 2024-10-27 03:00 CEST -> 02:00 CET.
SELECT baton._cron_next('30 2 * * *', 'Europe/Berlin', '2024-03-30 12:00Z') AS spring_next,
       baton._cron_prev('30 2 * * *', 'Europe/Berlin', '2024-03-31 05:00Z') AS spring_prev,
       baton._cron_next('30 2 * * *', 'Europe/Berlin', '2024-10-26 12:00Z') AS fall_next,
       baton._cron_next('30 2 * * *', 'Europe/Berlin', '2024-10-27 00:30Z') AS fall_after_first,
       baton._cron_prev('30 2 * * *', 'Europe/Berlin', '2024-10-27 01:45Z') AS fall_prev;
WITH RECURSIVE t(tick, n) AS (
    SELECT baton._cron_next('0 * * * *', 'Europe/Berlin', '2024-03-30 23:30Z'), 1
    UNION ALL SELECT baton._cron_next('0 * * * *', 'Europe/Berlin', tick), n + 1 FROM t WHERE n < 3)
SELECT 'spring' AS change, tick, tick AT TIME ZONE 'Europe/Berlin' AS local FROM t
UNION ALL
(WITH RECURSIVE t(tick, n) AS (
    SELECT baton._cron_next('0 * * * *', 'Europe/Berlin', '2024-10-26 23:30Z'), 1
    UNION ALL SELECT baton._cron_next('0 * * * *', 'Europe/Berlin', tick), n + 1 FROM t WHERE n < 3)
SELECT 'fall', tick, tick AT TIME ZONE 'Europe/Berlin' FROM t)
ORDER BY tick;
-- Ticks are whole minutes, whatever the fraction of the time given.
SELECT baton._cron_next('*/5 * * * *', 'UTC', '2024-01-01 10:04:59.5Z') AS next_tick,
       baton._cron_next('*/5 * * * *', 'UTC', '2024-01-01 10:05:00.5Z') AS next_after_tick,
       baton._cron_prev('*/5 * * * *', 'UTC', '2024-01-01 10:05:00.5Z') AS prev_tick,
       baton._cron_prev('*/5 * * * *', 'UTC', '2024-01-01 10:05:00Z') AS prev_at_tick;

-- Catch-up: a daily schedule whose tick was missed for five days fires once,
-- for the most recent tick (today's midnight), with the schedule's input.
BEGIN;
SELECT baton.schedule('sc_catchup', '0 0 * * *', 'sc_job', '{"from": "schedule"}');
UPDATE baton.schedule_entries SET next_run_at = date_trunc('day', now()) - interval '5 days' WHERE name = 'sc_catchup';
SELECT baton._fire_schedules(now(), 100) AS fired;
COMMIT;
SELECT count(*) AS runs,
       bool_and(idempotency_key = 'schedule:sc_catchup:' || to_char(date_trunc('day', now()), 'YYYY-MM-DD') || 'T00:00:00Z') AS key_ok,
       bool_and(input = '{"from": "schedule"}') AS input_ok, bool_and(status = 'pending') AS pending
  FROM baton.runs WHERE workflow = 'sc_job';
SELECT last_run_at = date_trunc('day', now()) AS last_tick_today,
       last_run_id = (SELECT id FROM baton.runs WHERE workflow = 'sc_job') AS last_run_ok,
       next_run_at = date_trunc('day', now()) + interval '1 day' AS next_tomorrow
  FROM baton.schedules WHERE name = 'sc_catchup';
-- Fired again for the same tick (another session, a restart): still one run.
BEGIN;
UPDATE baton.schedule_entries SET next_run_at = date_trunc('day', now()) WHERE name = 'sc_catchup';
SELECT baton._fire_schedules(now(), 100) AS fired;
SELECT baton._fire_schedules(now(), 100) AS fired_again;
COMMIT;
SELECT count(*) AS runs FROM baton.runs WHERE workflow = 'sc_job';
-- Not due: nothing.
SELECT baton._fire_schedules(now(), 100) AS fired;
-- overlap 'allow' (the default): the next tick makes a run while the last
-- one is unfinished.
SELECT baton._fire_schedules(date_trunc('day', now()) + interval '1 day 1 minute', 100) AS fired;
SELECT count(*) AS runs, count(DISTINCT idempotency_key) AS keys FROM baton.runs WHERE workflow = 'sc_job';
SELECT last_run_at = date_trunc('day', now()) + interval '1 day' AS last_tick_tomorrow FROM baton.schedules WHERE name = 'sc_catchup';
SELECT baton.unschedule('sc_catchup');

-- overlap 'skip': a tick is skipped while the last run is unfinished, and
-- fires again once it finished.
SELECT baton.define_workflow('sc_skip_job', '{"queue": "sc_skip_q", "steps": [{"name": "s"}]}');
BEGIN;
SELECT baton.schedule('sc_skip', '0 0 * * *', 'sc_skip_job', overlap => 'skip');
UPDATE baton.schedule_entries SET next_run_at = date_trunc('day', now()) WHERE name = 'sc_skip';
SELECT baton._fire_schedules(now(), 100) AS fired;
COMMIT;
SELECT baton._fire_schedules(date_trunc('day', now()) + interval '1 day 1 minute', 100) AS fired_while_unfinished;
SELECT count(*) AS runs FROM baton.runs WHERE workflow = 'sc_skip_job';
SELECT last_run_at = date_trunc('day', now()) AS last_tick_still_today,
       next_run_at = date_trunc('day', now()) + interval '2 days' AS skipped_to_the_day_after
  FROM baton.schedules WHERE name = 'sc_skip';
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['sc_skip_q']);
SELECT baton._fire_schedules(date_trunc('day', now()) + interval '2 days 1 minute', 100) AS fired_after_it_finished;
SELECT status, idempotency_key = 'schedule:sc_skip:' || to_char(date_trunc('day', now()) + (n - 1) * interval '2 days', 'YYYY-MM-DD')
                                 || 'T00:00:00Z' AS key_ok
  FROM (SELECT r.*, row_number() OVER (ORDER BY r.id) AS n FROM baton.runs r WHERE r.workflow = 'sc_skip_job') r ORDER BY n;
SELECT baton.unschedule('sc_skip');

-- A paused schedule does not fire.
BEGIN;
SELECT baton.schedule('sc_paused', '0 0 * * *', 'sc_job', paused => true);
UPDATE baton.schedule_entries SET next_run_at = date_trunc('day', now()) WHERE name = 'sc_paused';
SELECT baton._fire_schedules(now(), 100) AS fired;
COMMIT;
SELECT baton.unschedule('sc_paused');

-- The next tick is among the background worker's timers.
SELECT baton.schedule('sc_timer', '0 0 1 1 *', 'sc_job');
SELECT baton._next_due() <= (SELECT next_run_at FROM baton.schedules WHERE name = 'sc_timer') AS counted;
SELECT baton.unschedule('sc_timer');

SELECT cancel_unfinished_runs();
RESET timezone;
