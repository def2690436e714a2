-- complete_steps: many leased steps completed in one call, one row per input
-- in input order; a lost lease gives 'lease_lost' for that element and changes
-- nothing for it, while the others complete.
-- complete_and_claim: a worker's turn in one call: complete, then claim up to
-- max_steps, including steps made ready by the completion itself.

SELECT baton.define_workflow('bt_single', '{"queue": "bt_q", "steps": [{"name": "only"}]}');
--   a --> b
SELECT baton.define_workflow('bt_chain', $${"queue": "bt_chain_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}]}$$);
--   x --> z
--   y            (a leaf of its own)
SELECT baton.define_workflow('bt_fan', $${"queue": "bt_fan_q", "steps": [
    {"name": "x"}, {"name": "y"}, {"name": "z", "after": ["x"]}]}$$);
--   p, q: two independent leaves
SELECT baton.define_workflow('bt_pair', $${"queue": "bt_pair_q", "steps": [
    {"name": "p"}, {"name": "q"}]}$$);

-- Argument checks: arrays of different lengths are 22023; empty arrays give no rows.
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps(ARRAY[1, 2]::bigint[], ARRAY[gen_random_uuid()])$$) AS tokens_short;
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps(ARRAY[1]::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()])$$) AS tokens_long;
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps(ARRAY[1]::bigint[], ARRAY[gen_random_uuid()], ARRAY['1', '2']::jsonb[])$$) AS outputs_long;
SELECT sqlstate_of($$SELECT * FROM baton.complete_steps(ARRAY[1, 2]::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()], ARRAY['1']::jsonb[])$$) AS outputs_short;
SELECT sqlstate_of($$SELECT * FROM baton.complete_and_claim(ARRAY[1, 2]::bigint[], ARRAY[gen_random_uuid()], NULL, 'w1', ARRAY['bt_none'])$$) AS cc_tokens_short;
SELECT count(*) AS empty FROM baton.complete_steps('{}', '{}');
SELECT count(*) AS empty_with_outputs FROM baton.complete_steps('{}', '{}', '{}');
SELECT count(*) AS empty_cc FROM baton.complete_and_claim('{}', '{}', '{}', 'w1', ARRAY['bt_none'], 5);

-- 1. Three single-step runs, claimed together, completed in one call with the
--    middle token wrong. Results come in input order (here: i = 3, 2, 1).
SELECT count(baton.enqueue_workflow('bt_single', jsonb_build_object('i', i))) FROM generate_series(1, 3) i;
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['bt_q'], 10);
SELECT step, input, attempt FROM claimed ORDER BY input ->> 'i';
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT (c.input ->> 'i')::int AS i, r.status
  FROM baton.complete_steps(
         ARRAY(SELECT step_id FROM claimed ORDER BY input ->> 'i' DESC),
         ARRAY(SELECT CASE WHEN input ->> 'i' = '2' THEN gen_random_uuid() ELSE lease_token END
                 FROM claimed ORDER BY input ->> 'i' DESC),
         ARRAY(SELECT jsonb_build_object('done', input -> 'i') FROM claimed ORDER BY input ->> 'i' DESC))
       WITH ORDINALITY AS r(step_id, status, n)
  JOIN claimed c USING (step_id)
 ORDER BY r.n;
-- 1 and 3 succeeded with their outputs, and so did their runs ({leaf: output});
-- 2 is untouched: still running under its lease, its run still running.
SELECT (c.input ->> 'i')::int AS i, s.status, s.output, s.attempt, s.lease_token = c.lease_token AS same_token,
       s.finished_at IS NOT NULL AS finished, r.status AS run_status, r.output AS run_output, steps_left(r.id) AS steps_left
  FROM claimed c JOIN baton.steps s USING (step_id) JOIN baton.runs r ON r.id = s.run_id
 ORDER BY 1;
-- One attempt row per completed step, none for the lost one.
SELECT (c.input ->> 'i')::int AS i, a.attempt, a.worker, a.outcome
  FROM claimed c JOIN baton.step_attempts a USING (step_id) ORDER BY 1;
-- The two completed steps cannot be completed again with their (old) tokens,
-- nor can step 2 with a NULL token or an unknown step: lease_lost, no error.
SELECT (c.input ->> 'i')::int AS i, r.status
  FROM baton.complete_steps(
         ARRAY(SELECT step_id FROM claimed ORDER BY input ->> 'i') || ARRAY[999999999::bigint],
         ARRAY(SELECT CASE WHEN input ->> 'i' = '2' THEN NULL ELSE lease_token END
                 FROM claimed ORDER BY input ->> 'i')
           || ARRAY[gen_random_uuid()])
       WITH ORDINALITY AS r(step_id, status, n)
  LEFT JOIN claimed c USING (step_id)
 ORDER BY r.n;
-- Nothing changed: step 2 still running, no new attempt rows.
SELECT s.status, s.attempt, s.lease_token = c.lease_token AS same_token
  FROM claimed c JOIN baton.steps s USING (step_id) WHERE c.input ->> 'i' = '2';
