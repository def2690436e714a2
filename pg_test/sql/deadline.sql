-- Deadlines: enqueue_workflow(..., deadline) and a definition's "timeout"
-- (the run's start plus it; the sooner of the two when both are given).
-- Past it the background worker fails the run with "deadline <time>
-- passed": unfinished steps are cancelled and leases revoked.

SELECT baton.define_workflow('dl_flow', $${"queue": "dl_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "c"}]}$$);

-- A deadline given at enqueue; a running lease, a blocked and a ready step.
SELECT clock_timestamp() + interval '300 milliseconds' AS due \gset
SELECT baton.enqueue_workflow('dl_flow', deadline => :'due') AS r \gset
SELECT deadline = :'due'::timestamptz AS deadline_kept FROM baton.workflow_runs WHERE id = :'r';
SELECT step_id AS id, lease_token AS token FROM baton.claim_steps('w1', ARRAY['dl_q']) \gset
CALL wait_until(format('run_status(%L) = ''failed''', :'r'));
-- (the time in UTC, whatever the TimeZone of the session that fails the run)
SELECT status, error = format('deadline %s passed', to_char(:'due'::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) AS error_ok, finished_at >= :'due'::timestamptz - interval '20 milliseconds' AS after_due
  FROM baton.runs WHERE id = :'r';
SELECT step, status, lease_expires_at FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT step, outcome, error FROM baton.step_attempts WHERE workflow_id = :'r';
-- The worker holding a finds out at its next call.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :id, :'token')) AS complete,
       sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', :id, :'token')) AS heartbeat;
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['dl_q'], 10);

-- A run that finishes before its deadline is left alone.
SELECT baton.enqueue_workflow('dl_flow', deadline => clock_timestamp() + interval '200 milliseconds') AS r \gset
SELECT count(baton.complete_step(step_id, lease_token)) FROM baton.claim_steps('w1', ARRAY['dl_q'], 10);
SELECT count(baton.complete_step(step_id, lease_token)) FROM baton.claim_steps('w1', ARRAY['dl_q'], 10);
SELECT status FROM baton.runs WHERE id = :'r';
-- (a later deadline passing shows that this one's time came)
SELECT baton.enqueue_workflow('dl_flow', deadline => clock_timestamp() + interval '200 milliseconds') AS r2 \gset
CALL wait_until(format('run_status(%L) = ''failed''', :'r2'));
SELECT status, error FROM baton.runs WHERE id = :'r';

-- A definition-level timeout: the deadline is the run's start plus it.
SELECT baton.define_workflow('dl_timed', $${"queue": "dl_q", "timeout": "300 milliseconds", "steps": [
    {"name": "wait", "wait_event": "never"}, {"name": "nap", "sleep": "1 hour"}]}$$);
SELECT baton.enqueue_workflow('dl_timed') AS r \gset
SELECT deadline = created_at + interval '300 milliseconds' AS from_now FROM baton.runs WHERE id = :'r';
CALL wait_until(format('run_status(%L) = ''failed''', :'r'));
SELECT error ~ '^deadline \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z passed$' AS error_ok FROM baton.runs WHERE id = :'r';
SELECT step, status, wait_for, wake_at FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
-- from run_at for a delayed run; the sooner of it and an explicit deadline
SELECT baton.enqueue_workflow('dl_timed', run_at => now() + interval '1 day') AS r \gset
SELECT deadline = created_at + interval '1 day 300 milliseconds' AS from_run_at FROM baton.runs WHERE id = :'r';
SELECT baton.enqueue_workflow('dl_timed', deadline => now() + interval '100 milliseconds') AS r \gset
SELECT deadline = created_at + interval '100 milliseconds' AS explicit_sooner FROM baton.runs WHERE id = :'r';
SELECT baton.enqueue_workflow('dl_timed', deadline => now() + interval '1 day') AS r \gset
SELECT deadline = created_at + interval '300 milliseconds' AS timeout_sooner FROM baton.runs WHERE id = :'r';
SELECT cancel_unfinished_runs();

-- enqueue_workflows: every run of the batch gets the deadline.
SELECT clock_timestamp() + interval '300 milliseconds' AS due \gset
SELECT baton.enqueue_workflows('dl_flow', ARRAY['{"i": 1}', '{"i": 2}', '{"i": 3}']::jsonb[], deadline => :'due') AS ids \gset
SELECT count(*) AS runs, bool_and(deadline = :'due'::timestamptz) AS deadline_ok FROM baton.runs WHERE id = ANY (:'ids'::uuid[]);
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['dl_q']);
CALL wait_until(format('(SELECT bool_and(status = ''failed'') FROM baton.runs WHERE id = ANY (%L::uuid[]))', :'ids'));
SELECT count(*) AS failed, bool_and(error = format('deadline %s passed', to_char(:'due'::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))) AS error_ok
  FROM baton.runs WHERE id = ANY (:'ids'::uuid[]);
SELECT status, count(*) FROM baton.steps WHERE run_id = ANY (:'ids'::uuid[]) GROUP BY status ORDER BY status;
-- and the definition's timeout for a batch
SELECT baton.enqueue_workflows('dl_timed', ARRAY['{}', '{}']::jsonb[]) AS ids \gset
SELECT bool_and(deadline = created_at + interval '300 milliseconds') AS from_now FROM baton.runs WHERE id = ANY (:'ids'::uuid[]);

-- A deadline already past fails the run at the next round.
SELECT baton.enqueue_workflow('dl_flow', deadline => now() - interval '1 minute') AS r \gset
CALL wait_until(format('run_status(%L) = ''failed''', :'r'));

SELECT cancel_unfinished_runs();
