-- release_step: a worker hands a leased step back (shutting down). The step is
-- ready again at once, its attempt count goes back (the hand-back does not use
-- up an attempt) and no attempt is recorded; the old token is dead (BT001).

SELECT baton.define_workflow('rl_once', $${"queue": "rl_q", "steps": [
    {"name": "only", "max_attempts": 1}, {"name": "next", "after": ["only"]}]}$$);
SELECT baton.enqueue_workflow('rl_once', '{"r": 1}') AS run \gset
SELECT step_id AS s, lease_token AS t1 FROM baton.claim_steps('w1', ARRAY['rl_q'], 10, lease => '1 hour') \gset
SELECT name, status, attempt, max_attempts, worker FROM baton.steps WHERE step_id = :s;
-- The worker saves a checkpoint before it goes.
SELECT baton.checkpoint(:s, :'t1', 'cursor', '7');

-- Wrong token, NULL token, unknown step: BT001, and the step is untouched.
SELECT sqlstate_of(format('SELECT baton.release_step(%s, gen_random_uuid())', :s)) AS wrong_token;
SELECT sqlstate_of(format('SELECT baton.release_step(%s, NULL)', :s)) AS null_token;
SELECT sqlstate_of($$SELECT baton.release_step(999999999, gen_random_uuid())$$) AS unknown_step;
SELECT status, attempt, worker, lease_token = :'t1' AS same_token FROM baton.steps WHERE step_id = :s;

-- Released: ready and due at once, attempt back to 0, no lease, no worker;
-- the run is still running; no attempt row is written.
SELECT baton.release_step(:s, :'t1');
SELECT name, status, attempt, worker, lease_token IS NULL AS unleased, lease_expires_at IS NULL AS no_expiry,
       run_at <= now() AS due
  FROM baton.steps WHERE run_id = :'run' ORDER BY step_id;
SELECT status FROM baton.runs WHERE id = :'run';
SELECT count(*) AS attempts FROM baton.step_attempts WHERE workflow_id = :'run';

-- The old token is dead for every call, including a second release.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :s, :'t1')) AS complete,
       sqlstate_of(format('SELECT baton.fail_step(%s, %L, %L)', :s, :'t1', 'x')) AS fail,
       sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', :s, :'t1')) AS heartbeat,
       sqlstate_of(format('SELECT baton.release_step(%s, %L)', :s, :'t1')) AS release;
SELECT status FROM baton.complete_steps(ARRAY[:s]::bigint[], ARRAY[:'t1']::uuid[]);
SELECT status, attempt FROM baton.steps WHERE step_id = :s;

-- Another worker claims it at once as attempt 1 (of max_attempts 1), with the
-- checkpoint, and completes it: the run goes on.
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w2', ARRAY['rl_q'], 10);
SELECT step_id = :s AS same_step, step, attempt, checkpoints, lease_token <> :'t1' AS new_token FROM claimed;
SELECT baton.complete_step(step_id, lease_token, '"done"') FROM claimed;
SELECT step, attempt, worker, outcome FROM baton.step_attempts WHERE workflow_id = :'run' ORDER BY step_id, attempt;
SELECT step_id AS n, lease_token AS nt FROM baton.claim_steps('w2', ARRAY['rl_q']) \gset
SELECT baton.complete_step(:n, :'nt');
SELECT status, output FROM baton.runs WHERE id = :'run';

-- Released twice, then run: still attempt 1, and a failure then is final
-- (max_attempts 1: the releases used nothing up, the failure uses the one attempt).
SELECT baton.enqueue_workflow('rl_once', '{"r": 2}') AS run2 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['rl_q']) \gset
SELECT baton.release_step(:s, :'t');
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w2', ARRAY['rl_q']) \gset
SELECT baton.release_step(:s, :'t');
SELECT step_id AS s, lease_token AS t, attempt FROM baton.claim_steps('w3', ARRAY['rl_q']) \gset
SELECT :attempt AS attempt;
SELECT baton.fail_step(:s, :'t', 'real failure');
SELECT status, error FROM baton.runs WHERE id = :'run2';
SELECT step, attempt, worker, outcome, error FROM baton.step_attempts WHERE workflow_id = :'run2' ORDER BY step_id, attempt;

-- A retried step released during attempt 2 goes back to 1 and is claimed as
-- attempt 2 again: only the failure counts.
SELECT baton.define_workflow('rl_retry', $${"queue": "rl_q", "steps": [
    {"name": "flaky", "max_attempts": 2, "backoff": {"initial": "1 hour"}}]}$$);
SELECT baton.enqueue_workflow('rl_retry') AS run3 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['rl_q']) \gset
SELECT baton.fail_step(:s, :'t', 'first');
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :s;
SELECT make_due();
SELECT lease_token AS t, attempt FROM baton.claim_steps('w1', ARRAY['rl_q']) \gset
SELECT :attempt AS attempt;
SELECT baton.release_step(:s, :'t');
SELECT status, attempt, error, run_at <= now() AS due FROM baton.steps WHERE step_id = :s;
SELECT lease_token AS t, attempt FROM baton.claim_steps('w2', ARRAY['rl_q']) \gset
SELECT :attempt AS attempt;
SELECT baton.complete_step(:s, :'t');
SELECT step, attempt, worker, outcome FROM baton.step_attempts WHERE workflow_id = :'run3' ORDER BY attempt;

-- Releasing a step of a cancelled run: BT001 (the cancel took the lease).
SELECT baton.enqueue_workflow('rl_once', '{"r": 4}') AS run4 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['rl_q']) \gset
SELECT baton.cancel_workflow(:'run4');
SELECT sqlstate_of(format('SELECT baton.release_step(%s, %L)', :s, :'t')) AS after_cancel;
SELECT status FROM baton.steps WHERE step_id = :s;

-- A lease that expired but was not reclaimed yet is still held: it can be
-- released, and nothing is recorded as lost.
SELECT baton.enqueue_workflow('rl_once', '{"r": 5}') AS run5 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['rl_q']) \gset
UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE step_id = :s;
SELECT baton.release_step(:s, :'t');
SELECT status, attempt, worker FROM baton.steps WHERE step_id = :s;
SELECT count(*) AS attempts FROM baton.step_attempts WHERE workflow_id = :'run5';

SELECT cancel_unfinished_runs();