SELECT count(*) AS attempts FROM baton.step_attempts a JOIN claimed c USING (step_id);
-- Its right token still works; with no outputs array the output is NULL.
SELECT r.status
  FROM baton.complete_steps(ARRAY(SELECT step_id FROM claimed WHERE input ->> 'i' = '2'),
                            ARRAY(SELECT lease_token FROM claimed WHERE input ->> 'i' = '2')) r;
SELECT s.status, s.output IS NULL AS null_output, r.status AS run_status, r.output AS run_output
  FROM claimed c JOIN baton.steps s USING (step_id) JOIN baton.runs r ON r.id = s.run_id
 WHERE c.input ->> 'i' = '2';
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs;

-- 2. Several steps of one run in one batch. x and y complete together: z (after
--    x) becomes ready, the run counts down by two and keeps running.
SELECT baton.enqueue_workflow('bt_fan', '{"f": 1}') AS fan \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['bt_fan_q'], 10);
SELECT step, attempt FROM claimed ORDER BY step_id;
SELECT c.step, r.status
  FROM baton.complete_steps(ARRAY(SELECT step_id FROM claimed ORDER BY step_id),
                            ARRAY(SELECT lease_token FROM claimed ORDER BY step_id),
                            ARRAY(SELECT to_jsonb(step) FROM claimed ORDER BY step_id))
       WITH ORDINALITY AS r(step_id, status, n)
  JOIN claimed c USING (step_id)
 ORDER BY r.n;
SELECT name, status, waiting_on, output FROM baton.steps WHERE run_id = :'fan' ORDER BY step_id;
SELECT status, steps_left(id) AS steps_left, output FROM baton.runs WHERE id = :'fan';
-- z finishes the run; its output holds both leaves, y (done earlier) and z.
SELECT step_id AS z, lease_token AS zt, upstream FROM baton.claim_steps('w1', ARRAY['bt_fan_q'], 10) \gset
SELECT :'upstream'::jsonb AS z_upstream;
SELECT r.step_id = :z AS same_step, r.status
  FROM baton.complete_steps(ARRAY[:z]::bigint[], ARRAY[:'zt']::uuid[], ARRAY['"z"']::jsonb[]) r;
SELECT status, steps_left(id) AS steps_left, output, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'fan';

-- 3. Both leaves of a run in one batch: the run succeeds with both outputs.
SELECT baton.enqueue_workflow('bt_pair') AS pair \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['bt_pair_q'], 10);
SELECT c.step, r.status
  FROM baton.complete_steps(ARRAY(SELECT step_id FROM claimed ORDER BY step_id),
                            ARRAY(SELECT lease_token FROM claimed ORDER BY step_id),
                            ARRAY(SELECT jsonb_build_object('leaf', step) FROM claimed ORDER BY step_id))
       WITH ORDINALITY AS r(step_id, status, n)
  JOIN claimed c USING (step_id)
 ORDER BY r.n;
SELECT status, steps_left(id) AS steps_left, output, error, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'pair';
SELECT step, attempt, worker, outcome FROM baton.step_attempts WHERE workflow_id = :'pair' ORDER BY step_id;

-- 4. One step of a run completes, the other's token is wrong: the run counts
--    down by one only.
SELECT baton.enqueue_workflow('bt_pair') AS pair2 \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['bt_pair_q'], 10);
SELECT c.step, r.status
  FROM baton.complete_steps(ARRAY(SELECT step_id FROM claimed ORDER BY step_id),
                            ARRAY(SELECT CASE WHEN step = 'q' THEN gen_random_uuid() ELSE lease_token END
                                    FROM claimed ORDER BY step_id))
       WITH ORDINALITY AS r(step_id, status, n)
  JOIN claimed c USING (step_id)
 ORDER BY r.n;
SELECT name, status, attempt FROM baton.steps WHERE run_id = :'pair2' ORDER BY step_id;
SELECT status, steps_left(id) AS steps_left, output FROM baton.runs WHERE id = :'pair2';
SELECT count(*) AS attempts FROM baton.step_attempts WHERE workflow_id = :'pair2';

-- 4b. A step named twice in one batch is bad input (22023), whatever its
--     tokens, and nothing of the batch is done: not even the other step.
SELECT baton.enqueue_workflow('bt_pair') AS pair3 \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['bt_pair_q'], 10);
SELECT sqlstate_of(format('SELECT * FROM baton.complete_steps(%L::bigint[], %L::uuid[])',
         ARRAY(SELECT step_id FROM claimed ORDER BY step_id) || ARRAY(SELECT min(step_id) FROM claimed),
         ARRAY(SELECT lease_token FROM claimed ORDER BY step_id) || ARRAY[gen_random_uuid()])) AS repeated_step;
SELECT sqlstate_of(format('SELECT * FROM baton.complete_and_claim(%L::bigint[], %L::uuid[], NULL, %L, %L::text[], 1)',
         ARRAY(SELECT step_id FROM claimed ORDER BY step_id) || ARRAY(SELECT min(step_id) FROM claimed),
         ARRAY(SELECT lease_token FROM claimed ORDER BY step_id) || ARRAY(SELECT lease_token FROM claimed ORDER BY step_id LIMIT 1),
         'w1', ARRAY['bt_pair_q'])) AS repeated_step_cc;
