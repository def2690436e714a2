-- Child workflows: a "workflow" step starts one run of the latest version of
-- another workflow (its input {"input", "upstream"}, parent_id and
-- parent_step set, idempotency key baton:child:<parent>:<step>:<attempt>),
-- waits for it, and ends with it: the child's output on success; on failure
-- or cancellation a failed attempt, whose retry starts a new child.
-- Cancelling (or failing) a run cancels its unfinished children.

SELECT baton.define_workflow('ch_kid', '{"queue": "ch_kq", "steps": [{"name": "k"}]}');
SELECT baton.define_workflow('ch_parent', $${"queue": "ch_pq", "steps": [
    {"name": "a"},
    {"name": "sub", "after": ["a"], "workflow": "ch_kid", "max_attempts": 2,
     "backoff": {"initial": "100 milliseconds", "max": "100 milliseconds", "multiplier": 1}},
    {"name": "z", "after": ["sub"]}]}$$);

-- The child starts when its step becomes runnable.
SELECT baton.enqueue_workflow('ch_parent', '{"order": 7}') AS p \gset
SELECT count(*) AS children FROM baton.runs WHERE parent_id = :'p';
SELECT baton.complete_step(step_id, lease_token, '{"total": 12}') FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT step, status, kind, attempt, wait_for, wake_at FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
SELECT id AS c FROM baton.runs WHERE parent_id = :'p' \gset
SELECT workflow, version, status, queue, input, parent_id = :'p' AS parent_is_p, parent_step,
       idempotency_key = format('baton:child:%s:sub:1', :'p') AS key_ok, deadline
  FROM baton.workflow_runs WHERE id = :'c';
-- The parent's own view: no parent.
SELECT parent_id, parent_step FROM baton.workflow_runs WHERE id = :'p';
-- The child's step gets the child's input.
SELECT step_id AS id, lease_token AS token, workflow, input, upstream FROM baton.claim_steps('w1', ARRAY['ch_kq']) \gset
SELECT :'workflow' AS workflow, :'input' AS input, :'upstream' AS upstream;
-- The child succeeds: the parent's step succeeds with the child's output, in
-- the same transaction.
SELECT baton.complete_step(:id, :'token', '{"charged": true}');
SELECT status, output FROM baton.runs WHERE id = :'c';
SELECT step, status, attempt, output FROM baton.workflow_steps WHERE workflow_id = :'p' ORDER BY step_id;
SELECT step, upstream FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT cancel_unfinished_runs();

-- The child fails: the parent's step fails its attempt and retries after
-- its backoff with a new child (a new idempotency key); the second child
-- failing fails the step and the parent run.
SELECT baton.enqueue_workflow('ch_parent') AS p \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT baton.fail_step(step_id, lease_token, 'card declined', false) FROM baton.claim_steps('w1', ARRAY['ch_kq']);
SELECT status, attempt, error ~ '^child run [-0-9a-f]+ failed: step "k" failed: card declined$' AS error_names_child
  FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
CALL wait_until(format('(SELECT count(*) FROM baton.runs WHERE parent_id = %L) = 2', :'p'));
SELECT status, attempt FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
SELECT status, idempotency_key = format('baton:child:%s:sub:%s', :'p', n) AS key_ok
  FROM (SELECT r.*, row_number() OVER (ORDER BY r.id) AS n FROM baton.runs r WHERE r.parent_id = :'p') c ORDER BY n;
SELECT baton.fail_step(step_id, lease_token, 'card declined again', false) FROM baton.claim_steps('w1', ARRAY['ch_kq']);
SELECT step, status, attempt FROM baton.workflow_steps WHERE workflow_id = :'p' ORDER BY step_id;
SELECT status, error ~ '^step "sub" failed: child run [-0-9a-f]+ failed: step "k" failed: card declined again$' AS error_ok
  FROM baton.runs WHERE id = :'p';
SELECT attempt, outcome FROM baton.step_attempts WHERE workflow_id = :'p' AND step = 'sub' ORDER BY attempt;

-- A child cancelled by itself counts as a failure of the parent's step.
SELECT baton.enqueue_workflow('ch_parent') AS p \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT id AS c FROM baton.runs WHERE parent_id = :'p' \gset
SELECT baton.cancel_workflow(:'c');
SELECT status, attempt, error ~ '^child run [-0-9a-f]+ cancelled$' AS error_ok
  FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
