-- Events: a wait_event step waits for send_event (its payload is the step's
-- output); events sent before the step is reached are kept, the oldest one
-- of that name taken first. timeout + on_timeout: fail (a timed_out
-- attempt, retried after the backoff) or continue (output null).
-- set_event / get_event: what a run publishes, the latest value per key.

SELECT baton.define_workflow('ev_flow', $${"queue": "ev_q", "steps": [
    {"name": "a"},
    {"name": "approval", "after": ["a"], "wait_event": "approved"},
    {"name": "b", "after": ["approval"]}]}$$);

-- Sent after the step is reached: it completes the step at once.
SELECT baton.enqueue_workflow('ev_flow') AS r \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT step, status, kind, attempt, wait_for, wake_at FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT baton.send_event(:'r', 'approved', '{"by": "ann"}') AS completed_a_step;
SELECT step, status, output, wait_for FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT name, payload, consumed_at IS NOT NULL AS consumed,
       consumed_by = (SELECT step_id FROM baton.steps WHERE run_id = :'r' AND name = 'approval') AS by_the_step
  FROM baton.events WHERE run_id = :'r';
-- The next step gets the payload as its upstream output.
SELECT step, upstream FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT cancel_unfinished_runs();

-- Sent before the step is reached: kept (false), then taken when the step
-- is reached, in the transaction that reaches it.
SELECT baton.enqueue_workflow('ev_flow') AS r \gset
SELECT baton.send_event(:'r', 'approved', '{"by": "bob"}') AS completed_a_step;
SELECT count(*) AS kept FROM baton.events WHERE run_id = :'r' AND consumed_at IS NULL;
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT step, status, output FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT count(*) AS kept FROM baton.events WHERE run_id = :'r' AND consumed_at IS NULL;
SELECT cancel_unfinished_runs();

-- Kept events for later steps: each step takes the oldest one not taken,
-- and events of other names stay.
SELECT baton.define_workflow('ev_two', $${"queue": "ev_q", "steps": [
    {"name": "a"},
    {"name": "first", "after": ["a"], "wait_event": "go"},
    {"name": "second", "after": ["first"], "wait_event": "go"}]}$$);
SELECT baton.enqueue_workflow('ev_two') AS r \gset
SELECT baton.send_event(:'r', 'go', '{"n": 1}') AS s1, baton.send_event(:'r', 'other', '{"n": 0}') AS s0,
       baton.send_event(:'r', 'go', '{"n": 2}') AS s2, baton.send_event(:'r', 'go', '{"n": 3}') AS s3;
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT step, status, output FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT status, output FROM baton.runs WHERE id = :'r';
SELECT name, payload FROM baton.events WHERE run_id = :'r' AND consumed_at IS NULL ORDER BY seq;
-- A finished run keeps what is sent to it (false).
SELECT baton.send_event(:'r', 'go', '{"n": 4}') AS completed_a_step;

-- A payload may be left out (null output).
SELECT baton.enqueue_workflow('ev_flow') AS r \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);
SELECT baton.send_event(:'r', 'approved') AS completed_a_step;
SELECT status, output FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);

-- send_event is transactional: rolled back, it leaves neither the event
-- nor the step's completion.
SELECT baton.enqueue_workflow('ev_flow') AS r \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ev_q']);
BEGIN;
SELECT baton.send_event(:'r', 'approved', '{"by": "eve"}') AS completed_a_step;
SELECT status FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';
ROLLBACK;
SELECT status, output, wait_for FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';
SELECT count(*) AS events FROM baton.events WHERE run_id = :'r';
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['ev_q']);
-- A cancelled run's waiting step is cancelled; an event sent then is kept.
SELECT baton.cancel_workflow(:'r');
SELECT status, wait_for FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';
SELECT baton.send_event(:'r', 'approved', '{"by": "late"}') AS completed_a_step;
SELECT status, output FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'approval';

-- Argument errors: unknown run 42704, NULL run 22004, empty name 22023.
SELECT sqlstate_of($$SELECT baton.send_event(gen_random_uuid(), 'approved')$$) AS unknown_run,
       sqlstate_of($$SELECT baton.send_event(NULL, 'approved')$$) AS null_run,
       sqlstate_of(format('SELECT baton.send_event(%L, %L)', :'r', '')) AS empty_name,
       sqlstate_of(format('SELECT baton.send_event(%L, NULL)', :'r')) AS null_name,
       sqlstate_of(format('SELECT baton.send_event(%L, %L)', :'r', repeat('x', 201))) AS long_name;