SELECT s.name, s.status, s.lease_token = c.lease_token AS same_token
  FROM claimed c JOIN baton.steps s USING (step_id) ORDER BY s.step_id;
SELECT status FROM baton.runs WHERE id = :'pair3';

-- 5. complete_and_claim on a chain: completing a and claiming in the same call
--    hands out b, made ready by that completion, with a's output as upstream.
SELECT baton.enqueue_workflow('bt_chain', '{"c": 1}') AS chain \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['bt_chain_q']) \gset
CREATE TEMP TABLE turn AS
SELECT * FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], ARRAY['{"a": "out"}']::jsonb[],
                                       'w2', ARRAY['bt_chain_q'], 5, '1 minute');
SELECT step, attempt, workflow, workflow_id = :'chain' AS right_run, input, upstream, checkpoints,
       lease_token IS NOT NULL AS has_token
  FROM turn;
SELECT t.lease_expires_at BETWEEN s.started_at + interval '1 minute' AND clock_timestamp() + interval '1 minute' AS lease_1min
  FROM turn t JOIN baton.steps s USING (step_id);
SELECT name, status, attempt, worker, output FROM baton.steps WHERE run_id = :'chain' ORDER BY step_id;
SELECT step, attempt, worker, outcome FROM baton.step_attempts WHERE workflow_id = :'chain' ORDER BY step_id;
-- b's turn with max_steps => 0 only completes: no rows, the run succeeds.
SELECT count(*) AS claimed
  FROM baton.complete_and_claim(ARRAY(SELECT step_id FROM turn), ARRAY(SELECT lease_token FROM turn),
                                ARRAY['"b out"']::jsonb[], 'w2', ARRAY['bt_chain_q'], 0);
SELECT status, steps_left(id) AS steps_left, output, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'chain';

-- max_steps => 0 leaves the step it made ready unclaimed.
SELECT baton.enqueue_workflow('bt_chain', '{"c": 2}') AS chain2 \gset
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('w1', ARRAY['bt_chain_q']) \gset
SELECT count(*) AS claimed
  FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], ARRAY['1']::jsonb[],
                                'w1', ARRAY['bt_chain_q'], max_steps => 0);
SELECT name, status, attempt, worker FROM baton.steps WHERE run_id = :'chain2' ORDER BY step_id;

-- 6. A lost lease is skipped, with a NOTICE naming the step; the claim still
--    happens (here: chain2's b). An unknown step shows the NOTICE.
SELECT step, attempt, upstream
  FROM baton.complete_and_claim(ARRAY[999999999]::bigint[], ARRAY[gen_random_uuid()], NULL,
                                'w3', ARRAY['bt_chain_q'], 5);
-- A real step with a wrong token next to a good one (NOTICEs hidden: they
-- name step ids): the good one completes, the lost one keeps its lease, and
-- the claim hands out the step that became ready.
SELECT baton.enqueue_workflow('bt_chain', '{"c": 3}') AS chain3 \gset
SELECT baton.enqueue_workflow('bt_chain', '{"c": 4}') AS chain4 \gset
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w1', ARRAY['bt_chain_q'], 10);
SELECT step, input, attempt FROM claimed ORDER BY step_id;
SET client_min_messages = warning;
SELECT step, input, attempt, upstream
  FROM baton.complete_and_claim(
         ARRAY(SELECT step_id FROM claimed ORDER BY step_id),
         ARRAY(SELECT CASE WHEN input ->> 'c' = '4' THEN gen_random_uuid() ELSE lease_token END
                 FROM claimed ORDER BY step_id),
         ARRAY(SELECT jsonb_build_object('from', input -> 'c') FROM claimed ORDER BY step_id),
         'w3', ARRAY['bt_chain_q'], 5);
RESET client_min_messages;
SELECT r.input, s.name, s.status, s.attempt, s.worker
  FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.id IN (:'chain3', :'chain4') ORDER BY r.input ->> 'c', s.step_id;
SELECT (SELECT lease_token FROM baton.steps s WHERE s.run_id = :'chain4' AND s.name = 'a')
       = (SELECT lease_token FROM claimed WHERE input ->> 'c' = '4') AS chain4_same_token;
SELECT count(*) AS chain4_attempts FROM baton.step_attempts WHERE workflow_id = :'chain4';

SELECT cancel_unfinished_runs();

-- Argument checks: NULL arrays name the argument; max_steps must be 0..1000.
SELECT sqlstate_of('SELECT * FROM baton.complete_steps(NULL, NULL)') AS null_arrays;
SELECT sqlstate_of($$SELECT * FROM baton.complete_and_claim('{}', '{}', '{}', 'w', ARRAY['bt_none'], -1)$$) AS negative_max;
SELECT sqlstate_of($$SELECT * FROM baton.complete_and_claim('{}', '{}', '{}', 'w', ARRAY['bt_none'], NULL)$$) AS null_max;
