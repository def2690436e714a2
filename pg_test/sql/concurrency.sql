-- Two sessions at once. A second connection (dblink, in the same database)
-- sends its call asynchronously; this session holds its transaction open until
-- the other one is seen waiting on it, then commits, and reads what the other
-- call returned. So each race is played out in one fixed order.
CREATE EXTENSION IF NOT EXISTS dblink;
-- (over TCP when this session uses TCP, else over the server's first socket directory)
SELECT dblink_connect('other', format('dbname=%s host=%s port=%s user=%s',
       current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS connected;
SELECT pid AS other_pid FROM dblink('other', 'SELECT pg_backend_pid()') AS t(pid integer) \gset

-- Wait (up to 10 s) until the other session is blocked by this one.
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

SELECT baton.define_workflow('cu_flow', '{"queue": "cu_q", "steps": [{"name": "a"}]}');

-- 1. Two enqueues with one idempotency key: the second waits for the first to
--    commit and then returns the same run.
BEGIN;
SELECT baton.enqueue_workflow('cu_flow', idempotency_key => 'race') AS first_id \gset
SELECT dblink_send_query('other', $$SELECT baton.enqueue_workflow('cu_flow', idempotency_key => 'race')$$) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS other_waits;
COMMIT;
SELECT id = :'first_id' AS same_run FROM dblink_get_result('other') AS t(id uuid);
SELECT * FROM dblink_get_result('other') AS t(id uuid);
SELECT count(*) AS runs_with_key FROM baton.runs WHERE idempotency_key = 'race';
SELECT cancel_unfinished_runs();

-- 2. Two claimers do not wait for each other: the second skips the step the
--    first one holds and takes the next.
SELECT count(baton.enqueue_workflow('cu_flow', jsonb_build_object('n', n))) FROM generate_series(1, 2) n;
BEGIN;
SELECT input FROM baton.claim_steps('w1', ARRAY['cu_q']);
SELECT * FROM dblink('other', $$SELECT input FROM baton.claim_steps('w2', ARRAY['cu_q'])$$) AS t(input jsonb);
COMMIT;
SELECT worker, count(*) FROM baton.steps WHERE queue = 'cu_q' AND status = 'running' GROUP BY worker ORDER BY worker;
SELECT cancel_unfinished_runs();

-- 3. A concurrency limit of 1 holds under two claimers: the second waits for the
--    first to commit, then finds the queue full.
SELECT baton.configure_queue('cu_q', 1);
SELECT count(baton.enqueue_workflow('cu_flow')) FROM generate_series(1, 2);
BEGIN;
SELECT count(*) AS first_claim FROM baton.claim_steps('w1', ARRAY['cu_q'], 5);
SELECT dblink_send_query('other', $$SELECT count(*) FROM baton.claim_steps('w2', ARRAY['cu_q'], 5)$$) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS other_waits;
COMMIT;
SELECT n AS second_claim FROM dblink_get_result('other') AS t(n bigint);
SELECT * FROM dblink_get_result('other') AS t(n bigint);
SELECT count(*) AS running FROM baton.steps WHERE queue = 'cu_q' AND status = 'running';
SELECT baton.configure_queue('cu_q', NULL);
SELECT cancel_unfinished_runs();

-- 4. A worker completing a step while the run is being cancelled: the cancel
--    wins, and the worker gets BT001.
SELECT baton.enqueue_workflow('cu_flow') AS run4 \gset
SELECT step_id AS s, lease_token AS t FROM baton.claim_steps('w1', ARRAY['cu_q']) \gset
BEGIN;
SELECT baton.cancel_workflow(:'run4');
SELECT dblink_send_query('other', format('SELECT sqlstate_of(%L)',
       format('SELECT baton.complete_step(%s, %L)', :s, :'t'))) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS other_waits;
COMMIT;
SELECT result AS complete_after_cancel FROM dblink_get_result('other') AS t(result text);
SELECT * FROM dblink_get_result('other') AS t(result text);
SELECT status FROM baton.runs WHERE id = :'run4';
SELECT step, attempt, outcome, error FROM baton.attempts WHERE run_id = :'run4';

-- 5. A run cancelled while a worker is claiming its step: the cancel waits for
--    the claim, then cancels the now running step. The attempt the worker had
--    started is ended, and the history records it as cancelled.
SELECT baton.enqueue_workflow('cu_flow') AS run5 \gset
BEGIN;
SELECT step, attempt FROM baton.claim_steps('w1', ARRAY['cu_q']);
SELECT dblink_send_query('other', format('SELECT baton.cancel_workflow(%L)', :'run5')) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS other_waits;
COMMIT;
SELECT cancelled FROM dblink_get_result('other') AS t(cancelled boolean);
SELECT * FROM dblink_get_result('other') AS t(cancelled boolean);
SELECT status FROM baton.runs WHERE id = :'run5';
SELECT name, status, attempt, lease_token IS NULL AS unleased FROM baton.steps WHERE run_id = :'run5';
SELECT step, attempt, worker, outcome, error FROM baton.attempts WHERE run_id = :'run5';

-- 6. The two last steps of a run finish at once, in two sessions: the second
--    waits for the first (the run lock), then sees its step done and finishes
--    the run with both leaves' outputs. Neither leaves the run running.
SELECT baton.define_workflow('cu_pair', '{"queue": "cu_q", "steps": [{"name": "x"}, {"name": "y"}]}');
SELECT baton.enqueue_workflow('cu_pair') AS run6 \gset
SELECT step_id AS x, lease_token AS xt FROM baton.claim_steps('w1', ARRAY['cu_q']) \gset
SELECT step_id AS y, lease_token AS yt FROM baton.claim_steps('w2', ARRAY['cu_q']) \gset
BEGIN;
SELECT baton.complete_step(:x, :'xt', '"x out"') AS first_leaf;
SELECT dblink_send_query('other', format('SELECT baton.complete_step(%s, %L, %L)', :y, :'yt', '"y out"')) AS sent;
SELECT pg_temp.other_is_blocked(:other_pid) AS other_waits;
COMMIT;
SELECT status AS second_leaf FROM dblink_get_result('other') AS t(status text);
SELECT * FROM dblink_get_result('other') AS t(status text);
SELECT status, output FROM baton.runs WHERE id = :'run6';

-- 7. A claim's own reclaim never waits: it leaves a step's last attempt to the
--    background worker, since failing it would cancel the run's other steps,
--    which another claimer may hold (two such claims could deadlock). Here the
--    other session holds the run's ready step as a claim's candidate would;
--    the claim returns at once (no lock timeout) and the run stays running
--    until the background worker's round fails it.
SELECT baton.define_workflow('cu_last', $${"queue": "cu_last_q", "steps": [
    {"name": "solo", "max_attempts": 1}, {"name": "side"}]}$$);
SELECT baton.enqueue_workflow('cu_last') AS run7 \gset
SELECT step_id AS solo FROM baton.claim_steps('gone', ARRAY['cu_last_q']) \gset
SELECT step_id AS side FROM baton.steps WHERE run_id = :'run7' AND name = 'side' \gset
UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE step_id = :solo;
SELECT dblink_exec('other', 'BEGIN') AS began;
SELECT held FROM dblink('other', format('SELECT true FROM baton.steps WHERE step_id = %s FOR UPDATE', :side)) AS t(held boolean);
SET lock_timeout = '5s';
SELECT count(*) AS claimed FROM baton.claim_steps('w3', ARRAY['cu_last_q']);
RESET lock_timeout;
SELECT status FROM baton.runs WHERE id = :'run7';
SELECT dblink_exec('other', 'ROLLBACK') AS released;
SELECT t -> 'reclaimed' AS reclaimed FROM baton._tick() t;
SELECT name, status FROM baton.steps WHERE run_id = :'run7' ORDER BY step_no;
SELECT status FROM baton.runs WHERE id = :'run7';

-- 8. A transaction that holds back vacuum is reported by the background
--    worker's round once it is older than baton.horizon_warning: who holds it
--    and for how long (the worker logs it). Not before, not when the setting
--    is 0, and no longer once it ends.
SELECT dblink_exec('other', 'BEGIN ISOLATION LEVEL REPEATABLE READ') AS began;
SELECT n >= 0 AS snapshot_taken FROM dblink('other', 'SELECT count(*) FROM baton.runs') AS t(n bigint);
SET baton.horizon_warning = '1h';
SELECT t ? 'horizon' AS reported_early FROM baton._tick() t;
SELECT pg_sleep(1.1);
SET baton.horizon_warning = '1s';
SELECT (t -> 'horizon' ->> 'pid')::integer = :other_pid AS holder, t -> 'horizon' ->> 'state' AS state,
       (t -> 'horizon' ->> 'seconds')::integer >= 1 AS seconds
  FROM baton._tick() t;
SET baton.horizon_warning = 0;
SELECT t ? 'horizon' AS reported_when_off FROM baton._tick() t;
RESET baton.horizon_warning;
SET baton.horizon_warning = '1s';
SELECT dblink_exec('other', 'COMMIT') AS ended;
SELECT t ? 'horizon' AS reported_after FROM baton._tick() t;
RESET baton.horizon_warning;

SELECT dblink_disconnect('other');
SELECT cancel_unfinished_runs();