-- A timeout with on_timeout "fail" (the default): the attempt ends as
-- timed_out and is retried after the backoff (waiting again), and the run
-- fails when the attempts are used up.
SELECT baton.define_workflow('ev_timeout', $${"queue": "ev_q", "steps": [
    {"name": "w", "wait_event": "never", "timeout": "200 milliseconds", "max_attempts": 2,
     "backoff": {"initial": "200 milliseconds", "max": "200 milliseconds", "multiplier": 1}}]}$$);
SELECT baton.enqueue_workflow('ev_timeout') AS r \gset
SELECT status, attempt, wait_for, wake_at - started_at = interval '200 milliseconds' AS wakes_after_timeout
  FROM baton.workflow_steps WHERE workflow_id = :'r';
CALL wait_until(format('run_status(%L) = ''failed''', :'r'));
SELECT status, attempt, wait_for, error FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT attempt, outcome, error FROM baton.step_attempts WHERE workflow_id = :'r' ORDER BY attempt;
-- the second attempt waited for the backoff, then the whole timeout again
SELECT a2.started_at - a1.finished_at >= interval '180 milliseconds' AS backed_off,
       a2.finished_at - a2.started_at >= interval '180 milliseconds' AS waited_again
  FROM baton.attempts a1 JOIN baton.attempts a2 ON a2.run_id = a1.run_id AND a2.attempt = 2
 WHERE a1.run_id = :'r' AND a1.attempt = 1;
SELECT status, error FROM baton.runs WHERE id = :'r';
-- An event sent during the retry's wait completes the step.
SELECT baton.enqueue_workflow('ev_timeout') AS r \gset
CALL wait_until(format('(SELECT attempt = 2 AND status = ''waiting'' FROM baton.steps WHERE run_id = %L)', :'r'));
SELECT baton.send_event(:'r', 'never', '"at last"') AS completed_a_step;
SELECT status, attempt, output FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT status FROM baton.runs WHERE id = :'r';

-- on_timeout "continue": the step succeeds with output null.
SELECT baton.define_workflow('ev_continue', $${"queue": "ev_q", "steps": [
    {"name": "w", "wait_event": "maybe", "timeout": "200 milliseconds", "on_timeout": "continue"},
    {"name": "next", "after": ["w"]}]}$$);
SELECT baton.enqueue_workflow('ev_continue') AS r \gset
CALL wait_until(format('step_status(%L, ''w'') = ''succeeded''', :'r'));
SELECT step, status, attempt, output FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT count(*) AS failed_attempts FROM baton.attempts WHERE run_id = :'r';
SELECT step, upstream FROM baton.claim_steps('w1', ARRAY['ev_q']);
-- and an event that comes in time is its output
SELECT baton.enqueue_workflow('ev_continue') AS r \gset
SELECT baton.send_event(:'r', 'maybe', '{"yes": true}') AS completed_a_step;
SELECT status, output FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'w';

-- set_event / get_event: NULL until set, the latest value wins; any run
-- state; unknown run 42704; argument errors.
SELECT baton.get_event(:'r', 'progress') IS NULL AS unset;
SELECT baton.set_event(:'r', 'progress', '{"pct": 10}');
SELECT baton.set_event(:'r', 'progress', '{"pct": 50}');
SELECT baton.set_event(:'r', 'stage', '"copying"');
SELECT baton.get_event(:'r', 'progress') AS progress, baton.get_event(:'r', 'stage') AS stage,
       baton.get_event(:'r', 'other') IS NULL AS other_unset;
SELECT key, value FROM baton.event_values WHERE run_id = :'r' ORDER BY key;
SELECT baton.set_event(:'r', 'progress', NULL);
SELECT baton.get_event(:'r', 'progress') IS NULL AS set_to_null;
-- a value set is not an event sent (and the reverse)
SELECT count(*) AS events FROM baton.events WHERE run_id = :'r' AND name = 'progress';
SELECT sqlstate_of($$SELECT baton.set_event(gen_random_uuid(), 'k', '1')$$) AS unknown_run,
       sqlstate_of(format('SELECT baton.set_event(%L, %L, %L)', :'r', '', '1')) AS empty_key,
       sqlstate_of(format('SELECT baton.set_event(%L, NULL, %L)', :'r', '1')) AS null_key,
       sqlstate_of($$SELECT baton.set_event(NULL, 'k', '1')$$) AS null_run,
       sqlstate_of($$SELECT baton.get_event(NULL, 'k')$$) AS get_null_run;
SELECT baton.get_event(gen_random_uuid(), 'progress') IS NULL AS unknown_run_reads_null;

SELECT cancel_unfinished_runs();
