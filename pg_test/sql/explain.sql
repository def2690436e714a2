-- Plans of the hot paths use their indexes on their own (no enable_* crutches),
-- once the table holds a realistic mix: mostly finished history, some ready work.

SELECT baton.define_workflow('ex_flow', $${"steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "c", "after": ["b"]}, {"name": "d", "after": ["c"]}]}$$);
-- 600 runs of 4 steps; 500 of them finished (2000 succeeded steps), 100 with a
-- ready first step and 3 blocked ones.
SELECT count(baton.enqueue_workflow('ex_flow', jsonb_build_object('i', i))) FROM generate_series(1, 600) i;
UPDATE baton.steps s SET status = 'succeeded', attempt = 1, finished_at = now(), waiting_on = 0
  FROM baton.runs r
 WHERE r.id = s.run_id AND r.workflow = 'ex_flow' AND (r.input ->> 'i')::int <= 500;
UPDATE baton.runs SET status = 'succeeded', finished_at = now()
 WHERE workflow = 'ex_flow' AND (input ->> 'i')::int <= 500;
SELECT s.status, count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.workflow = 'ex_flow' GROUP BY s.status ORDER BY s.status;
ANALYZE baton.steps;
ANALYZE baton.runs;

-- The claim query's shape: an ordered scan of the partial index steps_ready,
-- no sort, no scan of finished steps.
EXPLAIN (COSTS OFF)
SELECT step_id FROM baton.steps
 WHERE status = 'ready' AND queue = 'default'
 ORDER BY priority DESC, run_at, step_id
 LIMIT 10 FOR UPDATE SKIP LOCKED;

-- Looking a step up by its id (complete_step, fail_step, heartbeat, checkpoint).
EXPLAIN (COSTS OFF)
SELECT run_id FROM baton.steps WHERE step_id = 5;

-- Updating a step by run and step id (complete_step's UPDATE) is a one-row
-- index probe. The primary key is (run_id, step_no), so this goes through
-- steps_step_id and checks run_id on the row.
EXPLAIN (COSTS OFF)
UPDATE baton.steps SET output = '{}'
 WHERE run_id = '00000000-0000-0000-0000-000000000001' AND step_id = 5;

-- Unblocking downstream steps probes the primary key (run_id, step_no).
EXPLAIN (COSTS OFF)
UPDATE baton.steps SET waiting_on = waiting_on - 1
 WHERE run_id = '00000000-0000-0000-0000-000000000001' AND step_no = ANY ('{1,2}') AND status = 'blocked';

-- Completing (and heartbeat, checkpoint, fail_step) finds the step by id and
-- token; no steps were running at ANALYZE time, which once made the planner
-- prefer scanning the tiny steps_running index: the lookup must stay on
-- steps_step_id however few steps the statistics say are running.
EXPLAIN (COSTS OFF)
UPDATE baton.steps SET output = '{}'
 WHERE step_id = 5 AND lease_token = '00000000-0000-0000-0000-000000000001';


-- The claim itself still works on this data: the oldest ready steps first.
SELECT step, input FROM baton.claim_steps('ex', max_steps => 3);

SELECT cancel_unfinished_runs();

-- A backlog that arrives faster than ANALYZE: statistics taken when no step
-- was ready, then 3000 ready steps on one queue. The plans of the hot paths
-- must not depend on either count.
ANALYZE baton.steps;
ANALYZE baton.runs;
SELECT count(*) FROM unnest(baton.enqueue_workflows('ex_flow', array_fill('{}'::jsonb, ARRAY[3000]), queue => 'ex_backlog'));
-- The claim as claim_steps runs it (a generic plan: its arguments are
-- parameters; and the function's planner settings). On one queue: an ordered
-- scan of steps_ready that locks what it takes, then the locked rows by ctid
-- (Tid Scan), their runs by primary key. A claim once found its candidates
-- again by walking steps_ready (which these statistics say is empty), or by
-- hashing all of steps when a generic plan guessed the claim large: either
-- way a scan per claim.
SET plan_cache_mode = force_generic_plan;
SET enable_seqscan = off;
SET enable_hashjoin = off;
SET enable_mergejoin = off;
PREPARE claim(text, integer, text, interval) AS
WITH candidates AS MATERIALIZED (
    SELECT r.ctid
      FROM baton.steps r
     WHERE r.status = 'ready' AND r.queue = $1
     ORDER BY r.priority DESC, r.run_at, r.step_id
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE baton.steps s
       SET status = 'running', attempt = s.attempt + 1, worker = $3, lease_token = gen_random_uuid(),
           lease_expires_at = clock_timestamp() + $4, started_at = now()
     WHERE s.ctid = ANY (ARRAY(SELECT c.ctid FROM candidates c))
    RETURNING s.step_id, s.run_id
), started AS (
    UPDATE baton.runs r SET status = 'running', started_at = now()
     WHERE r.id = ANY (ARRAY(SELECT c.run_id FROM claimed c)) AND r.status = 'pending'
)
SELECT array_agg(c.step_id) FROM claimed c;
EXPLAIN (COSTS OFF) EXECUTE claim('ex_backlog', 8, 'w', '30 seconds');
DEALLOCATE claim;
-- Over several queues: one ordered scan of steps_ready per queue, without a
-- lock, and only the few candidates of all queues together are sorted; then
-- the picked rows are locked by ctid (Tid Scan, the status test a filter,
-- never a walk of steps_ready).
PREPARE pick(text[], integer[], integer, bigint[]) AS
SELECT array_agg(c.ctid ORDER BY c.priority DESC, c.run_at, c.step_id)
  FROM (SELECT c.ctid, c.step_id, c.priority, c.run_at
          FROM unnest($1, $2) AS q(name, slots)
         CROSS JOIN LATERAL (
               SELECT r.ctid, r.step_id, r.priority, r.run_at
                 FROM baton.steps r
                WHERE r.status = 'ready' AND r.queue = q.name AND NOT (r.step_id = ANY ($4))
                ORDER BY r.priority DESC, r.run_at, r.step_id
                LIMIT greatest(q.slots, 0)) c
         ORDER BY c.priority DESC, c.run_at, c.step_id
         LIMIT $3) c;
EXPLAIN (COSTS OFF) EXECUTE pick(ARRAY['ex_backlog', 'other'], ARRAY[8, 8], 8, '{}');
DEALLOCATE pick;
PREPARE lock(tid[]) AS
SELECT l.ctid FROM baton.steps l
 WHERE l.ctid = ANY ($1) AND l.status::text = 'ready'
   FOR UPDATE SKIP LOCKED;
EXPLAIN (COSTS OFF) EXECUTE lock(ARRAY['(0,1)']::tid[]);
DEALLOCATE lock;
-- Then what the worker needs of the claimed steps, by step id.
PREPARE leased(bigint[]) AS
SELECT c.step_id, r.workflow, r.input,
       (SELECT jsonb_object_agg(u.name, u.output)
          FROM unnest(c.upstream) AS a(step_no)
          CROSS JOIN LATERAL (SELECT u.name, u.output FROM baton.steps u
                              WHERE u.run_id = c.run_id AND u.step_no = a.step_no OFFSET 0) u)
  FROM baton.steps c
  CROSS JOIN LATERAL (SELECT r.workflow, r.input FROM baton.runs r WHERE r.id = c.run_id OFFSET 0) r
 WHERE c.step_id = ANY ($1)
 ORDER BY c.priority DESC, c.run_at, c.step_id;
EXPLAIN (COSTS OFF) EXECUTE leased(ARRAY[1, 2]);
DEALLOCATE leased;
RESET plan_cache_mode;
RESET enable_seqscan;
RESET enable_hashjoin;
RESET enable_mergejoin;

-- A whole worker's turn, the function itself (not a copy of its queries),
-- with these statistics and the backlog: completing a step and handing its
-- successor to the worker reads a few dozen buffers, by key. A scan of steps
-- would read hundreds; the hand-off's test for a higher-priority ready step,
-- once planned as a walk of all of steps_ready, read the whole backlog. The
-- first turn of the session plans the statements (and reads the catalogs), so
-- a second one is measured.
SELECT baton.define_workflow('ex_chain', $${"queue": "ex_chain_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "c", "after": ["b"]}]}$$) AS chain_version;
SELECT baton.enqueue_workflow('ex_chain') IS NOT NULL AS enqueued;
SELECT step_id AS a, lease_token AS at FROM baton.claim_steps('ex_w', ARRAY['ex_chain_q']) \gset
SELECT step_id AS b, lease_token AS bt
  FROM baton.complete_and_claim(ARRAY[:a]::bigint[], ARRAY[:'at']::uuid[], NULL, 'ex_w', ARRAY['ex_chain_q']) \gset
-- (measured on a third turn: the second, measured the same way, still
-- reads catalog entries once)
SELECT buffers_of(format(
           'SELECT * FROM baton.complete_and_claim(ARRAY[%s]::bigint[], ARRAY[%L]::uuid[], NULL, %L, ARRAY[%L])',
           :b, :'bt', 'ex_w', 'ex_chain_q')) >= 0 AS warmed_up;
SELECT baton.enqueue_workflow('ex_chain') AS second_chain \gset
SELECT step_id AS a2, lease_token AS at2 FROM baton.claim_steps('ex_w', ARRAY['ex_chain_q']) \gset
SELECT buffers_of(format(
           'SELECT * FROM baton.complete_and_claim(ARRAY[%s]::bigint[], ARRAY[%L]::uuid[], NULL, %L, ARRAY[%L])',
           :a2, :'at2', 'ex_w', 'ex_chain_q')) < 100 AS turn_reads_few_buffers;
SELECT s.name, s.status, s.worker FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.workflow = 'ex_chain' ORDER BY s.run_id, s.step_no;
SELECT cancel_unfinished_runs();
