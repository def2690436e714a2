-- Registered workers (sql/worker.sql): a worker registers a session it keeps
-- open; when that session's backend is gone, the background worker's round
-- (_tick, called here by hand) ends every lease held under the worker's name
-- as a lost attempt, retried at once, whatever the lease's expiry.
\set QUIET on
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dblink;
\set QUIET off
SELECT dblink_connect('ws', format('dbname=%s host=%s port=%s user=%s',
       current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS connected;
SELECT baton.define_workflow('ws_flow', '{"queue": "ws_q", "steps": [{"name": "a", "max_attempts": 3}]}');
SELECT count(*) FROM unnest(baton.enqueue_workflows('ws_flow', array_fill('{}'::jsonb, ARRAY[3])));

-- 1. The other session registers as worker "ws-1"; this session claims two
--    steps under that name with a 30-minute lease (a pooled connection of
--    the same worker).
SELECT * FROM dblink('ws', $$SELECT baton.register_worker('ws-1', ARRAY['ws_q'])::text$$) AS t(r text);
SELECT count(*) AS claimed FROM baton.claim_steps('ws-1', ARRAY['ws_q'], 2, '30 minutes');
SELECT name, queues, steps_held, alive FROM baton.workers WHERE name = 'ws-1';

-- 2. A round while the session lives changes nothing.
SELECT (baton._tick() ->> 'workers_lost_leases')::int AS lost_while_alive;
SELECT count(*) AS still_running FROM baton.steps WHERE queue = 'ws_q' AND status = 'running';

-- 3. The registered session ends: the next round hands its leases back.
SELECT pg_terminate_backend(pid, 5000) AS terminated
  FROM baton.worker_sessions WHERE worker = 'ws-1';
SELECT dblink_disconnect('ws');
SELECT (baton._tick() ->> 'workers_lost_leases')::int AS lost_when_gone;
SELECT status, attempt, count(*) FROM baton.steps WHERE queue = 'ws_q' GROUP BY 1, 2 ORDER BY 1, 2;
SELECT a.outcome, a.error FROM baton.attempts a JOIN baton.steps s USING (run_id, step_id)
 WHERE s.queue = 'ws_q' ORDER BY 1, 2;
SELECT name, steps_held, alive, last_seen IS NOT NULL AS seen FROM baton.workers WHERE name = 'ws-1';
-- handled: the next round finds nothing to do
SELECT (baton._tick() ->> 'workers_lost_leases')::int AS lost_again;

-- 4. A name lives while any of its sessions does (the Workers of one
--    process share its name): the first of two sessions ending hands
--    nothing back; the second does.
SELECT dblink_connect('ws_a', format('dbname=%s host=%s port=%s user=%s', current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS a,
       dblink_connect('ws_b', format('dbname=%s host=%s port=%s user=%s', current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS b;
SELECT * FROM dblink('ws_a', $$SELECT baton.register_worker('ws-3')::text$$) AS t(r text);
SELECT * FROM dblink('ws_b', $$SELECT baton.register_worker('ws-3')::text$$) AS t(r text);
SELECT count(*) AS claimed FROM baton.claim_steps('ws-3', ARRAY['ws_q'], 1, '30 minutes');
SELECT name, steps_held, alive FROM baton.workers WHERE name = 'ws-3';
SELECT pg_terminate_backend(pid, 5000) AS terminated_a
  FROM baton.worker_sessions WHERE worker = 'ws-3'
   AND pid = (SELECT t.p FROM dblink('ws_a', 'SELECT pg_backend_pid()') AS t(p int));
SELECT dblink_disconnect('ws_a');
SELECT (baton._tick() ->> 'workers_lost_leases')::int AS lost_with_one_left;
SELECT count(*) AS sessions_left FROM baton.worker_sessions WHERE worker = 'ws-3';
SELECT name, steps_held, alive FROM baton.workers WHERE name = 'ws-3';
SELECT pg_terminate_backend(pid, 5000) AS terminated_b FROM baton.worker_sessions WHERE worker = 'ws-3';
SELECT dblink_disconnect('ws_b');
SELECT (baton._tick() ->> 'workers_lost_leases')::int AS lost_with_none_left;
SELECT name, steps_held, alive FROM baton.workers WHERE name = 'ws-3';

-- 5. A worker that comes back after a crash, before the background worker's
--    round, gets its old session's leases handed back as it registers: the
--    new process does not hold them.
SELECT dblink_connect('ws_c', format('dbname=%s host=%s port=%s user=%s', current_database(),
       coalesce(host(inet_server_addr()), split_part(current_setting('unix_socket_directories'), ',', 1)),
       current_setting('port'), current_user)) AS c;
SELECT * FROM dblink('ws_c', $$SELECT baton.register_worker('ws-4')::text$$) AS t(r text);
SELECT count(*) AS claimed FROM baton.claim_steps('ws-4', ARRAY['ws_q'], 1, '30 minutes');
SELECT pg_terminate_backend(pid, 5000) AS terminated_c FROM baton.worker_sessions WHERE worker = 'ws-4';
SELECT dblink_disconnect('ws_c');
SELECT baton.register_worker('ws-4');
SELECT name, steps_held, alive FROM baton.workers WHERE name = 'ws-4';
SELECT a.outcome, a.error FROM baton.attempts a WHERE a.worker = 'ws-4';

-- 6. Registering again (the worker came back) makes it alive; bad names are
--    refused.
SELECT baton.register_worker('ws-1');
SELECT name, queues, alive FROM baton.workers WHERE name = 'ws-1';
-- the session now gives up on a dead peer within about ten seconds
SELECT current_setting('tcp_keepalives_idle') AS idle, current_setting('tcp_keepalives_count') AS probes,
       current_setting('tcp_user_timeout') AS user_timeout;
SELECT baton.register_worker('');
SELECT baton.register_worker(NULL);
SELECT baton.register_worker(repeat('w', 201));
SELECT baton.register_worker('ws-2', ARRAY[['a'], ['b']]);
SELECT count(*) AS registered FROM baton.worker_sessions;
DELETE FROM baton.worker_sessions;
SELECT baton.cancel_workflow(id) FROM baton.runs WHERE workflow = 'ws_flow' AND status NOT IN ('succeeded', 'failed', 'cancelled');
