-- Expired leases: claim_steps takes them back before claiming (on its own
-- queues), counting the lost attempt; the old token is dead; a step out of
-- attempts fails its run. A step past its timeout is recorded as timed_out.

SELECT baton.define_workflow('le_flow', '{"queue": "le_q", "steps": [{"name": "work"}, {"name": "next", "after": ["work"]}]}');
SELECT baton.enqueue_workflow('le_flow') AS run \gset
SELECT step_id AS s, lease_token AS token1 FROM baton.claim_steps('crashed', ARRAY['le_q']) \gset

-- An unexpired lease is not taken.
SELECT count(*) AS nothing FROM baton.claim_steps('w2', ARRAY['le_q']);

-- The lease runs out (simulated). A claim on another queue leaves it alone.
UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE step_id = :s;
SELECT count(*) AS other_queue FROM baton.claim_steps('w2', ARRAY['le_other']);
SELECT status, attempt, worker FROM baton.steps WHERE step_id = :s;

-- A claim on its queue reclaims it and hands it out again as attempt 2.
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w2', ARRAY['le_q']);
SELECT step_id = :s AS same_step, step, attempt, lease_token <> :'token1' AS new_token FROM claimed;
SELECT status, attempt, worker FROM baton.steps WHERE step_id = :s;
SELECT step, attempt, worker, outcome, error FROM baton.attempts WHERE step_id = :s ORDER BY attempt;
SELECT status FROM baton.runs WHERE id = :'run';

-- The crashed worker's token is dead for every call.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :s, :'token1')) AS complete;
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, %L, %L)', :s, :'token1', 'x')) AS fail;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', :s, :'token1')) AS heartbeat;
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, %L, %L, %L)', :s, :'token1', 'k', '1')) AS checkpoint;

-- The new holder finishes the run normally.
SELECT baton.complete_step(step_id, lease_token, '"done"') FROM claimed;
SELECT step_id AS s2, lease_token AS t2 FROM baton.claim_steps('w2', ARRAY['le_q']) \gset
SELECT baton.complete_step(:s2, :'t2');
SELECT status FROM baton.runs WHERE id = :'run';

-- With max_attempts 1, an expired lease fails the step and its run, and the
-- other steps are cancelled: by the background worker's round (_tick), not by
-- a claim, whose own reclaim leaves last attempts alone (failing a run there
-- could deadlock two claims). The claim takes nothing and changes nothing.
SELECT baton.define_workflow('le_once', $${"queue": "le_q", "steps": [
    {"name": "once", "max_attempts": 1}, {"name": "then", "after": ["once"]}]}$$);
SELECT baton.enqueue_workflow('le_once') AS run2 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('lost', ARRAY['le_q']) \gset
UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE step_id = :s;
SELECT count(*) AS claimed FROM baton.claim_steps('w2', ARRAY['le_q']);
SELECT status, attempt, worker FROM baton.steps WHERE step_id = :s;
SELECT count(*) AS attempts_recorded FROM baton.attempts WHERE run_id = :'run2';
SELECT t -> 'reclaimed' AS reclaimed FROM baton._tick() t;
SELECT status, error FROM baton.runs WHERE id = :'run2';
SELECT name, status, attempt FROM baton.steps WHERE run_id = :'run2' ORDER BY step_id;
SELECT step, attempt, outcome, error FROM baton.attempts WHERE run_id = :'run2' ORDER BY step_id;
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :s, :'t')) AS late_complete;

-- A step whose timeout has passed is recorded as timed_out (and retried).
SELECT baton.define_workflow('le_timeout', '{"queue": "le_q", "steps": [{"name": "slow", "timeout": "1 minute"}]}');
SELECT baton.enqueue_workflow('le_timeout') AS run3 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('slowpoke', ARRAY['le_q'], lease => '1 hour') \gset
UPDATE baton.steps SET started_at = now() - interval '2 minutes', lease_expires_at = now() - interval '1 minute'
 WHERE step_id = :s;
SELECT step, attempt FROM baton.claim_steps('w2', ARRAY['le_q']);
SELECT step, attempt, worker, outcome, error FROM baton.attempts WHERE run_id = :'run3' ORDER BY attempt;
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :s, :'t')) AS late_complete;

SELECT cancel_unfinished_runs();
