-- baton.enqueue_workflows: one run per input in one statement, ids returned in
-- input order; idempotency keys (within the batch and against existing runs);
-- queue, priority and run_at overrides; argument errors; rollback.

--   a --+
--       +--> c
--   b --+
SELECT baton.define_workflow('be_flow', $${"queue": "be_q", "steps": [
    {"name": "a"}, {"name": "b"}, {"name": "c", "after": ["a", "b"]}]}$$);

-- Argument errors: unknown workflow 42704, NULL workflow 22004, a keys array
-- of another length than inputs 22023, an empty queue 22023.
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('be_nope', ARRAY['{}']::jsonb[])$$) AS unknown;
SELECT sqlstate_of($$SELECT baton.enqueue_workflows(NULL, ARRAY['{}']::jsonb[])$$) AS null_workflow;
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('be_flow', ARRAY['{}', '{}']::jsonb[], ARRAY['k1'])$$) AS keys_short;
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('be_flow', ARRAY['{}']::jsonb[], ARRAY['k1', 'k2'])$$) AS keys_long;
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('be_flow', ARRAY['{}']::jsonb[], queue => ' ')$$) AS empty_queue;
SELECT count(*) AS runs_after_errors FROM baton.runs WHERE workflow = 'be_flow';

-- No inputs: no runs, an empty array.
SELECT baton.enqueue_workflows('be_flow', '{}') AS no_inputs;
SELECT baton.enqueue_workflows('be_flow', '{}', '{}') AS no_inputs_no_keys;
SELECT count(*) AS runs FROM baton.runs WHERE workflow = 'be_flow';

-- Five runs, inputs out of order: ids[n] is the run of inputs[n].
CREATE TEMP TABLE batch AS
SELECT baton.enqueue_workflows('be_flow',
           ARRAY['{"i": 5}', '{"i": 3}', '{"i": 1}', '{"i": 4}', '{"i": 2}']::jsonb[]) AS ids;
SELECT cardinality(ids) AS ids, (SELECT count(DISTINCT u) FROM unnest(ids) u) AS distinct_ids FROM batch;
SELECT u.n, r.input ->> 'i' AS i
  FROM batch, unnest(batch.ids) WITH ORDINALITY AS u(id, n)
  JOIN baton.runs r ON r.id = u.id
 ORDER BY u.n;
-- Each is a pending run like enqueue_workflow makes: the definition's queue,
-- priority 0, no key; root steps ready (and due), c blocked on two.
SELECT workflow, version, status, queue, priority, idempotency_key, steps_left(id) AS steps_left, count(*)
  FROM baton.runs WHERE workflow = 'be_flow'
 GROUP BY 1, 2, 3, 4, 5, 6, 7;
SELECT s.name, s.status, s.waiting_on, s.queue, s.priority, s.attempt, s.run_at <= now() AS due, count(*)
  FROM batch, unnest(batch.ids) AS u(id) JOIN baton.steps s ON s.run_id = u.id
 GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1;
-- They are claimable like any run.
SELECT count(*) AS claimed FROM baton.claim_steps('w1', ARRAY['be_q'], 2);

-- A NULL input is stored as {}.
SELECT baton.enqueue_workflows('be_flow', ARRAY[NULL, '{"n": 1}']::jsonb[]) AS with_null \gset
SELECT u.n, r.input
  FROM unnest(:'with_null'::uuid[]) WITH ORDINALITY AS u(id, n)
  JOIN baton.runs r ON r.id = u.id
 ORDER BY u.n;

-- Idempotency keys. An existing run with key be-1 (from enqueue_workflow), then
-- a batch that repeats be-1, uses be-2 twice and has one run without a key:
-- be-1 returns the existing run, both be-2 get one new run, so two runs (six
-- steps) are created.
SELECT baton.enqueue_workflow('be_flow', '{"k": 0}', idempotency_key => 'be-1') AS existing \gset
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT count(*) AS steps_before FROM baton.steps \gset
SELECT baton.enqueue_workflows('be_flow',
           ARRAY['{"k": 1}', '{"k": 2}', '{"k": 3}', '{"k": 4}']::jsonb[],
           ARRAY['be-2', 'be-1', 'be-2', NULL]) AS keyed \gset
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs,
       (SELECT count(*) FROM baton.steps) - :steps_before AS new_steps;
SELECT u.n, u.id = :'existing' AS is_existing, r.input, r.idempotency_key
  FROM unnest(:'keyed'::uuid[]) WITH ORDINALITY AS u(id, n)
  JOIN baton.runs r ON r.id = u.id
 ORDER BY u.n;
SELECT (:'keyed'::uuid[])[1] = (:'keyed'::uuid[])[3] AS be2_same_run,
       (:'keyed'::uuid[])[1] <> (:'keyed'::uuid[])[4] AS unkeyed_is_new;
-- The existing run kept its input.
SELECT input FROM baton.runs WHERE id = :'existing';

