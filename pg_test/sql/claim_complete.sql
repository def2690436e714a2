-- claim_steps and complete_step: the happy path through a DAG, what a claim
-- hands the worker, run status and output, and lease errors (BT001).

-- Argument checks: 22023.
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps(NULL)$$) AS null_worker;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('  ')$$) AS blank_worker;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', ARRAY[]::text[])$$) AS empty_queues;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', NULL)$$) AS null_queues;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', max_steps => 0)$$) AS max_steps_0;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', max_steps => 1001)$$) AS max_steps_1001;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', lease => '0')$$) AS lease_0;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', lease => '-5 seconds')$$) AS lease_negative;
SELECT sqlstate_of($$SELECT * FROM baton.claim_steps('w', ARRAY['cc_none'], max_steps => 1000)$$) AS max_steps_1000;

-- Nothing to claim on an empty queue.
SELECT count(*) FROM baton.claim_steps('w1', ARRAY['cc_q'], 10);

--             +-> left --+
--   extract --+          +-> join
--             +-> right -+
--             +-> audit
SELECT baton.define_workflow('cc_dag', $${
    "queue": "cc_q",
    "steps": [
        {"name": "extract"},
        {"name": "left", "after": ["extract"]},
        {"name": "right", "after": ["extract"]},
        {"name": "join", "after": ["left", "right"]},
        {"name": "audit", "after": ["extract"]}
    ]}$$);
SELECT baton.enqueue_workflow('cc_dag', '{"file": "in.csv"}') AS run \gset
SELECT status FROM baton.runs WHERE id = :'run';

-- Only the root step is claimable at first, however many steps are asked for.
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['cc_q'], 10);
SELECT step, attempt, workflow, workflow_id = :'run' AS right_run, input, upstream, checkpoints,
       lease_token IS NOT NULL AS has_token
  FROM claimed;
-- The default lease is 30 seconds from the claim, by the clock.
SELECT c.lease_expires_at BETWEEN s.started_at + interval '30 seconds' AND clock_timestamp() + interval '30 seconds' AS lease_30s,
       c.lease_expires_at = s.lease_expires_at AS stored
  FROM claimed c JOIN baton.steps s USING (step_id);

-- The run is running now; the step is leased to the worker.
SELECT status, started_at IS NOT NULL AS started FROM baton.runs WHERE id = :'run';
SELECT s.name, s.status, s.worker, s.attempt, s.lease_token = c.lease_token AS same_token
  FROM baton.steps s JOIN claimed c USING (step_id);
SELECT count(*) AS nothing_else FROM baton.claim_steps('w2', ARRAY['cc_q'], 10);

-- Completing the root returns the run's status and unblocks its three
-- downstream steps.
SELECT baton.complete_step(step_id, lease_token, '{"rows": 3}') FROM claimed;
SELECT name, status, waiting_on FROM baton.steps WHERE run_id = :'run' ORDER BY step_id;

-- They come with the root's output as upstream, in claim order.
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['cc_q'], 10);
SELECT step, attempt, upstream FROM claimed ORDER BY step_id;

-- join waits for both of its upstreams.
SELECT baton.complete_step(step_id, lease_token, '"L"') FROM claimed WHERE step = 'left';
SELECT name, status, waiting_on FROM baton.steps WHERE run_id = :'run' AND name = 'join';
SELECT count(*) AS join_not_yet FROM baton.claim_steps('w1', ARRAY['cc_q'], 10);
SELECT baton.complete_step(step_id, lease_token, '"R"') FROM claimed WHERE step = 'right';
SELECT name, status, waiting_on FROM baton.steps WHERE run_id = :'run' AND name = 'join';

-- upstream holds the direct upstreams only (not extract).
CREATE TEMP TABLE join_claim AS SELECT * FROM baton.claim_steps('w1', ARRAY['cc_q'], 10);
SELECT step, upstream FROM join_claim;

-- The run succeeds with its last step; its output is {leaf: output}.
SELECT baton.complete_step(step_id, lease_token, '{"ok": true}') FROM claimed WHERE step = 'audit';
SELECT status FROM baton.runs WHERE id = :'run';
SELECT baton.complete_step(step_id, lease_token, '{"joined": 2}') FROM join_claim;
SELECT status, output, error, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'run';
SELECT name, status, output, lease_token IS NULL AS unleased, finished_at IS NOT NULL AS finished
  FROM baton.steps WHERE run_id = :'run' ORDER BY step_id;

-- Every attempt is recorded once.
SELECT step, attempt, worker, outcome, error FROM baton.step_attempts WHERE workflow_id = :'run' ORDER BY step_id;

-- Finished steps cannot be completed (or failed) again: BT001. Neither can an
-- unknown step, a wrong token or a NULL token.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', step_id, lease_token)) AS again
  FROM join_claim;
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, %L, %L)', step_id, lease_token, 'late')) AS fail_after_complete
  FROM join_claim;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', step_id, lease_token)) AS heartbeat_after_complete
  FROM join_claim;
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, %L, %L, %L)', step_id, lease_token, 'k', '1')) AS checkpoint_after_complete
  FROM join_claim;
SELECT sqlstate_of('SELECT baton.complete_step(999999999, gen_random_uuid())') AS unknown_step;
SELECT sqlstate_of('SELECT baton.complete_step(NULL, gen_random_uuid())') AS null_step;
SELECT baton.enqueue_workflow('cc_dag') AS run2 \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['cc_q']);
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, gen_random_uuid())', step_id)) AS wrong_token
  FROM claimed;
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, NULL)', step_id)) AS null_token
  FROM claimed;
-- The failed attempts changed nothing: the right token still works.
SELECT baton.complete_step(step_id, lease_token) FROM claimed;
-- complete_step without an output stores NULL.
SELECT name, status, output IS NULL AS null_output FROM baton.steps
 WHERE run_id = :'run2' AND name = 'extract';

-- A workflow without a queue uses 'default', which is also what claim_steps
-- reads by default. max_steps caps the batch.
SELECT baton.define_workflow('cc_single', '{"steps": [{"name": "only"}]}');
SELECT count(baton.enqueue_workflow('cc_single', jsonb_build_object('i', i))) FROM generate_series(1, 3) i;
SELECT step, input FROM baton.claim_steps('w3', max_steps => 2) ORDER BY input ->> 'i';
SELECT step, input FROM baton.claim_steps('w3', ARRAY['default'], 5);
SELECT count(*) AS empty FROM baton.claim_steps('w3');

SELECT cancel_unfinished_runs();