CALL wait_until(format('(SELECT count(*) FROM baton.runs WHERE parent_id = %L AND status = ''pending'') = 1', :'p'));

-- Cancelling the parent cancels its unfinished child; the lease a worker
-- holds on the child's step is revoked, and the parent's step is cancelled
-- (no retry, no new child).
SELECT id AS c FROM baton.runs WHERE parent_id = :'p' AND status = 'pending' \gset
SELECT step_id AS id, lease_token AS token FROM baton.claim_steps('w1', ARRAY['ch_kq']) \gset
SELECT baton.cancel_workflow(:'p');
SELECT status, error ~ '^parent run [-0-9a-f]+ cancelled$' AS error_ok FROM baton.runs WHERE id = :'c';
SELECT status FROM baton.steps WHERE run_id = :'c';
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :id, :'token')) AS child_worker_completes;
SELECT step, status FROM baton.workflow_steps WHERE workflow_id = :'p' ORDER BY step_id;
SELECT status, count(*) FROM baton.runs WHERE parent_id = :'p' GROUP BY status ORDER BY status;
SELECT count(*) AS signals_left FROM baton.run_signals;

-- A parent that fails cancels its children too (a sibling step fails).
SELECT baton.define_workflow('ch_fork', $${"queue": "ch_pq", "steps": [
    {"name": "sub", "workflow": "ch_kid"}, {"name": "boom", "max_attempts": 1}]}$$);
SELECT baton.enqueue_workflow('ch_fork') AS p \gset
SELECT status FROM baton.runs WHERE parent_id = :'p';
SELECT baton.fail_step(step_id, lease_token, 'boom') FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT status, (SELECT status FROM baton.runs WHERE parent_id = :'p') AS child FROM baton.runs WHERE id = :'p';

-- A child that finishes while its parent's run is busy (its lock held by
-- another transaction) leaves a signal; the background worker (or
-- wait_until's round) completes the parent's step once the lock is free.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dblink;
RESET client_min_messages;
SELECT dblink_connect('ch_other', format('dbname=%s port=%s host=127.0.0.1 user=postgres', current_database(), current_setting('port')));
SELECT baton.enqueue_workflow('ch_parent') AS p \gset
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['ch_pq']);
SELECT dblink_exec('ch_other', 'BEGIN');
SELECT * FROM dblink('ch_other', format('SELECT baton._lock_run(%L)::text', :'p')) AS t(x text);
SELECT baton.complete_step(step_id, lease_token, '"later"') FROM baton.claim_steps('w1', ARRAY['ch_kq']);
SELECT status FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
SELECT signal, from_run = (SELECT id FROM baton.runs WHERE parent_id = :'p') AS from_child FROM baton.run_signals WHERE run_id = :'p';
SELECT dblink_exec('ch_other', 'COMMIT');
CALL wait_until(format('step_status(%L, ''sub'') = ''succeeded''', :'p'));
SELECT status, output FROM baton.workflow_steps WHERE workflow_id = :'p' AND step = 'sub';
SELECT count(*) AS signals_left FROM baton.run_signals;
SELECT dblink_disconnect('ch_other');

-- The step's timeout is the child's deadline: past it the child fails,
-- and so does the step's attempt.
SELECT baton.define_workflow('ch_timed', $${"queue": "ch_pq", "steps": [
    {"name": "sub", "workflow": "ch_kid", "timeout": "200 milliseconds", "max_attempts": 1}]}$$);
SELECT baton.enqueue_workflow('ch_timed') AS p \gset
SELECT deadline - created_at = interval '200 milliseconds' AS deadline_ok FROM baton.runs WHERE parent_id = :'p';
CALL wait_until(format('run_status(%L) = ''failed''', :'p'));
SELECT status, error ~ '^deadline .* passed$' AS deadline_error FROM baton.runs WHERE parent_id = :'p';
SELECT error ~ '^step "sub" failed: child run [-0-9a-f]+ failed: deadline .* passed$' AS error_ok FROM baton.runs WHERE id = :'p';

-- A workflow step may not name its own workflow: every run would start
-- another, without end (steps have no conditions), also after a task step
-- (see step_kinds_validation for a cycle through another workflow).
SELECT sqlstate_of($q$SELECT baton.define_workflow('ch_self', $${"queue": "ch_sq", "steps": [
    {"name": "a"}, {"name": "again", "after": ["a"], "workflow": "ch_self"}]}$$)$q$) AS starts_itself;

SELECT cancel_unfinished_runs();
