-- Statistics (sql/stats.sql) and a run's shape (sql/graph.sql).
\set VERBOSITY terse

-- 1. queue_stats: every state of a queue's backlog, recent outcomes and its
--    settings.
SELECT baton.define_workflow('st_flow', $${"queue": "st_q", "steps": [
    {"name": "a", "max_attempts": 1}, {"name": "nap", "after": ["a"], "sleep": "1 hour"}]}$$);
SELECT count(*) FROM unnest(baton.enqueue_workflows('st_flow', array_fill('{}'::jsonb, ARRAY[6])));
SELECT baton.enqueue_workflow('st_flow', run_at => now() + interval '1 hour') IS NOT NULL AS delayed;
-- one fails, two succeed (their sleeps wait), one stays leased, two stay ready
SELECT baton.fail_step(step_id, lease_token, 'no') FROM baton.claim_steps('st-w', ARRAY['st_q']);
SELECT count(baton.complete_step(step_id, lease_token)) FROM baton.claim_steps('st-w', ARRAY['st_q'], 2);
SELECT count(*) FROM baton.claim_steps('st-w', ARRAY['st_q']);
SELECT baton.configure_queue('st_q', concurrency => 10);
SELECT queue, ready, delayed, running, waiting, failed_last_hour, completed_last_minute,
       oldest_ready_age > interval '0' AS has_age, concurrency, paused, rate_limit
  FROM baton.queue_stats WHERE queue = 'st_q';
-- a configured queue with nothing in it is shown too
SELECT baton.configure_queue('st_empty', paused => true);
SELECT queue, ready, running, oldest_ready_age, paused FROM baton.queue_stats WHERE queue = 'st_empty';
SELECT cancel_unfinished_runs();

-- 2. It reads the live steps and a recent range of the history only: with
--    20,000 more finished steps, it reads a few pages more, not the history's
--    hundreds.
SELECT baton.define_workflow('st_hist', '{"queue": "st_hist_q", "steps": [{"name": "x"}]}');
SELECT count(*) > 0 AS warm FROM baton.queue_stats;
SELECT buffers_of('SELECT * FROM baton.queue_stats') AS before_history \gset
SELECT count(*) FROM unnest(baton.enqueue_workflows('st_hist', array_fill('{}'::jsonb, ARRAY[20000])));
-- (a transaction per batch: each completion takes its run's lock)
CREATE PROCEDURE pg_temp.drain() LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 20 LOOP
        PERFORM baton.complete_steps(array_agg(c.step_id), array_agg(c.lease_token))
           FROM baton.claim_steps('st-w', ARRAY['st_hist_q'], 1000) c;
        COMMIT;
    END LOOP;
END $$;
CALL pg_temp.drain();
UPDATE baton.steps SET finished_at = now() - interval '2 hours' WHERE queue = 'st_hist_q';
VACUUM ANALYZE baton.steps;
SELECT count(*) AS history FROM baton.steps WHERE queue = 'st_hist_q' AND status = 'succeeded';
SELECT buffers_of('SELECT * FROM baton.steps') > 200 AS a_scan_reads_hundreds,
       buffers_of('SELECT * FROM baton.queue_stats') - :before_history < 30 AS stats_read_a_few_more;
-- a queue whose steps all finished hours ago is not shown (unless configured)
SELECT count(*) AS shown FROM baton.queue_stats WHERE queue = 'st_hist_q';
-- its recent completions are counted by a range, not by the whole history
SELECT baton.enqueue_workflow('st_hist') IS NOT NULL AS one_more;
SELECT count(baton.complete_step(step_id, lease_token)) FROM baton.claim_steps('st-w', ARRAY['st_hist_q']);
SELECT completed_last_minute FROM baton.queue_stats WHERE queue = 'st_hist_q';

-- 3. workflow_graph: steps in definition order with kind, status, attempts
--    and errors; edges; map steps with their items counted; workflow steps
--    with their child runs.
SELECT baton.define_workflow('st_child', '{"queue": "st_q", "steps": [{"name": "inner"}]}');
SELECT baton.define_workflow('st_shape', $${"queue": "st_q", "steps": [
    {"name": "list"},
    {"name": "each", "after": ["list"], "map": "list"},
    {"name": "call", "after": ["list"], "workflow": "st_child"},
    {"name": "join", "after": ["each", "call"]}]}$$);
SELECT baton.enqueue_workflow('st_shape') AS g \gset
SELECT baton.complete_step(step_id, lease_token, '[1, 2, 3]') FROM baton.claim_steps('st-w', ARRAY['st_q']);
SELECT baton.fail_step(step_id, lease_token, 'try again') FROM baton.claim_steps('st-w', ARRAY['st_q']) WHERE map_index = 0;
SELECT jsonb_pretty(baton.workflow_graph(:'g') - 'run' #- '{steps,0,started_at}' #- '{steps,0,finished_at}'
                    #- '{steps,1,started_at}' #- '{steps,2,started_at}' #- '{steps,2,child_runs,0,id}');
SELECT (baton.workflow_graph(:'g') -> 'run') ->> 'status' AS run_status,
       (baton.workflow_graph(:'g') -> 'steps' -> 2 -> 'child_runs' -> 0 ->> 'id')::uuid
           = (SELECT id FROM baton.runs WHERE parent_id = :'g') AS names_the_child;
SELECT cancel_unfinished_runs();
