-- Hand-off: complete_and_claim leases the steps its own completions made ready
-- to the completing worker, when it has free slots and serves their queue, and
-- no ready step comes before them in the claim's order; never for a paused or
-- limited queue.
-- A downstream step keeps its run's start (run_at), so claims finish older
-- runs first.

--   a --> b --> c
SELECT baton.define_workflow('ho_chain', $${"queue": "ho_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "c", "after": ["b"]}]}$$);
--   r --> x, y, z   (fan-out)
SELECT baton.define_workflow('ho_fan', $${"queue": "ho_fan_q", "steps": [
    {"name": "r"}, {"name": "x", "after": ["r"]}, {"name": "y", "after": ["r"]}, {"name": "z", "after": ["r"]}]}$$);
--   s --> t, where t runs on another queue
SELECT baton.define_workflow('ho_split', $${"queue": "ho_q", "steps": [
    {"name": "s"}, {"name": "t", "after": ["s"], "queue": "ho_other_q"}]}$$);

-- 1. A chain: each turn completes one step and gets the next, under a fresh
--    lease, with its upstream's output: the step never waits as ready.
SELECT baton.enqueue_workflow('ho_chain', '{"n": "chain"}') AS chain \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT step, attempt, input, upstream, lease_token IS NOT NULL AS leased
  FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], ARRAY['"a out"']::jsonb[], 'w1', ARRAY['ho_q'], 1);
SELECT name, status, worker, attempt, lease_token IS NOT NULL AS leased, lease_expires_at > now() AS lease_ahead
  FROM baton.steps WHERE run_id = :'chain' ORDER BY step_no;
-- The handed step is like any claimed one: heartbeat it, then complete it (and get c).
SELECT step_id AS b, lease_token AS bt FROM baton.steps WHERE run_id = :'chain' AND name = 'b' \gset
SELECT baton.heartbeat(:b, :'bt') > now() AS heartbeat_ok;
SELECT step, upstream FROM baton.complete_and_claim(ARRAY[:b]::bigint[], ARRAY[:'bt']::uuid[], ARRAY['"b out"']::jsonb[], 'w1', ARRAY['ho_q'], 1);
SELECT step_id AS c, lease_token AS ct FROM baton.steps WHERE run_id = :'chain' AND name = 'c' \gset
SELECT count(*) AS claimed_after_last FROM baton.complete_and_claim(ARRAY[:c]::bigint[], ARRAY[:'ct']::uuid[], ARRAY['"c out"']::jsonb[], 'w1', ARRAY['ho_q'], 1);
SELECT status, output FROM baton.runs WHERE id = :'chain';
SELECT step, attempt, worker, outcome FROM baton.step_attempts WHERE workflow_id = :'chain' ORDER BY step_id;
SELECT cancel_unfinished_runs();

-- 1b. The hand-off keeps the claim's order: with an older run's step of the
--    same priority ready in the queue, that one is claimed, and the
--    made-ready step waits as ready.
SELECT baton.enqueue_workflow('ho_chain', '{"n": "chain"}') AS chain \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT baton.enqueue_workflow('ho_chain', '{"n": "older"}', run_at => now() - interval '1 hour') AS older \gset
SELECT step, input FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], NULL, 'w1', ARRAY['ho_q'], 1);
SELECT r.input ->> 'n' AS run, s.name, s.status FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE s.run_id IN (:'chain', :'older') AND s.status IN ('ready', 'running') ORDER BY 1, 2;
SELECT cancel_unfinished_runs();

-- 2. A fan-out: the hand-off fills the worker's free slots (max_steps) and
--    no more; the rest is ready for any worker.
SELECT baton.enqueue_workflow('ho_fan') AS fan \gset
SELECT step_id AS r, lease_token AS rt FROM baton.claim_steps('w1', ARRAY['ho_fan_q']) \gset
SELECT step FROM baton.complete_and_claim(ARRAY[:r]::bigint[], ARRAY[:'rt']::uuid[], NULL, 'w1', ARRAY['ho_fan_q'], 2) ORDER BY step;
SELECT name, status, worker FROM baton.steps WHERE run_id = :'fan' ORDER BY step_no;
SELECT step FROM baton.claim_steps('w2', ARRAY['ho_fan_q'], 5);
SELECT cancel_unfinished_runs();

