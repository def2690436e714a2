-- Flow control (sql/flow.sql, src/rate.rs): rate limits and per-key
-- concurrency, with the existing concurrency limit, pausing and priority.
\set VERBOSITY terse

-- 1. configure_queue checks its new arguments (22023, naming the field).
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', rate_limit => 5)$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', rate_period => '1 second')$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', rate_limit => 0, rate_period => '1 second')$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', rate_limit => 5, rate_period => '-1 second')$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', rate_limit => 5, rate_period => '100 microseconds')$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', concurrency_key => '$.tenant')$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', per_key_concurrency => 1)$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', concurrency_key => '$.', per_key_concurrency => 1)$$);
SELECT sqlstate_of($$SELECT baton.configure_queue('fl_bad', concurrency_key => '$.t', per_key_concurrency => 0)$$);
SELECT count(*) AS configured FROM baton.queues WHERE name = 'fl_bad';

-- 2. The window of a rate limit, at chosen times (in the past, so that the
--    window is over for everyone else): 10 claims per second, taken and
--    given back. Every claim of the last second is counted; one is counted
--    at most a 64th of the period longer.
SELECT 'fl_window_' || gen_random_uuid() AS wq \gset
SELECT baton._rate_take(:'wq', 10, 1000000, 4, '2020-01-01 00:00:00+00') AS first_4,
       baton._rate_take(:'wq', 10, 1000000, 10, '2020-01-01 00:00:00.5+00') AS then_6,
       baton._rate_take(:'wq', 10, 1000000, 10, '2020-01-01 00:00:00.999+00') AS then_none;
SELECT baton._rate_give_back(:'wq', 1000000, 2, '2020-01-01 00:00:00.5+00');
SELECT baton._rate_used(:'wq', 1000000, '2020-01-01 00:00:00.9+00') AS used_after_giving_2_back,
       baton._rate_take(:'wq', 10, 1000000, 10, '2020-01-01 00:00:00.9+00') AS the_2_again;
-- a second later, the first 4 are out of the window (within 1/64 s), the rest not
SELECT baton._rate_used(:'wq', 1000000, '2020-01-01 00:00:01.000001+00') AS at_1s,
       baton._rate_used(:'wq', 1000000, '2020-01-01 00:00:01.02+00') AS at_1_02s,
       baton._rate_used(:'wq', 1000000, '2020-01-01 00:00:01.92+00') AS at_1_92s,
       baton._rate_used(:'wq', 1000000, '2020-01-01 00:00:02.5+00') AS at_2_5s;
-- a new period starts the window again
SELECT baton._rate_take(:'wq', 10, 2000000, 10, '2020-01-01 00:00:01.5+00') AS new_period_10;

-- 3. A rate-limited queue: claims stop at the limit, whatever max_steps
--    asks; what a claim could not use goes back to the window; steps made
--    ready by a completion are not handed off (they are counted by claims).
SELECT 'fl_rate_' || gen_random_uuid() AS rq \gset
SELECT baton.configure_queue(:'rq', rate_limit => 5, rate_period => '1 hour');
SELECT baton.define_workflow('fl_rated', format('{"queue": "%s", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}', :'rq')::jsonb);
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_rated', array_fill('{}'::jsonb, ARRAY[3])));
SELECT count(*) AS first_claim FROM baton.claim_steps('fl-w', ARRAY[:'rq'], 10);
SELECT rate_used FROM baton.queue_stats WHERE queue = :'rq';
-- completing a step claims what follows it through the limit (no hand-off)
SELECT count(*) AS claimed_next FROM (SELECT s.step_id, s.lease_token FROM baton.steps s
                                        WHERE s.queue = :'rq' AND s.status = 'running' LIMIT 1) s,
       LATERAL baton.complete_and_claim(ARRAY[s.step_id], ARRAY[s.lease_token], ARRAY['{}'::jsonb], 'fl-w', ARRAY[:'rq'], 10) c;
SELECT rate_used FROM baton.queue_stats WHERE queue = :'rq';
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_rated', array_fill('{}'::jsonb, ARRAY[3])));
SELECT count(*) AS up_to_the_limit FROM baton.claim_steps('fl-w', ARRAY[:'rq'], 10);
SELECT count(*) AS at_the_limit FROM baton.claim_steps('fl-w', ARRAY[:'rq'], 10);
SELECT ready, running, rate_limit, rate_period, rate_used FROM baton.queue_stats WHERE queue = :'rq';
-- held back, the claim asked for a wake-up when claims are free again (an
-- hour after the first ones, within 1/64 of it): the background worker's
-- timers then tell the queue's workers (NOTIFY baton_ready), once
SELECT baton._rate_next_wake() BETWEEN now() + interval '1 hour' AND now() + interval '1 hour 2 minutes' AS wake_in_an_hour;
SELECT count(*) AS due_now FROM baton._rate_due(now());
SELECT q = :'rq' AS due_then FROM baton._rate_due(now() + interval '1 hour 2 minutes') q;
SELECT count(*) AS told_once FROM baton._rate_due(now() + interval '1 hour 2 minutes');
-- raising the limit lets the rest through
SELECT baton.configure_queue(:'rq', rate_limit => 100, rate_period => '1 hour');
SELECT count(*) AS after_raise FROM baton.claim_steps('fl-w', ARRAY[:'rq'], 10);
SELECT cancel_unfinished_runs();

