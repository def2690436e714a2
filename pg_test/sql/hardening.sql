-- The core's answers to extreme values, odd shapes and large backlogs (the
-- fifteen defects of the hardening review, issue 11): each case here failed,
-- hung or misbehaved before its fix.
SET client_min_messages = warning;

-- Intervals: positive, no negative part, at most 10 years (22023 naming the
-- field), so that no lease, timeout or backoff arithmetic can overflow.
SELECT sqlstate_of($$SELECT baton.define_workflow('h_big', '{"steps": [{"name": "a", "timeout": "300000 years"}]}')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow('h_mixed', '{"steps": [{"name": "a", "timeout": "1 month -29 days"}]}')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow('h_neg', '{"steps": [{"name": "a", "timeout": "1 day -1 second"}]}')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow('h_bo', '{"steps": [{"name": "a", "backoff": {"max": "300000 years", "multiplier": 1000}}]}')$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', lease => '300000 years')$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', lease => '1 month -29 days')$$);
SELECT sqlstate_of($$SELECT * FROM baton.complete_and_claim('{}', '{}', '{}', 'w', lease => '11 years')$$);
SELECT sqlstate_of($$SELECT baton.heartbeat(1, gen_random_uuid(), '300000 years')$$);
SELECT sqlstate_of($$SELECT baton.release_step(1, gen_random_uuid(), '-1 second')$$);

-- The longest allowed: a 10-year timeout heartbeats, and a backoff that
-- multiplies by 1000 up to 10 years still retries at its sixth attempt (it
-- used to raise 22008 and leave the step running).
SELECT baton.define_workflow('h_long', $${"queue": "h_long", "steps": [{"name": "a", "timeout": "10 years",
    "max_attempts": 10, "backoff": {"initial": "1 second", "max": "10 years", "multiplier": 1000}}]}$$);
SELECT baton.enqueue_workflow('h_long') IS NOT NULL AS enqueued;
SELECT step_id AS l, lease_token AS lt FROM baton.claim_steps('hw', ARRAY['h_long'], lease => '10 years') \gset
SELECT baton.heartbeat(:l, :'lt', '10 years') > now() + interval '9 years' AS heartbeat_far_ahead;
UPDATE baton.steps SET attempt = 6 WHERE step_id = :l;
SELECT baton.fail_step(:l, :'lt', 'sixth failure');
SELECT status, run_at > now() + interval '9 years' AS backoff_at_the_cap, run_at < now() + interval '12 years' AS not_past_it
  FROM baton.workflow_steps WHERE step_id = :l;

-- One bad row never stops a round for everyone: a lease whose reclaim fails
-- (a timeout stored before these limits, written here by hand) is logged and
-- skipped, and another expired lease is reclaimed in the same round.
SELECT baton.define_workflow('h_bad', $${"queue": "h_bad", "steps": [{"name": "a"}]}$$);
SELECT count(baton.enqueue_workflow('h_bad')) FROM generate_series(1, 2);
SELECT count(*) FROM baton.claim_steps('hw', ARRAY['h_bad'], 2, '1 hour');
UPDATE baton.steps SET lease_expires_at = now() - interval '1 minute' WHERE queue = 'h_bad';
UPDATE baton.steps SET timeout = interval '300000 years'
 WHERE step_id = (SELECT min(step_id) FROM baton.steps WHERE queue = 'h_bad');
SET client_min_messages = error;  -- the WARNING names the run
SELECT (baton._tick() ->> 'reclaimed')::int >= 1 AS round_went_on;
SET client_min_messages = warning;
SELECT status, attempt FROM baton.steps WHERE queue = 'h_bad' ORDER BY step_id;
UPDATE baton.steps SET timeout = NULL WHERE queue = 'h_bad';

