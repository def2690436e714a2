-- baton.enqueue_workflow: creates a run and its steps; idempotency keys; queue,
-- priority and run_at overrides; argument errors.

SELECT baton.define_workflow('eq_flow', $${
    "queue": "eq_main",
    "steps": [
        {"name": "a"},
        {"name": "b", "after": ["a"], "queue": "eq_side"},
        {"name": "c", "after": ["a", "b"]}
    ]}$$);
SELECT baton.define_workflow('eq_other', '{"queue": "eq_main", "steps": [{"name": "x"}]}');

-- A run is pending, on the definition's queue, with its input; root steps are
-- ready, the others blocked on their upstream count.
SELECT baton.enqueue_workflow('eq_flow', '{"n": 1}') AS run1 \gset
SELECT workflow, version, status, queue, priority, input, output, error, idempotency_key,
       started_at IS NULL AS not_started, finished_at IS NULL AS not_finished
  FROM baton.runs WHERE id = :'run1';
SELECT v.step, v.status, v.after, s.waiting_on, v.queue, v.priority, v.attempt, v.max_attempts,
       v.run_at <= now() AS due, s.lease_token IS NULL AS unleased
  FROM baton.workflow_steps v JOIN baton.steps s ON s.step_id = v.step_id
 WHERE v.workflow_id = :'run1' ORDER BY v.step_id;

-- input defaults to {} (and NULL input is stored as {}).
SELECT baton.enqueue_workflow('eq_other') AS r \gset
SELECT input FROM baton.runs WHERE id = :'r';
SELECT baton.enqueue_workflow('eq_other', NULL) AS r \gset
SELECT input FROM baton.runs WHERE id = :'r';

-- A run uses the newest version of its workflow.
SELECT baton.define_workflow('eq_other', '{"queue": "eq_main", "steps": [{"name": "x"}, {"name": "y", "after": ["x"]}]}');
SELECT baton.enqueue_workflow('eq_other', '{"v": 2}') AS r \gset
SELECT r.version, count(s.*) AS steps
  FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id
 WHERE r.id = :'r'
 GROUP BY r.version;

-- Unknown workflow: 42704. NULL workflow: 22004. Empty queue / key: 22023.
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('eq_nope')$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflow(NULL)$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('eq_flow', queue => ' ')$$);
SELECT sqlstate_of($$SELECT baton.enqueue_workflow('eq_flow', idempotency_key => '')$$);

-- Idempotency: the same key on the same workflow returns the same run and
-- creates no rows, even with a different input.
SELECT baton.enqueue_workflow('eq_flow', '{"k": 1}', idempotency_key => 'key-1') AS k1 \gset
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT count(*) AS steps_before FROM baton.steps \gset
SELECT baton.enqueue_workflow('eq_flow', '{"k": 2}', idempotency_key => 'key-1') = :'k1' AS same_run;
SELECT baton.enqueue_workflow('eq_flow', '{"k": 3}', idempotency_key => 'key-1', priority => 9) = :'k1' AS same_run_again;
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs,
       (SELECT count(*) FROM baton.steps) - :steps_before AS new_steps;
SELECT input, priority FROM baton.runs WHERE id = :'k1';

-- The same key on another workflow is another run.
SELECT baton.enqueue_workflow('eq_other', idempotency_key => 'key-1') <> :'k1' AS new_run;
SELECT workflow, count(*) FROM baton.runs WHERE idempotency_key = 'key-1' GROUP BY workflow ORDER BY workflow;

-- The key still maps to its run after the run has finished (here: cancelled).
SELECT baton.cancel_workflow(:'k1');
SELECT baton.enqueue_workflow('eq_flow', idempotency_key => 'key-1') = :'k1' AS same_finished_run;

-- An enqueue that is rolled back leaves nothing, and its key is free again.
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT count(*) AS steps_before FROM baton.steps \gset
BEGIN;
SELECT baton.enqueue_workflow('eq_flow', idempotency_key => 'rolled-back') IS NOT NULL AS enqueued;
SELECT count(*) AS steps_in_tx FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.idempotency_key = 'rolled-back';
ROLLBACK;
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs,
       (SELECT count(*) FROM baton.steps) - :steps_before AS new_steps,
       (SELECT count(*) FROM baton.runs WHERE idempotency_key = 'rolled-back') AS with_key;

-- A queue override puts the run and every step on that queue.
SELECT baton.enqueue_workflow('eq_flow', queue => 'eq_override') AS qo \gset
SELECT queue FROM baton.runs WHERE id = :'qo';
SELECT name, queue FROM baton.steps WHERE run_id = :'qo' ORDER BY step_id;

-- Priority is copied to the run and its steps.
SELECT baton.enqueue_workflow('eq_flow', priority => 7) AS pr \gset
SELECT (SELECT priority FROM baton.runs WHERE id = :'pr') AS run_priority,
       array_agg(DISTINCT priority) AS step_priorities
  FROM baton.steps WHERE run_id = :'pr';

-- NULL priority means 0.
SELECT baton.enqueue_workflow('eq_flow', priority => NULL) AS pn \gset
SELECT (SELECT priority FROM baton.runs WHERE id = :'pn') AS run_priority,
       array_agg(DISTINCT priority) AS step_priorities
  FROM baton.steps WHERE run_id = :'pn';

-- run_at in the future: steps wait until then.
SELECT baton.enqueue_workflow('eq_flow', run_at => now() + interval '1 hour') AS later \gset
SELECT name, status, run_at > now() + interval '59 minutes' AS delayed
  FROM baton.steps WHERE run_id = :'later' ORDER BY step_id;

-- Run ids are time-ordered UUIDs (version 7), from both enqueue functions:
-- each id sorts after the ones created before it.
SELECT baton.enqueue_workflow('eq_flow') AS first_id \gset
SELECT ids FROM (SELECT baton.enqueue_workflows('eq_flow', ARRAY['{}', '{}']::jsonb[]) AS ids) x \gset
SELECT baton.enqueue_workflow('eq_flow') AS last_id \gset
SELECT substr(:'first_id', 15, 1) AS version,
       substr((:'ids'::uuid[])[1]::text, 15, 1) AS bulk_version,
       :'first_id'::uuid < (:'ids'::uuid[])[1]
         AND (:'ids'::uuid[])[1] < (:'ids'::uuid[])[2]
         AND (:'ids'::uuid[])[2] < :'last_id'::uuid AS in_creation_order;

-- Leave nothing unfinished for later tests.
SELECT cancel_unfinished_runs();
