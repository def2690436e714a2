-- Retention: baton._tick() deletes finished runs older than baton.retention,
-- with their steps, attempts and checkpoints, and reports how many as
-- 'pruned'. Unfinished runs and recently finished ones are kept.
--
-- baton.retention is a reload setting (it cannot be SET in a session), so this
-- test works with the server's value, whatever it is, as long as it is not
-- empty. (The background worker serves another database, so only this test
-- calls _tick here.)
SELECT current_setting('baton.retention') <> '' AS retention_on;
SELECT current_setting('baton.retention')::interval AS keep \gset

--   a --> b      a fails once before it succeeds, and saves a checkpoint
SELECT baton.define_workflow('rt_flow', $${"queue": "rt_q", "steps": [
    {"name": "a", "max_attempts": 3, "backoff": {"initial": "1 hour"}},
    {"name": "b", "after": ["a"]}]}$$);

-- run_to_end(key): enqueue a run and take it through: a checkpoint, a failed
-- attempt, then a and b succeed. Returns the run id.
CREATE FUNCTION pg_temp.run_to_end(key text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    run uuid := baton.enqueue_workflow('rt_flow', jsonb_build_object('key', key), idempotency_key => key);
    c record;
BEGIN
    SELECT * INTO c FROM baton.claim_steps('rt', ARRAY['rt_q']);
    PERFORM baton.checkpoint(c.step_id, c.lease_token, 'k', '1');
    PERFORM baton.fail_step(c.step_id, c.lease_token, 'once');
    UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = c.step_id;
    PERFORM make_due();
    SELECT * INTO c FROM baton.claim_steps('rt', ARRAY['rt_q']);
    PERFORM baton.complete_step(c.step_id, c.lease_token);
    SELECT * INTO c FROM baton.claim_steps('rt', ARRAY['rt_q']);
    PERFORM baton.complete_step(c.step_id, c.lease_token);
    RETURN run;
END $$;

-- Old: a succeeded run, a failed one, a cancelled one. Recent: a succeeded
-- run. Unfinished: a running run (created long ago) and a pending one.
SELECT pg_temp.run_to_end('rt-old-ok') AS old_ok \gset
SELECT baton.enqueue_workflow('rt_flow', '{"key": "rt-old-failed"}') AS old_failed \gset
SELECT baton.fail_step(step_id, lease_token, 'fatal', retryable => false) FROM baton.claim_steps('rt', ARRAY['rt_q']);
SELECT baton.enqueue_workflow('rt_flow', '{"key": "rt-old-cancelled"}') AS old_cancelled \gset
SELECT baton.cancel_workflow(:'old_cancelled');
SELECT pg_temp.run_to_end('rt-recent') AS recent \gset
SELECT baton.enqueue_workflow('rt_flow', '{"key": "rt-running"}') AS running \gset
SELECT step_id AS rs, lease_token AS rt FROM baton.claim_steps('rt', ARRAY['rt_q']) \gset
SELECT baton.checkpoint(:rs, :'rt', 'k', '2');
SELECT baton.enqueue_workflow('rt_flow', '{"key": "rt-pending"}') AS pending \gset

CREATE TEMP TABLE rt_runs (label text, id uuid);
INSERT INTO rt_runs VALUES ('old_ok', :'old_ok'), ('old_failed', :'old_failed'),
    ('old_cancelled', :'old_cancelled'), ('recent', :'recent'), ('running', :'running'), ('pending', :'pending');

-- What each run holds before pruning.
CREATE TEMP VIEW rt_holdings AS
SELECT l.label, r.status,
       (SELECT count(*) FROM baton.steps s WHERE s.run_id = l.id) AS steps,
       (SELECT count(*) FROM baton.attempts a WHERE a.run_id = l.id) AS attempts,
       (SELECT count(*) FROM baton.checkpoints k WHERE k.run_id = l.id) AS checkpoints
  FROM rt_runs l LEFT JOIN baton.runs r ON r.id = l.id
 ORDER BY l.label;
SELECT * FROM rt_holdings;

-- Age them: the old ones finished an hour before the retention limit, the
-- recent one half the retention ago; the running one was created long ago.
UPDATE baton.runs SET finished_at = now() - :'keep'::interval - interval '1 hour'
 WHERE id IN (:'old_ok', :'old_failed', :'old_cancelled');
UPDATE baton.runs SET finished_at = now() - :'keep'::interval / 2 WHERE id = :'recent';
UPDATE baton.runs SET created_at = now() - :'keep'::interval * 10, started_at = now() - :'keep'::interval * 10
 WHERE id = :'running';
SELECT count(*) AS runs_before FROM baton.runs \gset

-- One round prunes exactly the three old runs.
SELECT t ? 'pruned' AS has_pruned, t -> 'pruned' AS pruned, t -> 'reclaimed' AS reclaimed FROM baton._tick() t;
SELECT * FROM rt_holdings;
SELECT :runs_before - (SELECT count(*) FROM baton.runs) AS runs_deleted;
-- Nothing of them is left anywhere (steps cascade; attempts and checkpoints
-- have no foreign key and are deleted with the run).
SELECT (SELECT count(*) FROM baton.steps s JOIN rt_runs l ON l.id = s.run_id WHERE l.label LIKE 'old%') AS steps,
       (SELECT count(*) FROM baton.attempts a JOIN rt_runs l ON l.id = a.run_id WHERE l.label LIKE 'old%') AS attempts,
       (SELECT count(*) FROM baton.checkpoints k JOIN rt_runs l ON l.id = k.run_id WHERE l.label LIKE 'old%') AS checkpoints;
-- The definition stays.
SELECT name, version FROM baton.workflows WHERE name = 'rt_flow';

-- The next round has nothing to prune.
SELECT t -> 'pruned' AS pruned FROM baton._tick() t;

-- The kept runs still work: the running one finishes (and is recent then).
SELECT baton.complete_step(:rs, :'rt');
SELECT baton.complete_step(step_id, lease_token)
  FROM baton.claim_steps('rt', ARRAY['rt_q'], 10) WHERE workflow_id = :'running';
SELECT t -> 'pruned' AS pruned FROM baton._tick() t;
SELECT status, finished_at IS NOT NULL AS finished FROM baton.runs WHERE id = :'running';

-- A pruned run's idempotency key is free again: a new run.
SELECT pg_temp.run_to_end('rt-old-ok') <> :'old_ok' AS new_run;

SELECT cancel_unfinished_runs();

-- An empty baton.retention keeps finished runs forever (superusers may set it
-- for their own session; the background worker reads the server's value).
SELECT baton.define_workflow('rt_forever', '{"queue": "rt_forever_q", "steps": [{"name": "s"}]}') AS v \gset
SELECT baton.enqueue_workflow('rt_forever') AS forever_run \gset
SELECT baton.cancel_workflow(:'forever_run');
UPDATE baton.runs SET finished_at = now() - interval '100 years' WHERE id = :'forever_run';
SET baton.retention = '';
SELECT (t -> 'pruned')::int AS pruned_with_empty_retention FROM baton._tick() t;
SELECT count(*) AS kept FROM baton.runs WHERE id = :'forever_run';
RESET baton.retention;
SELECT (t -> 'pruned')::int >= 1 AS pruned_again FROM baton._tick() t;
