-- Sleep steps: "sleep" (an interval from when the step becomes runnable) and
-- "sleep_until" (a JSON path to a timestamp in {"input", "upstream"}). No
-- worker runs them: the step waits (status waiting, wake_at set) and succeeds
-- with output null when its time comes (the background worker, or
-- wait_until's own round: see 01_setup.sql).

SELECT baton.define_workflow('sl_interval', $${"queue": "sl_q", "steps": [
    {"name": "a"},
    {"name": "nap", "after": ["a"], "sleep": "300 milliseconds"},
    {"name": "b", "after": ["nap"]}]}$$);

-- Waiting for its upstream: blocked; then waiting, for 300 ms from then.
SELECT baton.enqueue_workflow('sl_interval') AS r \gset
SELECT step, status, kind, wake_at IS NULL AS no_wake FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT baton.complete_step(step_id, lease_token) FROM baton.claim_steps('w1', ARRAY['sl_q']);
SELECT step, status, kind, attempt, wait_for, wake_at > now() AS wakes_later
  FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'nap';
-- No worker claims it.
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['sl_q']);
CALL wait_until(format('step_status(%L, ''nap'') = ''succeeded''', :'r'));
SELECT s.status, s.output, s.finished_at - s.started_at >= interval '280 milliseconds' AS slept_long_enough,
       (SELECT status FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'b') AS next
  FROM baton.workflow_steps s WHERE s.workflow_id = :'r' AND s.step = 'nap';
-- What follows gets the sleep's output (null) as its upstream.
SELECT step, upstream FROM baton.claim_steps('w1', ARRAY['sl_q']) c \gset
SELECT :'step' AS step, :'upstream' AS upstream;

-- A sleep as the first step: it starts when the run is enqueued, and the
-- run succeeds with it.
SELECT baton.define_workflow('sl_root', '{"queue": "sl_q", "steps": [{"name": "nap", "sleep": "200 milliseconds"}]}');
SELECT baton.enqueue_workflow('sl_root') AS r \gset
SELECT status, kind, wake_at > now() AS wakes_later FROM baton.workflow_steps WHERE workflow_id = :'r';
CALL wait_until(format('run_status(%L) = ''succeeded''', :'r'));
SELECT status, output FROM baton.runs WHERE id = :'r';

-- A delayed run whose first step is a sleep: scheduled until run_at, then
-- the sleep starts (from then, not from the enqueue).
SELECT baton.enqueue_workflow('sl_root', run_at => clock_timestamp() + interval '200 milliseconds') AS r \gset
SELECT status, kind, attempt FROM baton.workflow_steps WHERE workflow_id = :'r';
CALL wait_until(format('run_status(%L) = ''succeeded''', :'r'));
SELECT s.attempt, s.finished_at - s.started_at >= interval '180 milliseconds' AS slept_long_enough,
       s.started_at - r.created_at >= interval '180 milliseconds' AS started_late
  FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id WHERE s.run_id = :'r';

-- sleep_until from the run's input.
SELECT baton.define_workflow('sl_until_input', $${"queue": "sl_q", "steps": [
    {"name": "wait", "sleep_until": "$.input.send_at"}]}$$);
SELECT clock_timestamp() + interval '300 milliseconds' AS send_at \gset
SELECT baton.enqueue_workflow('sl_until_input', jsonb_build_object('send_at', :'send_at'::timestamptz)) AS r \gset
SELECT status, wake_at = :'send_at'::timestamptz AS wakes_at_send_at FROM baton.workflow_steps WHERE workflow_id = :'r';
CALL wait_until(format('run_status(%L) = ''succeeded''', :'r'));
SELECT finished_at >= :'send_at'::timestamptz - interval '20 milliseconds' AS not_before, output FROM baton.steps WHERE run_id = :'r';

-- sleep_until from an upstream step's output (any text timestamptz takes).
SELECT baton.define_workflow('sl_until_up', $${"queue": "sl_q", "steps": [
    {"name": "plan"},
    {"name": "wait", "after": ["plan"], "sleep_until": "$.upstream.plan.at"}]}$$);
SELECT baton.enqueue_workflow('sl_until_up') AS r \gset
SELECT clock_timestamp() + interval '300 milliseconds' AS at \gset
SELECT baton.complete_step(step_id, lease_token, jsonb_build_object('at', to_char(:'at'::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ' UTC'))
  FROM baton.claim_steps('w1', ARRAY['sl_q']);
SELECT status, wake_at = :'at'::timestamptz AS wakes_at_plan FROM baton.workflow_steps WHERE workflow_id = :'r' AND step = 'wait';
CALL wait_until(format('run_status(%L) = ''succeeded''', :'r'));
SELECT output FROM baton.runs WHERE id = :'r';

-- A time already past succeeds at once, in the enqueueing transaction.
SELECT baton.enqueue_workflow('sl_until_input', '{"send_at": "2000-01-01T00:00:00Z"}') AS r \gset
SELECT r.status, s.status AS step_status, s.attempt, s.output FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id
 WHERE r.id = :'r';

-- A missing or non-timestamp value fails the step (not retried: the value
-- would not change) and the run, naming the path.
CREATE TEMP TABLE bad AS
SELECT v.input, baton.enqueue_workflow('sl_until_input', v.input) AS id
  FROM (VALUES ('{}'::jsonb), ('{"send_at": "soon"}'), ('{"send_at": 42}'), ('{"send_at": {"at": "2000-01-01"}}'),
               ('{"send_at": "infinity"}'), ('{"send_at": null}')) v(input);
SELECT b.input, r.status, s.status AS step_status, s.attempt, s.max_attempts, r.error
  FROM bad b JOIN baton.runs r ON r.id = b.id JOIN baton.steps s ON s.run_id = r.id ORDER BY r.id;
SELECT a.attempt, a.outcome, a.error FROM baton.step_attempts a WHERE a.workflow_id = (SELECT id FROM bad LIMIT 1);
SELECT baton.enqueue_workflow('sl_until_up') AS r \gset
SELECT baton.complete_step(step_id, lease_token, '{"at": "tomorrow-ish"}') FROM baton.claim_steps('w1', ARRAY['sl_q']);
SELECT status, error FROM baton.runs WHERE id = :'r';

-- A sleep in a run that ends early is cancelled with it, and stays so when
-- its time comes (cancelled, and failed by a sibling step).
SELECT baton.enqueue_workflow('sl_root') AS r \gset
SELECT baton.cancel_workflow(:'r');
SELECT status, wake_at FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT baton.define_workflow('sl_sibling', $${"queue": "sl_q", "steps": [
    {"name": "nap", "sleep": "200 milliseconds"}, {"name": "boom", "max_attempts": 1},
    {"name": "after_nap", "after": ["nap"]}]}$$);
SELECT baton.enqueue_workflow('sl_sibling') AS r2 \gset
SELECT baton.fail_step(step_id, lease_token, 'boom') FROM baton.claim_steps('w1', ARRAY['sl_q']);
SELECT step, status FROM baton.workflow_steps WHERE workflow_id = :'r2' ORDER BY step_id;
-- a later sleep of 200 ms that does fire shows that the earlier ones' time came
SELECT baton.enqueue_workflow('sl_root') AS r3 \gset
CALL wait_until(format('run_status(%L) = ''succeeded''', :'r3'));
SELECT r.status, s.status AS step_status, r.output
  FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id AND s.name = 'nap' WHERE r.id IN (:'r', :'r2') ORDER BY r.id;
SELECT step, status FROM baton.workflow_steps WHERE workflow_id = :'r2' ORDER BY step_id;

SELECT cancel_unfinished_runs();