-- 4. A per-key limit: at most 2 running steps per tenant; runs without a
--    tenant are not limited; a tenant at its limit does not hold back the
--    others queued behind it; completing one admits the next.
SELECT baton.configure_queue('fl_key_q', concurrency_key => '$.tenant', per_key_concurrency => 2);
SELECT baton.define_workflow('fl_keyed', '{"queue": "fl_key_q", "steps": [{"name": "a"}]}');
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed',
       ARRAY(SELECT '{"tenant": "A"}'::jsonb FROM generate_series(1, 6))
       || ARRAY['{"tenant": "B"}'::jsonb, '{"tenant": 7}', '{}', '{"tenant": null}']));
CREATE TEMP TABLE fl_claims AS
SELECT c.step_id, c.lease_token, c.input ->> 'tenant' AS tenant FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100) c;
SELECT tenant, count(*) FROM fl_claims GROUP BY tenant ORDER BY tenant;
SELECT flow_key, count(*) FROM baton.steps WHERE queue = 'fl_key_q' AND status = 'running' GROUP BY flow_key ORDER BY flow_key;
SELECT count(*) AS more FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100);
SELECT baton.complete_step(step_id, lease_token) FROM fl_claims WHERE tenant = 'A' LIMIT 1;
SELECT input ->> 'tenant' AS admitted FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100);
SELECT ready, running, concurrency_key, per_key_concurrency FROM baton.queue_stats WHERE queue = 'fl_key_q';
SELECT cancel_unfinished_runs();

-- 5. With a concurrency limit and priority: the queue's limit bounds the
--    total, and the higher priority tenant is served first.
SELECT baton.configure_queue('fl_key_q', concurrency => 3, concurrency_key => '$.tenant', per_key_concurrency => 2);
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', array_fill('{"tenant": "low"}'::jsonb, ARRAY[3])));
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', array_fill('{"tenant": "high"}'::jsonb, ARRAY[3]), priority => 5));
SELECT input ->> 'tenant' AS tenant, count(*) FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100) GROUP BY 1 ORDER BY 1;
SELECT count(*) AS over_limit FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100);
-- paused: nothing
SELECT baton.configure_queue('fl_key_q', paused => true, concurrency_key => '$.tenant', per_key_concurrency => 2);
SELECT cancel_unfinished_runs();
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', array_fill('{"tenant": "p"}'::jsonb, ARRAY[2])));
SELECT count(*) AS paused_claim FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100);
SELECT baton.configure_queue('fl_key_q', concurrency_key => '$.tenant', per_key_concurrency => 1);
SELECT count(*) AS unpaused_claim FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 100);
SELECT cancel_unfinished_runs();

-- 5a. A completion hands its slot to the next step of its run (the same
--     key), one for one: a chain moves on at the key's limit, a fan-out
--     hands off one step and leaves the other ready.
SELECT baton.configure_queue('fl_key_q', concurrency_key => '$.tenant', per_key_concurrency => 1);
SELECT baton.define_workflow('fl_fan', $${"queue": "fl_key_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "c", "after": ["a"]}]}$$);
SELECT baton.enqueue_workflow('fl_fan', '{"tenant": "F"}') AS fan \gset
SELECT step_id AS fa, lease_token AS fat FROM baton.claim_steps('fl-w', ARRAY['fl_key_q']) \gset
SELECT step AS handed_off FROM baton.complete_and_claim(ARRAY[:fa]::bigint[], ARRAY[:'fat']::uuid[], ARRAY['{}'::jsonb], 'fl-w', ARRAY['fl_key_q'], 2);
SELECT name, status FROM baton.steps WHERE run_id = :'fan' ORDER BY step_no;
SELECT count(*) AS key_at_limit FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 5);
SELECT cancel_unfinished_runs();

-- 5b. One tenant's backlog at the head does not hold back the others behind
--     it, and a run without a key is found too: behind 300 steps of a key at
--     its limit, the claim's next round passes over them in its walk; behind
--     1,100 (a deep backlog: 1,000 or more), it goes key by key.
SELECT baton.configure_queue('fl_key_q', concurrency_key => '$.tenant', per_key_concurrency => 1);
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', array_fill('{"tenant": "flood"}'::jsonb, ARRAY[300])));
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', ARRAY['{"tenant": "Z"}'::jsonb, '{"tenant": "Y"}', '{}']));
SELECT input ->> 'tenant' AS tenant FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 1);
SELECT coalesce(input ->> 'tenant', 'none') AS tenant FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 10) ORDER BY 1;
SELECT count(*) AS nothing_left FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 10);
SELECT cancel_unfinished_runs();
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', array_fill('{"tenant": "flood"}'::jsonb, ARRAY[1100])));
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed', ARRAY['{"tenant": "Z"}'::jsonb, '{"tenant": "Y"}', '{}']));
SELECT input ->> 'tenant' AS tenant FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 1);
BEGIN;
SET LOCAL track_functions = 'pl';
SELECT coalesce(input ->> 'tenant', 'none') AS tenant FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 10) ORDER BY 1;
SELECT funcname, calls AS key_by_key FROM pg_stat_xact_user_functions WHERE funcname = '_claim_by_key';
COMMIT;
SELECT count(*) AS nothing_left FROM baton.claim_steps('fl-w', ARRAY['fl_key_q'], 10);
SELECT cancel_unfinished_runs();

