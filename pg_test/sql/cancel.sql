-- cancel_workflow: true for a pending or running run (its unfinished steps are
-- cancelled and running ones lose their lease), false once the run finished,
-- 42704 for an unknown run, 22004 for NULL.

SELECT baton.define_workflow('ca_flow', $${"queue": "ca_q", "steps": [
    {"name": "a"}, {"name": "b"}, {"name": "c", "after": ["a", "b"]}]}$$);

-- A pending run (nothing claimed yet).
SELECT baton.enqueue_workflow('ca_flow') AS pending_run \gset
SELECT baton.cancel_workflow(:'pending_run');
SELECT status, error, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'pending_run';
SELECT name, status, finished_at IS NOT NULL AS finished FROM baton.steps WHERE run_id = :'pending_run' ORDER BY step_id;
-- Cancelling again: already finished.
SELECT baton.cancel_workflow(:'pending_run') AS again;
-- Its steps cannot be claimed.
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['ca_q'], 10);

-- A running run: a is running, b done, c blocked.
SELECT baton.enqueue_workflow('ca_flow') AS running_run \gset
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['ca_q'], 10);
SELECT step, attempt FROM claimed ORDER BY step_id;
SELECT baton.complete_step(step_id, lease_token, '"b done"') FROM claimed WHERE step = 'b';
SELECT baton.cancel_workflow(:'running_run');
SELECT status, error, output FROM baton.runs WHERE id = :'running_run';
SELECT name, status, output, lease_token IS NULL AS unleased, lease_expires_at IS NULL AS no_lease
  FROM baton.steps WHERE run_id = :'running_run' ORDER BY step_id;
SELECT step, attempt, worker, outcome, error FROM baton.step_attempts WHERE workflow_id = :'running_run' ORDER BY step_id;
-- The worker holding a finds out at its next call.
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', step_id, lease_token)) AS heartbeat,
       sqlstate_of(format('SELECT baton.checkpoint(%s, %L, %L, %L)', step_id, lease_token, 'k', '1')) AS checkpoint,
       sqlstate_of(format('SELECT baton.complete_step(%s, %L)', step_id, lease_token)) AS complete,
       sqlstate_of(format('SELECT baton.fail_step(%s, %L, %L)', step_id, lease_token, 'x')) AS fail
  FROM claimed WHERE step = 'a';
SELECT baton.cancel_workflow(:'running_run') AS again;

-- Succeeded and failed runs cannot be cancelled.
SELECT baton.define_workflow('ca_one', '{"queue": "ca_q", "steps": [{"name": "only", "max_attempts": 1}]}');
SELECT baton.enqueue_workflow('ca_one') AS ok_run \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ca_q']);
SELECT baton.cancel_workflow(:'ok_run') AS cancel_succeeded, (SELECT status FROM baton.runs WHERE id = :'ok_run');
SELECT baton.enqueue_workflow('ca_one') AS failed_run \gset
SELECT baton.fail_step(step_id, lease_token, 'no') FROM baton.claim_steps('w1', ARRAY['ca_q']);
SELECT baton.cancel_workflow(:'failed_run') AS cancel_failed, (SELECT status FROM baton.runs WHERE id = :'failed_run');

-- A delayed run can be cancelled before it starts.
SELECT baton.enqueue_workflow('ca_one', run_at => now() + interval '1 day') AS delayed_run \gset
SELECT baton.cancel_workflow(:'delayed_run');
SELECT name, status FROM baton.steps WHERE run_id = :'delayed_run';

-- Unknown run: 42704; NULL: 22004.
SELECT sqlstate_of($$SELECT baton.cancel_workflow('00000000-0000-0000-0000-000000000000')$$) AS unknown;
SELECT sqlstate_of($$SELECT baton.cancel_workflow(NULL)$$) AS null_id;

SELECT count(*) AS unfinished FROM baton.runs WHERE workflow LIKE 'ca\_%' AND status IN ('pending', 'running');
