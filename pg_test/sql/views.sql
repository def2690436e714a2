-- The read-only views: their columns (names and types, in order) and that they
-- show what the tables hold.

SELECT a.attrelid::regclass AS view, a.attnum AS pos, a.attname AS column_name,
       format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a
 WHERE a.attrelid IN ('baton.workflow_runs'::regclass, 'baton.workflow_steps'::regclass,
                      'baton.step_attempts'::regclass)
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid::regclass::text, a.attnum;

-- One run through its life, seen through the views.
SELECT baton.define_workflow('vw_flow', $${"queue": "vw_q", "steps": [
    {"name": "first", "max_attempts": 2, "backoff": {"initial": "1 hour"}},
    {"name": "second", "after": ["first"]}]}$$);
SELECT baton.enqueue_workflow('vw_flow', '{"x": 1}', idempotency_key => 'vw-1', priority => 2) AS run \gset

SELECT workflow, version, status, queue, priority, input, output, error, idempotency_key,
       created_at IS NOT NULL AS created, started_at IS NULL AS not_started, finished_at IS NULL AS not_finished
  FROM baton.workflow_runs WHERE id = :'run';
SELECT step, status, attempt, max_attempts, queue, worker, after, priority,
       run_at <= now() AS due, lease_expires_at IS NULL AS unleased
  FROM baton.workflow_steps WHERE workflow_id = :'run' ORDER BY step_id;

-- Fail the first attempt, then succeed.
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('vw-worker', ARRAY['vw_q']) \gset
SELECT step, status, worker, lease_expires_at > now() AS leased
  FROM baton.workflow_steps WHERE step_id = :s;
SELECT baton.fail_step(:s, :'t', 'first try');
SELECT step, status, attempt, error, run_at > now() AS backing_off
  FROM baton.workflow_steps WHERE step_id = :s;
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :s;
SELECT make_due();
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('vw-worker', ARRAY['vw_q']) \gset
SELECT baton.complete_step(:s, :'t', '{"n": 1}');
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('vw-worker', ARRAY['vw_q']) \gset
SELECT baton.complete_step(:s, :'t', '{"n": 2}');

SELECT status, output, error, started_at IS NOT NULL AS started, finished_at >= started_at AS finished
  FROM baton.workflow_runs WHERE id = :'run';
SELECT step, status, attempt, output, error, worker, started_at IS NOT NULL AS started,
       finished_at IS NOT NULL AS finished
  FROM baton.workflow_steps WHERE workflow_id = :'run' ORDER BY step_id;
SELECT step, attempt, worker, outcome, error, started_at <= finished_at AS ordered
  FROM baton.step_attempts WHERE workflow_id = :'run' ORDER BY step_id, attempt;

-- The views have a row per table row.
SELECT (SELECT count(*) FROM baton.workflow_runs) = (SELECT count(*) FROM baton.runs) AS runs,
       (SELECT count(*) FROM baton.workflow_steps) = (SELECT count(*) FROM baton.steps) AS steps,
       (SELECT count(*) FROM baton.step_attempts) =
       (SELECT count(*) FROM baton.attempts) + (SELECT count(*) FROM baton.steps WHERE status = 'succeeded') AS attempts;
