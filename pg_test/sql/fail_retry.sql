-- fail_step: retries with exponential backoff until max_attempts, then the step
-- and its run fail and every other unfinished step of the run is cancelled.

--   flaky --> after_flaky          sibling
SELECT baton.define_workflow('fr_flow', $${
    "queue": "fr_q",
    "steps": [
        {"name": "flaky", "max_attempts": 4,
         "backoff": {"initial": "1 hour", "max": "150 minutes", "multiplier": 2}},
        {"name": "after_flaky", "after": ["flaky"]},
        {"name": "sibling"}
    ]}$$);
SELECT baton.enqueue_workflow('fr_flow') AS run \gset
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['fr_q'], 10);
SELECT step, attempt FROM claimed ORDER BY step_id;
SELECT step_id AS flaky, lease_token AS token1 FROM claimed WHERE step = 'flaky' \gset

-- error must not be NULL: 22004, checked before the lease (and changes nothing).
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, %L, NULL)', :flaky, :'token1')) AS null_error;
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, gen_random_uuid(), NULL)', :flaky)) AS null_error_bad_token;
-- Wrong token, unknown step, NULL token: BT001.
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, gen_random_uuid(), %L)', :flaky, 'x')) AS wrong_token;
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, NULL, %L)', :flaky, 'x')) AS null_token;
SELECT sqlstate_of($$SELECT baton.fail_step(999999999, gen_random_uuid(), 'x')$$) AS unknown_step;
SELECT status, attempt FROM baton.steps WHERE step_id = :flaky;

-- Attempt 1 fails: the step is ready again after the initial backoff (1 hour,
-- plus up to 10% jitter); the lease is gone; the run keeps running.
SELECT baton.fail_step(:flaky, :'token1', 'boom 1');
SELECT status, attempt, error, worker, lease_token IS NULL AS unleased,
       run_at - now() BETWEEN interval '59 minutes' AND interval '66 minutes' AS backoff_1h
  FROM baton.steps WHERE step_id = :flaky;
SELECT status, error FROM baton.runs WHERE id = :'run';
SELECT count(*) AS not_yet FROM baton.claim_steps('w1', ARRAY['fr_q'], 10);

-- Once due, attempt 2 is claimed; failing it doubles the delay (2 hours).
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :flaky;
SELECT make_due();
SELECT step, attempt, lease_token AS token2 FROM baton.claim_steps('w2', ARRAY['fr_q'], 10) \gset
SELECT :'step' AS step, :attempt AS attempt;
-- The token of attempt 1 is no longer valid.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :flaky, :'token1')) AS old_token;
SELECT baton.fail_step(:flaky, :'token2', 'boom 2');
SELECT status, attempt, error,
       run_at - now() BETWEEN interval '119 minutes' AND interval '132 minutes' AS backoff_2h
  FROM baton.steps WHERE step_id = :flaky;

-- Attempt 3: 4 hours would exceed backoff.max, so the delay is capped at 150
-- minutes (plus jitter).
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :flaky;
SELECT make_due();
SELECT attempt, lease_token AS token3 FROM baton.claim_steps('w3', ARRAY['fr_q'], 10) \gset
SELECT :attempt AS attempt;
SELECT baton.fail_step(:flaky, :'token3', 'boom 3', retryable => NULL) AS retryable_null;
SELECT status, attempt,
       run_at - now() BETWEEN interval '149 minutes' AND interval '166 minutes' AS backoff_capped
  FROM baton.steps WHERE step_id = :flaky;

-- Attempt 4 is the last one: the step fails, and so does the run, naming the step.
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :flaky;
SELECT make_due();
SELECT attempt, lease_token AS token4 FROM baton.claim_steps('w4', ARRAY['fr_q'], 10) \gset
SELECT :attempt AS attempt;
SELECT baton.fail_step(:flaky, :'token4', 'boom 4');
SELECT status, error, output, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'run';
-- flaky failed; the blocked downstream step and the running sibling are cancelled.
SELECT name, status, attempt, error, lease_token IS NULL AS unleased, finished_at IS NOT NULL AS finished
  FROM baton.steps WHERE run_id = :'run' ORDER BY step_id;
-- The history: four failed attempts, and the sibling's attempt ended by the run.
SELECT step, attempt, worker, outcome, error FROM baton.attempts
 WHERE run_id = :'run' ORDER BY step_id, attempt;
-- The sibling's worker has lost its lease; the failed step cannot be failed again.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', step_id, lease_token)) AS sibling_lease
  FROM claimed WHERE step = 'sibling';
SELECT sqlstate_of(format('SELECT baton.fail_step(%s, %L, %L)', :flaky, :'token4', 'again')) AS fail_twice;
SELECT count(*) AS nothing_claimable FROM baton.claim_steps('w1', ARRAY['fr_q'], 10);

-- retryable => false fails at once, whatever attempts are left.
SELECT baton.enqueue_workflow('fr_flow') AS run2 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['fr_q'], 1) \gset
SELECT attempt, max_attempts FROM baton.steps WHERE step_id = :s;
SELECT baton.fail_step(:s, :'t', 'bad input', retryable => false);
SELECT status, error FROM baton.runs WHERE id = :'run2';
SELECT name, status FROM baton.steps WHERE run_id = :'run2' ORDER BY step_id;
SELECT step, attempt, outcome, error FROM baton.attempts WHERE run_id = :'run2' ORDER BY step_id;

-- max_attempts 1: the first failure is final.
SELECT baton.define_workflow('fr_once', '{"queue": "fr_q", "steps": [{"name": "once", "max_attempts": 1}]}');
SELECT baton.enqueue_workflow('fr_once') AS run3 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['fr_q'], 1) \gset
SELECT baton.fail_step(:s, :'t', 'only chance');
SELECT status, error FROM baton.runs WHERE id = :'run3';

-- With the default backoff (1 second, up to 10% jitter) a retry is delayed too.
-- Inside one transaction now() stands still, so the delay can be read exactly.
SELECT baton.define_workflow('fr_default', '{"queue": "fr_q", "steps": [{"name": "d"}]}');
SELECT baton.enqueue_workflow('fr_default') AS run4 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['fr_q'], 1) \gset
BEGIN;
SELECT baton.fail_step(:s, :'t', 'transient');
SELECT status, run_at - now() BETWEEN interval '1 second' AND interval '1.1 seconds' AS delay_1s
  FROM baton.steps WHERE step_id = :s;
COMMIT;

SELECT cancel_unfinished_runs();