-- 5c. The keys are set when steps are made (map items take their map
--     step's), and again when the queue's concurrency_key changes.
SELECT baton.configure_queue('fl_rekey_q');
SELECT baton.define_workflow('fl_rekey', $${"queue": "fl_rekey_q", "steps": [
    {"name": "list"}, {"name": "each", "after": ["list"], "map": "list"}]}$$);
SELECT baton.enqueue_workflow('fl_rekey', '{"org": {"id": 12}}') AS rk \gset
SELECT name, flow_key FROM baton.steps WHERE run_id = :'rk' ORDER BY step_no;
SELECT baton.configure_queue('fl_rekey_q', concurrency_key => '$.org.id', per_key_concurrency => 1);
SELECT name, flow_key FROM baton.steps WHERE run_id = :'rk' ORDER BY step_no;
SELECT baton.complete_step(step_id, lease_token, '[1, 2]') FROM baton.claim_steps('fl-w', ARRAY['fl_rekey_q']);
SELECT name, map_index, status, flow_key FROM baton.steps WHERE run_id = :'rk' ORDER BY step_no;
SELECT count(*) AS one_item_at_a_time FROM baton.claim_steps('fl-w', ARRAY['fl_rekey_q'], 10);
SELECT baton.configure_queue('fl_rekey_q');
SELECT name, map_index, status, flow_key FROM baton.steps WHERE run_id = :'rk' ORDER BY step_no;
SELECT cancel_unfinished_runs();
-- a path that errs on an input (strict and missing, arithmetic on a string)
-- finds no key: the run is not limited, and neither enqueue nor claim fails
SELECT baton.configure_queue('fl_rekey_q', concurrency_key => 'strict $.org.id + 1', per_key_concurrency => 1);
SELECT baton.enqueue_workflow('fl_rekey', '{"org": {"id": "twelve"}}') IS NOT NULL AS enqueued,
       baton.enqueue_workflow('fl_rekey', '{}') IS NOT NULL AS enqueued_too;
SELECT flow_key, count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.workflow = 'fl_rekey' AND r.finished_at IS NULL GROUP BY flow_key;
SELECT count(*) AS both_claimed FROM baton.claim_steps('fl-w', ARRAY['fl_rekey_q'], 10);
SELECT cancel_unfinished_runs();
SELECT baton.configure_queue('fl_rekey_q');

-- 6. Two claimers at once (dblink): while one claims tenant A's step in an
--    open transaction, the other does not wait for it: it passes over A and
--    takes B's. A key is never admitted past its limit by two claims.
CREATE EXTENSION IF NOT EXISTS dblink;
SELECT dblink_connect('other', format('dbname=%s host=%s port=%s user=%s',
       current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS connected;
SELECT count(*) FROM unnest(baton.enqueue_workflows('fl_keyed',
       ARRAY['{"tenant": "A"}'::jsonb, '{"tenant": "A"}', '{"tenant": "B"}']));
BEGIN;
SELECT input ->> 'tenant' AS this_session FROM baton.claim_steps('fl-w1', ARRAY['fl_key_q'], 1);
SELECT * FROM dblink('other', $$SELECT input ->> 'tenant' FROM baton.claim_steps('fl-w2', ARRAY['fl_key_q'], 5)$$)
    AS t(other_session text);
COMMIT;
SELECT * FROM dblink('other', $$SELECT count(*) FROM baton.claim_steps('fl-w2', ARRAY['fl_key_q'], 5)$$) AS t(after_commit bigint);
SELECT flow_key, count(*) FROM baton.steps WHERE queue = 'fl_key_q' AND status = 'running' GROUP BY 1 ORDER BY 1;
SELECT dblink_disconnect('other');
SELECT cancel_unfinished_runs();
SELECT baton.configure_queue('fl_key_q');
