-- Operating runs (sql/operation.sql): resume_workflow, retry_from,
-- fork_workflow, delete_workflow, purge, and the log they write. Each on runs
-- in every state, with every refusal; the races with workers are at the end.
\set VERBOSITY terse
SELECT baton.define_workflow('op_chain', $${"queue": "op_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"], "max_attempts": 2}, {"name": "c", "after": ["b"]}]}$$);

-- run_op(op): run one step of queue op_q, completing it with {"step": name}
-- or failing it (final) when the step is named in `fail`.
CREATE FUNCTION pg_temp.work(fail text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM baton.claim_steps('op-worker', ARRAY['op_q']);
    IF NOT FOUND THEN
        RETURN 'nothing';
    ELSIF c.step = fail THEN
        RETURN c.step || ': ' || baton.fail_step(c.step_id, c.lease_token, 'boom', false);
    END IF;
    RETURN c.step || ': ' || baton.complete_step(c.step_id, c.lease_token, jsonb_build_object('step', c.step, 'input', c.input));
END $$;

CREATE FUNCTION pg_temp.steps_of(run uuid) RETURNS TABLE(step text, status text, attempt integer, max_attempts integer, output jsonb)
LANGUAGE sql AS $$
    SELECT step, status, attempt, max_attempts, output FROM baton.workflow_steps WHERE workflow_id = run ORDER BY step
$$;

-- 1. Refusals on an unknown run (42704) and on NULLs (22004).
SELECT sqlstate_of($$SELECT baton.resume_workflow('00000000-0000-0000-0000-000000000000')$$);
SELECT sqlstate_of($$SELECT baton.retry_from('00000000-0000-0000-0000-000000000000', 'a')$$);
SELECT sqlstate_of($$SELECT baton.fork_workflow('00000000-0000-0000-0000-000000000000', 'a')$$);
SELECT sqlstate_of($$SELECT baton.delete_workflow('00000000-0000-0000-0000-000000000000')$$);
SELECT sqlstate_of($$SELECT baton.workflow_graph('00000000-0000-0000-0000-000000000000')$$);
SELECT sqlstate_of($$SELECT baton.resume_workflow(NULL)$$);
SELECT sqlstate_of($$SELECT baton.purge(NULL)$$);

-- 2. A pending run: resume and retry_from are refused (55000), fork works,
--    delete needs force.
SELECT baton.enqueue_workflow('op_chain', '{"n": 1}') AS pending \gset
SELECT sqlstate_of(format('SELECT baton.resume_workflow(%L)', :'pending'));
SELECT sqlstate_of(format('SELECT baton.retry_from(%L, %L)', :'pending', 'a'));
SELECT sqlstate_of(format('SELECT baton.delete_workflow(%L)', :'pending'));
SELECT baton.delete_workflow(:'pending', force => true);
SELECT count(*) AS left_of_deleted FROM baton.runs WHERE id = :'pending';

-- 3. A running run: the same refusals.
SELECT baton.enqueue_workflow('op_chain', '{"n": 2}') AS r \gset
SELECT pg_temp.work();
SELECT sqlstate_of(format('SELECT baton.resume_workflow(%L)', :'r'));
SELECT sqlstate_of(format('SELECT baton.retry_from(%L, %L)', :'r', 'b'));

-- 4. It fails at b (a final error): resume runs b again with a fresh budget
--    (attempt 1 of 2 used: its budget is now up to attempt 3), c after it;
--    a keeps its output.
SELECT pg_temp.work('b');
SELECT status, error FROM baton.workflow_runs WHERE id = :'r';
SELECT * FROM pg_temp.steps_of(:'r');
SELECT baton.resume_workflow(:'r');
SELECT status, error, finished_at IS NULL AS unfinished FROM baton.workflow_runs WHERE id = :'r';
SELECT * FROM pg_temp.steps_of(:'r');
SELECT pg_temp.work(), pg_temp.work();
SELECT status, output FROM baton.workflow_runs WHERE id = :'r';

-- 5. A succeeded run: resume is refused; retry_from an unknown step is
--    42704; retry_from b runs b and c again, a's output is reused, and the
--    earlier successes of b and c stay in the history.
SELECT sqlstate_of(format('SELECT baton.resume_workflow(%L)', :'r'));
SELECT sqlstate_of(format('SELECT baton.retry_from(%L, %L)', :'r', 'nope'));
SELECT sqlstate_of(format('SELECT baton.retry_from(%L, NULL)', :'r'));
SELECT baton.retry_from(:'r', 'b');
SELECT * FROM pg_temp.steps_of(:'r');
SELECT pg_temp.work(), pg_temp.work(), pg_temp.work();
SELECT status FROM baton.workflow_runs WHERE id = :'r';
SELECT step, attempt, outcome FROM baton.step_attempts WHERE workflow_id = :'r' ORDER BY step, attempt;

-- 6. A cancelled run: resume runs the cancelled steps; retry_from works on
--    it too.
SELECT baton.enqueue_workflow('op_chain', '{"n": 3}') AS k \gset
SELECT pg_temp.work();
SELECT baton.cancel_workflow(:'k');
SELECT * FROM pg_temp.steps_of(:'k');
SELECT baton.resume_workflow(:'k');
SELECT * FROM pg_temp.steps_of(:'k');
SELECT baton.cancel_workflow(:'k');
SELECT baton.retry_from(:'k', 'a');
SELECT * FROM pg_temp.steps_of(:'k');
SELECT pg_temp.work(), pg_temp.work(), pg_temp.work();
SELECT status FROM baton.workflow_runs WHERE id = :'k';

-- 7. The log: what each operation did, by whom.
SELECT action, step, detail - 'error' AS detail, actor = current_user AS by_me
  FROM baton.workflow_log WHERE workflow_id IN (:'r', :'k') ORDER BY seq;

-- 8. Fork: a new run of the same version that copies the outputs of every
--    step not downstream of from_step, with a new input; the source is
--    untouched. Bad versions and steps are refused.
SELECT baton.fork_workflow(:'r', 'c', '{"n": 20}') AS f \gset
SELECT forked_from = :'r' AS records_source, version, input, status FROM baton.workflow_runs WHERE id = :'f';
SELECT * FROM pg_temp.steps_of(:'f');
SELECT pg_temp.work();
SELECT status, output FROM baton.workflow_runs WHERE id = :'f';
SELECT step, attempt, outcome FROM baton.step_attempts WHERE workflow_id = :'f' ORDER BY step;
SELECT sqlstate_of(format('SELECT baton.fork_workflow(%L, %L)', :'r', 'nope'));
SELECT sqlstate_of(format('SELECT baton.fork_workflow(%L, %L, version => %L)', :'r', 'a', 'newest'));
SELECT sqlstate_of(format('SELECT baton.fork_workflow(%L, %L, version => %L)', :'r', 'a', '7'));
-- from a running run, and onto the latest version (which renamed c to d):
-- steps are matched by name
SELECT baton.define_workflow('op_chain', $${"queue": "op_q", "steps": [
    {"name": "a"}, {"name": "b", "after": ["a"]}, {"name": "d", "after": ["b"]}]}$$);
SELECT baton.enqueue_workflow('op_chain', '{"n": 4}') AS g \gset
SELECT pg_temp.work();
SELECT baton.fork_workflow(:'g', 'b', version => 'latest') AS g2 \gset
SELECT version FROM baton.workflow_runs WHERE id = :'g2';
SELECT * FROM pg_temp.steps_of(:'g2');
SELECT baton.fork_workflow(:'g', 'b', version => '1') AS g3 \gset
SELECT version FROM baton.workflow_runs WHERE id = :'g3';
SELECT name, version, unfinished_runs, latest FROM baton.workflow_definitions WHERE name = 'op_chain' ORDER BY version;
SELECT cancel_unfinished_runs();

-- 9. Fork after resume after retry_from: the history of each run stays
--    readable (attempts numbered on, each once).
SELECT baton.enqueue_workflow('op_chain', '{"n": 5}') AS h \gset
SELECT pg_temp.work(), pg_temp.work('b');
SELECT baton.retry_from(:'h', 'a');
SELECT pg_temp.work(), pg_temp.work('b');
SELECT baton.resume_workflow(:'h');
SELECT pg_temp.work(), pg_temp.work();
SELECT baton.fork_workflow(:'h', 'd') AS h2 \gset
SELECT pg_temp.work();
SELECT run_status(:'h') AS source, run_status(:'h2') AS fork;
SELECT step, attempt, outcome FROM baton.step_attempts WHERE workflow_id = :'h' ORDER BY step, attempt;
SELECT step, count(*) = count(DISTINCT attempt) AS each_once FROM baton.step_attempts
 WHERE workflow_id IN (:'h', :'h2') GROUP BY workflow_id, step ORDER BY workflow_id, step;

-- 10. delete_workflow: a finished run goes with everything that belongs to
--     it; a child run goes with its parent.
SELECT baton.define_workflow('op_child', '{"queue": "op_q", "steps": [{"name": "inner"}]}');
SELECT baton.define_workflow('op_parent', '{"queue": "op_q", "steps": [{"name": "call", "workflow": "op_child"}]}');
SELECT baton.enqueue_workflow('op_parent') AS p \gset
SELECT id AS pc FROM baton.runs WHERE parent_id = :'p' \gset
SELECT sqlstate_of(format('SELECT baton.delete_workflow(%L)', :'p'));
SELECT baton.delete_workflow(:'p', true);
SELECT count(*) AS runs_left FROM baton.runs WHERE id IN (:'p', :'pc');
SELECT (SELECT count(*) FROM baton.steps WHERE run_id = :'h') AS steps,
       (SELECT count(*) FROM baton.attempts WHERE run_id = :'h') AS attempts,
       (SELECT count(*) FROM baton.run_log WHERE run_id = :'h') AS log;
SELECT baton.delete_workflow(:'h');
SELECT (SELECT count(*) FROM baton.steps WHERE run_id = :'h') AS steps,
       (SELECT count(*) FROM baton.attempts WHERE run_id = :'h') AS attempts,
       (SELECT count(*) FROM baton.run_log WHERE run_id = :'h') AS log;

-- 11. purge: finished runs older than the cutoff, only those; refusals.
SELECT sqlstate_of($$SELECT baton.purge('-1 day')$$);
SELECT sqlstate_of($$SELECT baton.purge('1 day', 0)$$);
SELECT baton.purge('1000000 years');
UPDATE baton.runs SET finished_at = now() - interval '2 days' WHERE id IN (:'r', :'k');
SELECT baton.enqueue_workflow('op_chain', '{"n": 6}') AS young \gset
UPDATE baton.runs SET created_at = now() - interval '3 days' WHERE id = :'young';
-- (earlier tests of this database may have left old finished runs too)
SELECT count(*) AS old FROM baton.runs WHERE finished_at < now() - interval '1 day' \gset
SELECT count(*) AS recent FROM baton.runs WHERE NOT finished_at < now() - interval '1 day' OR finished_at IS NULL \gset
SELECT baton.purge('1 day', batch_size => 1) = :old AS purged_the_old;
SELECT count(*) AS gone FROM baton.runs WHERE id IN (:'r', :'k');
SELECT count(*) = :recent AS others_kept FROM baton.runs;
SELECT run_status(:'young') AS unfinished_kept;
SELECT cancel_unfinished_runs();
-- 10,000 runs in one call: no lock per run (max_locks_per_transaction is
-- 64 per connection here)
SELECT baton.define_workflow('op_many', '{"queue": "op_many_q", "steps": [{"name": "x"}]}');
SELECT count(*) FROM unnest(baton.enqueue_workflows('op_many', array_fill('{}'::jsonb, ARRAY[10000])));
UPDATE baton.runs SET status = 'succeeded', finished_at = now() - interval '3 days' WHERE workflow = 'op_many';
UPDATE baton.steps SET status = 'succeeded', finished_at = now() - interval '3 days' WHERE queue = 'op_many_q';
SELECT baton.purge('1 day') AS purged_many;
SELECT count(*) AS left_many FROM baton.runs WHERE workflow = 'op_many';

-- 12. A map run resumed keeps its succeeded items and runs the failed one;
--     retried from the map, it fans out anew.
SELECT baton.define_workflow('op_map', $${"queue": "op_q", "steps": [
    {"name": "list"}, {"name": "each", "after": ["list"], "map": "list", "max_attempts": 1}]}$$);
SELECT baton.enqueue_workflow('op_map') AS m \gset
SELECT baton.complete_step(step_id, lease_token, '[1, 2, 3]') FROM baton.claim_steps('op-worker', ARRAY['op_q']);
SELECT baton.complete_step(step_id, lease_token, jsonb_build_object('x', map_item))
  FROM baton.claim_steps('op-worker', ARRAY['op_q'], 2);
SELECT baton.fail_step(step_id, lease_token, 'item boom') FROM baton.claim_steps('op-worker', ARRAY['op_q']);
SELECT status, error FROM baton.workflow_runs WHERE id = :'m';
SELECT baton.resume_workflow(:'m');
SELECT map_index, status FROM baton.workflow_steps WHERE workflow_id = :'m' AND map_index IS NOT NULL ORDER BY map_index;
SELECT step_status(:'m', 'each');
SELECT baton.complete_step(step_id, lease_token, jsonb_build_object('x', map_item))
  FROM baton.claim_steps('op-worker', ARRAY['op_q']);
SELECT status, output FROM baton.workflow_runs WHERE id = :'m';
SELECT baton.retry_from(:'m', 'each');
SELECT count(*) AS items_now FROM baton.steps WHERE run_id = :'m' AND map_index IS NOT NULL;
SELECT count(*) AS claimed FROM baton.claim_steps('op-worker', ARRAY['op_q'], 10) c,
       LATERAL baton.complete_step(c.step_id, c.lease_token, jsonb_build_object('again', c.map_item)) d;
SELECT status, output FROM baton.workflow_runs WHERE id = :'m';
SELECT (baton.workflow_graph(:'m') -> 'steps' -> 1 -> 'map') AS map_counts;
SELECT baton.workflow_graph(:'m') -> 'edges' AS edges;

-- 13. Races with a worker in another session (dblink): each operation takes
--     the run's lock, so it waits for a worker's transaction on the same run
--     (and the worker for it), never deadlocks, and fencing holds.
CREATE EXTENSION IF NOT EXISTS dblink;
SELECT dblink_connect('other', format('dbname=%s host=%s port=%s user=%s',
       current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS connected;
SELECT pid AS other_pid FROM dblink('other', 'SELECT pg_backend_pid()') AS t(pid integer) \gset
CREATE FUNCTION pg_temp.other_is_blocked(pid integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 1000 LOOP
        IF pg_backend_pid() = ANY (pg_blocking_pids(pid)) THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN false;
END $$;
-- 13a. fork while a worker completes a step of the source: the fork waits,
--      then copies the completed output.
SELECT baton.define_workflow('op_race', '{"queue": "op_race_q", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.enqueue_workflow('op_race', '{"n": 7}') AS s \gset
SELECT step_id AS sid, lease_token AS stok FROM baton.claim_steps('op-worker', ARRAY['op_race_q']) \gset
BEGIN;
SELECT baton.complete_step(:sid, :'stok', '"a done"');
SELECT dblink_send_query('other', format('SELECT baton.fork_workflow(%L, %L)', :'s', 'b')) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS fork_waits;
COMMIT;
SELECT id AS sf FROM dblink_get_result('other') AS t(id uuid) \gset
SELECT * FROM dblink_get_result('other') AS t(id uuid);
SELECT output FROM baton.workflow_steps WHERE workflow_id = :'sf' AND step = 'a';
-- 13b. a worker's completion while retry_from runs on the same (finished)
--      run: its lease was ended with the run, so it is refused (BT001) once
--      the operation commits, and the step runs again.
SELECT baton.cancel_workflow(:'sf'), baton.cancel_workflow(:'s');
SELECT baton.enqueue_workflow('op_race', '{"n": 8}') AS t8 \gset
SELECT step_id AS tid, lease_token AS ttok FROM baton.claim_steps('op-worker', ARRAY['op_race_q']) \gset
SELECT baton.cancel_workflow(:'t8');
BEGIN;
SELECT baton.retry_from(:'t8', 'a');
SELECT dblink_send_query('other', format('SELECT sqlstate_of(%L)', format('SELECT baton.complete_step(%s, %L)', :tid, :'ttok'))) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS worker_waits;
COMMIT;
SELECT result FROM dblink_get_result('other') AS t(result text);
SELECT * FROM dblink_get_result('other') AS t(result text);
SELECT step, status FROM baton.workflow_steps WHERE workflow_id = :'t8' ORDER BY step;
-- 13c. delete while a worker holds a step of the run (force): the worker's
--      completion is refused.
SELECT step_id AS did, lease_token AS dtok FROM baton.claim_steps('op-worker', ARRAY['op_race_q']) \gset
BEGIN;
SELECT baton.delete_workflow(:'t8', force => true);
SELECT dblink_send_query('other', format('SELECT sqlstate_of(%L)', format('SELECT baton.complete_step(%s, %L)', :did, :'dtok'))) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS worker_waits;
COMMIT;
SELECT result FROM dblink_get_result('other') AS t(result text);
SELECT * FROM dblink_get_result('other') AS t(result text);
-- 13d. purge while an operation holds an old run: it passes over that run
--      without waiting and deletes the others.
SELECT baton.enqueue_workflow('op_race', '{"n": 9}') AS p1 \gset
SELECT baton.enqueue_workflow('op_race', '{"n": 10}') AS p2 \gset
SELECT baton.cancel_workflow(:'p1'), baton.cancel_workflow(:'p2');
UPDATE baton.runs SET finished_at = now() - interval '10 days' WHERE id IN (:'p1', :'p2');
BEGIN;
SELECT baton.resume_workflow(:'p1');
SELECT * FROM dblink('other', $$SELECT baton.purge('9 days')$$) AS t(purged_by_other bigint);
COMMIT;
SELECT run_status(:'p1') AS held_run, (SELECT count(*) FROM baton.runs WHERE id = :'p2') AS other_left;
SELECT cancel_unfinished_runs();
-- 13e. What an operation makes runnable is announced at its commit
--      (NOTIFY baton_ready with the queue), as an enqueue is. The other
--      session listens; next_notice() polls it (up to 10 s) for the next one.
SELECT dblink_exec('other', 'LISTEN baton_ready');
CREATE FUNCTION pg_temp.next_notice(seconds float8 DEFAULT 10) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    got text;
BEGIN
    FOR i IN 1 .. greatest(1, (seconds * 100)::integer) LOOP
        PERFORM * FROM dblink('other', 'SELECT 1') AS t(x integer);  -- reads what came
        SELECT n.notify_name || ': ' || n.extra INTO got FROM dblink_get_notify('other') n LIMIT 1;
        IF got IS NOT NULL THEN
            RETURN got;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN 'none';
END $$;
SELECT baton.enqueue_workflow('op_race', '{"n": 11}') AS nr \gset
SELECT pg_temp.next_notice() AS enqueued;
SELECT baton.fail_step(step_id, lease_token, 'no', false) FROM baton.claim_steps('op-worker', ARRAY['op_race_q']);
BEGIN;
SELECT baton.resume_workflow(:'nr');
SELECT pg_temp.next_notice(0.2) AS before_commit;
COMMIT;
SELECT pg_temp.next_notice() AS resumed;
SELECT baton.cancel_workflow(:'nr');
SELECT baton.retry_from(:'nr', 'b');
SELECT pg_temp.next_notice() AS retried;
SELECT baton.fork_workflow(:'nr', 'a') IS NOT NULL AS forked;
SELECT pg_temp.next_notice() AS fork_announced;
SELECT dblink_disconnect('other');
SELECT cancel_unfinished_runs();