-- Names are at most 200 bytes, keys at most 1000 (22023): a long queue name
-- once broke every wake-up of the database (NOTIFY payloads are limited).
SELECT baton.define_workflow('h_ok', '{"queue": "h_ok", "steps": [{"name": "a"}]}');
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('h_ok', queue => repeat('q', 9000), run_at => now() + interval '1 second')$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('h_ok', queue => repeat('q', 201))$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('h_ok', idempotency_key => repeat('k', 1001))$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('h_ok', ARRAY['{}']::jsonb[], ARRAY[repeat('k', 1001)])$$);
SELECT sqlstate_of($$SELECT baton.configure_queue(repeat('q', 201))$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', ARRAY[repeat('q', 201)])$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps(repeat('w', 201))$$);
SELECT sqlstate_of($$SELECT baton.checkpoint(1, gen_random_uuid(), repeat('k', 1001), '1')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow(repeat('x', 201), '{"steps": [{"name": "a"}]}')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow('h_q', jsonb_build_object('queue', repeat('q', 201), 'steps', '[{"name": "a"}]'::jsonb))$$);
SELECT baton.enqueue_workflow('h_ok', queue => repeat('q', 200), idempotency_key => repeat('k', 1000)) IS NOT NULL AS longest_names_ok;

-- A delayed step whose queue name is too long for a NOTIFY payload (stored
-- before names were limited, written here by hand) still comes due, and so
-- do the others of the same round.
SELECT baton.enqueue_workflow('h_ok', run_at => now() + interval '1 hour') AS long_q \gset
SELECT baton.enqueue_workflow('h_ok', run_at => now() + interval '1 hour') AS short_q \gset
UPDATE baton.steps SET queue = repeat('q', 9000) WHERE run_id = :'long_q';
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE run_id IN (:'long_q', :'short_q');
SELECT (baton._tick() ->> 'woken')::int >= 1 AS woken;
SELECT s.run_id = :'long_q' AS long_name, s.status FROM baton.steps s WHERE s.run_id IN (:'long_q', :'short_q') ORDER BY 1;
DELETE FROM baton.runs WHERE id IN (:'long_q', :'short_q');

-- Arrays are one-dimensional and indexed from 1 (22023): a 2-D input once
-- became {} and lost its keys, outputs indexed from 0 went to the wrong step.
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('h_ok', ARRAY[['{}', '{}'], ['{}', '{}']]::jsonb[])$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('h_ok', ARRAY['{}', '{}']::jsonb[], ARRAY[['a', 'b']])$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('h_ok', '[0:1]={"{}","{}"}'::jsonb[])$$);
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps('[0:1]={1,2}'::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()])$$);
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps(ARRAY[1, 2], ARRAY[gen_random_uuid(), gen_random_uuid()], '[0:1]={"{}","{}"}'::jsonb[])$$);
SELECT sqlstate_of($$SELECT * FROM baton.complete_and_claim(ARRAY[[1, 2]], ARRAY[[gen_random_uuid(), gen_random_uuid()]], NULL, 'w')$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', '[0:0]={h_ok}'::text[])$$);
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', ARRAY[['h_ok']])$$);

-- A NULL step_id or lease_token is 22004 naming it (it was BT001).
SELECT sqlstate_of($$SELECT baton.complete_step(NULL, gen_random_uuid())$$);
SELECT sqlstate_of($$SELECT baton.complete_step(1, NULL)$$);
SELECT sqlstate_of($$SELECT baton.heartbeat(NULL, gen_random_uuid())$$);
SELECT sqlstate_of($$SELECT baton.heartbeat(1, NULL)$$);
SELECT sqlstate_of($$SELECT baton.checkpoint(NULL, gen_random_uuid(), 'k', '1')$$);
SELECT sqlstate_of($$SELECT baton.checkpoint(1, NULL, 'k', '1')$$);
SELECT sqlstate_of($$SELECT baton.release_step(NULL, gen_random_uuid())$$);
SELECT sqlstate_of($$SELECT baton.release_step(1, NULL)$$);
SELECT sqlstate_of($$SELECT baton.fail_step(NULL, gen_random_uuid(), 'x')$$);
SELECT sqlstate_of($$SELECT baton.fail_step(1, NULL, 'x')$$);

-- A heartbeat inside a long transaction: its lease runs from the clock, not
-- from the transaction's start (it returned a time already past).
SELECT baton.enqueue_workflow('h_ok') IS NOT NULL AS enqueued;
BEGIN;
SELECT step_id AS hb, lease_token AS hbt FROM baton.claim_steps('hw', ARRAY['h_ok']) \gset
SELECT pg_sleep(0.3);
SELECT baton.heartbeat(:hb, :'hbt', '100 milliseconds') > clock_timestamp() AS expiry_ahead_of_the_clock;
COMMIT;
-- A delayed release: scheduled, claimable after the delay, the attempt not counted.
SELECT baton.release_step(:hb, :'hbt', '1 hour');
SELECT status, attempt, run_at > now() + interval '59 minutes' AS later FROM baton.workflow_steps WHERE step_id = :hb;
SELECT count(*) AS claimable_now FROM baton.claim_steps('hw', ARRAY['h_ok']) WHERE step_id = :hb;
SELECT cancel_unfinished_runs();

-- Reads of a claim, the function itself, by buffers (a scan would read
-- thousands). The first call of the session plans the statements and reads
-- the catalogs, so each case is measured on a later call.
SELECT baton.define_workflow('h_busy', '{"queue": "h_busy", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.define_workflow('h_idle', '{"queue": "h_idle", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT count(*) FROM unnest(baton.enqueue_workflows('h_busy', array_fill('{}'::jsonb, ARRAY[20000])));
DO $$ BEGIN
    FOR i IN 1 .. 20 LOOP PERFORM baton.claim_steps('busy', ARRAY['h_busy'], 1000, '1 hour'); END LOOP;
END $$;
SELECT status, count(*) FROM baton.steps WHERE queue = 'h_busy' GROUP BY status ORDER BY status;
-- (as autovacuum would: the claimed steps' old versions are gone from steps_ready)
VACUUM ANALYZE baton.steps;
-- 20,000 healthy leases in another queue: an empty claim, and a chain's turn
-- that asks for two steps and gets one, read only what they need (the claim's
-- own reclaim walked every running step of the database).
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_idle'], 10)$$) >= 0 AS planned;
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_idle'], 10)$$) < 30 AS empty_claim_reads_few;
CREATE FUNCTION pg_temp.chain_turn_buffers() RETURNS integer
LANGUAGE plpgsql AS $f$
DECLARE
    c record;
BEGIN
    PERFORM baton.enqueue_workflow('h_idle');
    SELECT * INTO c FROM baton.claim_steps('hw', ARRAY['h_idle']);
    RETURN buffers_of(format($$SELECT * FROM baton.complete_and_claim(ARRAY[%s]::bigint[], ARRAY[%L]::uuid[], NULL, 'hw', ARRAY['h_idle'], 2)$$,
                                     c.step_id, c.lease_token));
END $f$;
SELECT pg_temp.chain_turn_buffers() >= 0 AS planned;
SELECT pg_temp.chain_turn_buffers() < 100 AS chain_turn_reads_few;
-- The same 20,000 leases in the claim's own queue: a short claim reads only
-- expired ones.
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_busy'], 10)$$) >= 0 AS planned;
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_busy'], 10)$$) < 30 AS short_claim_reads_few;
-- (cancelling 20,000 runs in one transaction would take as many run locks)
DELETE FROM baton.runs WHERE workflow = 'h_busy';
SELECT cancel_unfinished_runs();

-- 20,000 steps delayed by an hour at a higher priority than the due ones: a
-- claim of one step does not walk past them (they are scheduled, not ready).
SELECT baton.define_workflow('h_delay', '{"queue": "h_delay", "steps": [{"name": "a"}]}');
SELECT count(*) FROM unnest(baton.enqueue_workflows('h_delay', array_fill('{}'::jsonb, ARRAY[20000]),
                                                    priority => 5, run_at => now() + interval '1 hour'));
SELECT count(*) FROM unnest(baton.enqueue_workflows('h_delay', array_fill('{}'::jsonb, ARRAY[10])));
SELECT status, count(*) FROM baton.workflow_steps WHERE queue = 'h_delay' GROUP BY status ORDER BY status;
VACUUM ANALYZE baton.steps;
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_delay'], 1)$$) >= 0 AS planned;
-- (a walk past them would read hundreds of pages; a claim reads about 30)
SELECT buffers_of($$SELECT * FROM baton.claim_steps('hw', ARRAY['h_delay'], 1)$$) < 60 AS claim_skips_delayed;
-- When they come due, the round makes them ready, soonest first, a bounded
-- batch a round (baton.reclaim_batch, 500).
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE queue = 'h_delay' AND status = 'scheduled';
SELECT (baton._tick() ->> 'woken')::int AS queues_woken;
SELECT status, count(*) FROM baton.workflow_steps WHERE queue = 'h_delay' GROUP BY status ORDER BY status;
DELETE FROM baton.runs WHERE workflow = 'h_delay';

-- No plan of the protocol is JIT-compiled or parallel, whatever the server
-- says (this cluster runs with the defaults, jit = on): every entry point
-- carries its own settings.
SELECT p.oid::regprocedure AS entry_point, p.proconfig @> ARRAY['jit=off', 'max_parallel_workers_per_gather=0'] AS pinned
  FROM pg_proc p
 WHERE p.pronamespace = 'baton'::regnamespace
   AND p.proname IN ('complete_steps', 'complete_and_claim', 'claim_steps', 'fail_step', 'enqueue_workflow',
                     'enqueue_workflows', 'cancel_workflow', '_tick')
 ORDER BY 1::text;
SELECT current_setting('jit') AS server_jit;