-- The same batch again: every keyed element returns its run, nothing is created
-- but the run without a key.
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT count(*) AS steps_before FROM baton.steps \gset
SELECT baton.enqueue_workflows('be_flow',
           ARRAY['{"k": 5}', '{"k": 6}', '{"k": 7}', '{"k": 8}']::jsonb[],
           ARRAY['be-2', 'be-1', 'be-2', NULL]) AS again \gset
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs,
       (SELECT count(*) FROM baton.steps) - :steps_before AS new_steps;
SELECT (:'again'::uuid[])[1:3] = (:'keyed'::uuid[])[1:3] AS same_keyed_runs,
       (:'again'::uuid[])[4] <> (:'keyed'::uuid[])[4] AS unkeyed_is_new;
-- Only keys already taken: nothing new at all.
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT baton.enqueue_workflows('be_flow', ARRAY['{}', '{}']::jsonb[], ARRAY['be-1', 'be-2'])
       = ARRAY[:'existing'::uuid, (:'keyed'::uuid[])[1]] AS existing_ids;
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs;

-- The same key on another workflow is another run.
SELECT baton.define_workflow('be_other', '{"queue": "be_q", "steps": [{"name": "x"}]}');
SELECT (baton.enqueue_workflows('be_other', ARRAY['{}']::jsonb[], ARRAY['be-1']))[1] <> :'existing' AS other_workflow_new;

-- A queue override puts the runs and all their steps on that queue; priority
-- is copied to the runs and their steps.
SELECT baton.enqueue_workflows('be_flow', ARRAY['{"q": 1}', '{"q": 2}']::jsonb[],
                               queue => 'be_override', priority => 4) AS qo \gset
SELECT r.input, r.queue, r.priority, array_agg(DISTINCT s.queue) AS step_queues,
       array_agg(DISTINCT s.priority) AS step_priorities
  FROM unnest(:'qo'::uuid[]) AS u(id) JOIN baton.runs r ON r.id = u.id JOIN baton.steps s ON s.run_id = r.id
 GROUP BY r.input, r.queue, r.priority ORDER BY r.input ->> 'q';
SELECT count(*) AS claimable_on_override FROM baton.claim_steps('w1', ARRAY['be_override'], 10);

-- run_at in the future delays every root step; nothing is claimable yet.
SELECT baton.enqueue_workflows('be_flow', ARRAY['{"d": 1}', '{"d": 2}']::jsonb[],
                               queue => 'be_later', run_at => now() + interval '1 hour') AS later \gset
SELECT s.name, s.status, s.run_at > now() + interval '59 minutes' AS delayed, count(*)
  FROM unnest(:'later'::uuid[]) AS u(id) JOIN baton.steps s ON s.run_id = u.id
 GROUP BY 1, 2, 3 ORDER BY 1;
SELECT count(*) AS claimable_later FROM baton.claim_steps('w1', ARRAY['be_later'], 10);

-- A rolled-back batch leaves nothing, and its keys are free again.
SELECT count(*) AS runs_before FROM baton.runs \gset
SELECT count(*) AS steps_before FROM baton.steps \gset
BEGIN;
SELECT cardinality(baton.enqueue_workflows('be_flow', ARRAY['{}', '{}', '{}']::jsonb[],
                                           ARRAY['be-rb1', 'be-rb2', NULL])) AS enqueued;
SELECT count(*) AS steps_in_tx FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.idempotency_key LIKE 'be-rb%';
ROLLBACK;
SELECT (SELECT count(*) FROM baton.runs) - :runs_before AS new_runs,
       (SELECT count(*) FROM baton.steps) - :steps_before AS new_steps,
       (SELECT count(*) FROM baton.runs WHERE idempotency_key LIKE 'be-rb%') AS with_key;
SELECT cardinality(baton.enqueue_workflows('be_flow', ARRAY['{}', '{}']::jsonb[], ARRAY['be-rb1', 'be-rb2'])) AS enqueued;
SELECT count(*) AS with_key FROM baton.runs WHERE idempotency_key LIKE 'be-rb%';

SELECT cancel_unfinished_runs();

-- An empty key is an error, as in enqueue_workflow (NULL means no key).
SELECT baton.define_workflow('be_order', '{"queue": "be_order_q", "steps": [{"name": "s"}]}') AS v \gset
SELECT sqlstate_of($$SELECT baton.enqueue_workflows('be_order', ARRAY['{}']::jsonb[], ARRAY[''])$$) AS empty_key;

-- Runs of one batch are claimed in input order (equal priority: oldest first).
SELECT cardinality(baton.enqueue_workflows('be_order',
         ARRAY(SELECT jsonb_build_object('i', i) FROM generate_series(1, 6) i))) AS enqueued;
SELECT string_agg(input ->> 'i', ',') AS claim_order
  FROM (SELECT input FROM baton.claim_steps('be_w', ARRAY['be_order_q'], 6)) c;
SELECT cancel_unfinished_runs();