-- 3. Not to a worker that does not serve the step's queue; nor through
--    complete_steps, which claims nothing.
SELECT baton.enqueue_workflow('ho_split') AS split \gset
SELECT step_id AS s, lease_token AS st FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT count(*) AS handed_to_w1 FROM baton.complete_and_claim(ARRAY[:s]::bigint[], ARRAY[:'st']::uuid[], NULL, 'w1', ARRAY['ho_q'], 4);
SELECT name, status, worker FROM baton.steps WHERE run_id = :'split' ORDER BY step_no;
SELECT baton.enqueue_workflow('ho_chain') AS chain2 \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT status FROM baton.complete_steps(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[]);
SELECT name, status, worker FROM baton.steps WHERE run_id = :'chain2' ORDER BY step_no;
SELECT cancel_unfinished_runs();

-- 4. Not for a queue with a limit: there the claims count the running steps.
--    With the limit reached by another worker's step, the made-ready step
--    waits as ready (a hand-off would have exceeded the limit). Nor for a
--    paused queue.
SELECT baton.enqueue_workflow('ho_chain', '{"n": "limited"}') AS limited \gset
SELECT baton.enqueue_workflow('ho_chain', '{"n": "busy"}') AS busy \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT count(*) AS w9_claims FROM baton.claim_steps('w9', ARRAY['ho_q']);
SELECT baton.configure_queue('ho_q', concurrency => 1);
SELECT count(*) AS claimed_at_limit FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], NULL, 'w1', ARRAY['ho_q'], 4);
SELECT r.input ->> 'n' AS run, s.name, s.status, s.worker FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE s.run_id IN (:'limited', :'busy') AND s.status IN ('ready', 'running') ORDER BY 1, 2;
SELECT cancel_unfinished_runs();
SELECT baton.configure_queue('ho_q', paused => true);
SELECT baton.enqueue_workflow('ho_chain', '{"n": "paused"}') AS paused \gset
SELECT baton.configure_queue('ho_q');
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT baton.configure_queue('ho_q', paused => true);
SELECT count(*) AS claimed_while_paused FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], NULL, 'w1', ARRAY['ho_q'], 4);
SELECT name, status FROM baton.steps WHERE run_id = :'paused' ORDER BY step_no;
SELECT baton.configure_queue('ho_q');
SELECT cancel_unfinished_runs();

-- 5. Not while a step of higher priority waits in the queue: that one is
--    claimed first, and the made-ready step waits its turn.
SELECT baton.enqueue_workflow('ho_chain', '{"n": "low"}') AS low \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT baton.enqueue_workflow('ho_chain', '{"n": "urgent"}', priority => 5) AS urgent \gset
SELECT step, input FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], NULL, 'w1', ARRAY['ho_q'], 1);
SELECT r.input ->> 'n' AS run, s.name, s.status FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE s.run_id IN (:'low', :'urgent') AND s.status IN ('ready', 'running') ORDER BY 1, 2;
SELECT cancel_unfinished_runs();

-- 6. Claim order: a downstream step keeps its run's start, so the older run's
--    next step is claimed before a newer run's first step.
SELECT baton.enqueue_workflow('ho_chain', '{"n": "first"}') AS first \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['ho_q']) \gset
SELECT baton.enqueue_workflow('ho_chain', '{"n": "second"}') AS second \gset
SELECT status FROM baton.complete_steps(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[]);
SELECT step, input ->> 'n' AS run FROM baton.claim_steps('w2', ARRAY['ho_q'], 1);
SELECT (SELECT run_at FROM baton.steps WHERE run_id = :'first' AND name = 'b')
     = (SELECT run_at FROM baton.steps WHERE run_id = :'first' AND name = 'a') AS b_keeps_run_start;
SELECT cancel_unfinished_runs();
