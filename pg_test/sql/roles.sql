-- Roles (sql/role.sql, docs/roles.md): each kind of role can do its part and
-- gets "permission denied" (42501) for the rest, including the tables; a
-- client sees only the runs it enqueued, an admin every run.
\set QUIET on
SET client_min_messages = warning;
DROP ROLE IF EXISTS baton_t_client, baton_t_other, baton_t_worker, baton_t_admin, baton_t_member;
CREATE ROLE baton_t_client;
CREATE ROLE baton_t_other;
CREATE ROLE baton_t_worker;
CREATE ROLE baton_t_admin;
CREATE ROLE baton_t_member IN ROLE baton_t_client;  -- a login of a client role
-- runs a statement, returns 'ok' or its SQLSTATE and message (ids masked)
CREATE FUNCTION public.try_sql(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE statement;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || regexp_replace(regexp_replace(SQLERRM, '[0-9a-f-]{36}', '<id>'), 'step [0-9]+', 'step <n>');
END $$;
\set QUIET off

-- Before any grant a role can do nothing.
SET ROLE baton_t_client;
SELECT public.try_sql($$SELECT baton.enqueue_workflow('x')$$);
RESET ROLE;

SELECT baton.grant_client('baton_t_client');
SELECT baton.grant_client('baton_t_other');
SELECT baton.grant_worker('baton_t_worker');
SELECT baton.grant_admin('baton_t_admin');
SELECT role, kind FROM baton.grants WHERE role::text LIKE 'baton_t_%' ORDER BY 1, 2;

-- Only a superuser grants.
SET ROLE baton_t_admin;
SELECT public.try_sql($$SELECT baton.grant_admin('baton_t_client')$$);
RESET ROLE;

-- A client defines, enqueues, reads its runs and cancels them.
SET ROLE baton_t_client;
SELECT baton.define_workflow('roles_flow', '{"queue": "roles_q", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.enqueue_workflow('roles_flow', '{"who": "client"}', 'roles-1') IS NOT NULL AS enqueued;
SELECT cardinality(baton.enqueue_workflows('roles_flow', ARRAY['{"n": 1}', '{"n": 2}']::jsonb[])) AS enqueued_many;
SELECT count(*) AS my_runs, bool_and(enqueued_by::text = 'baton_t_client') AS mine FROM baton.workflow_runs WHERE workflow = 'roles_flow';
SELECT count(*) AS my_steps FROM baton.workflow_steps s JOIN baton.workflow_runs r ON r.id = s.workflow_id WHERE r.workflow = 'roles_flow';
-- the rest is refused
SELECT public.try_sql($$SELECT * FROM baton.runs$$);
SELECT public.try_sql($$SELECT * FROM baton.steps$$);
SELECT public.try_sql($$UPDATE baton.steps SET status = 'succeeded'$$);
SELECT public.try_sql($$INSERT INTO baton.run_log (run_id, action) VALUES (gen_random_uuid(), 'x')$$);
SELECT public.try_sql($$SELECT * FROM baton.claim_steps('c', ARRAY['roles_q'])$$);
SELECT public.try_sql($$SELECT baton.purge('0 seconds')$$);
SELECT public.try_sql($$SELECT baton.configure_queue('roles_q', 1)$$);
SELECT public.try_sql($$SELECT * FROM baton.queue_stats$$);
SELECT public.try_sql($$SELECT baton._tick()$$);
SELECT public.try_sql($$SELECT baton._finish_run(gen_random_uuid(), 'succeeded', NULL)$$);
RESET ROLE;

-- A member of the client role acts as itself: its runs are its own.
SET ROLE baton_t_member;
SELECT baton.enqueue_workflow('roles_flow', '{"who": "member"}') IS NOT NULL AS enqueued;
SELECT count(*) AS member_sees FROM baton.workflow_runs WHERE workflow = 'roles_flow';
RESET ROLE;

-- Another client sees none of those runs, cannot read their graph or cancel
-- them, and is told they do not exist.
SET ROLE baton_t_other;
SELECT count(*) AS other_sees FROM baton.workflow_runs WHERE workflow = 'roles_flow';
SELECT count(*) AS other_sees_steps FROM baton.workflow_steps WHERE workflow_id IN (SELECT id FROM baton.workflow_runs);
RESET ROLE;
SELECT id AS client_run FROM baton.runs WHERE idempotency_key = 'roles-1' \gset
SET ROLE baton_t_other;
SELECT public.try_sql(format('SELECT baton.workflow_graph(%L)', :'client_run'));
SELECT public.try_sql(format('SELECT baton.cancel_workflow(%L)', :'client_run'));
SELECT public.try_sql(format('SELECT baton.send_event(%L, %L)', :'client_run', 'go'));
SELECT baton.get_event(:'client_run', 'k') IS NULL AS no_value;
RESET ROLE;

-- A worker claims, heartbeats, checkpoints, completes, fails, releases.
SET ROLE baton_t_worker;
SELECT baton.register_worker('roles-worker', ARRAY['roles_q']);
CREATE TEMP TABLE held AS SELECT * FROM baton.claim_steps('roles-worker', ARRAY['roles_q'], max_steps => 4);
SELECT count(*) AS claimed FROM held;
SELECT baton.heartbeat(step_id, lease_token) IS NOT NULL AS heartbeat FROM held ORDER BY step_id LIMIT 1;
SELECT baton.checkpoint(step_id, lease_token, 'k', '1') FROM held ORDER BY step_id LIMIT 1;
SELECT baton.set_event(workflow_id, 'k', '"v"') FROM held ORDER BY step_id LIMIT 1;
SELECT baton.complete_step(step_id, lease_token, '{"ok": true}') FROM held ORDER BY step_id LIMIT 1;
SELECT baton.fail_step(step_id, lease_token, 'boom', false) FROM held
 WHERE step_id = (SELECT step_id FROM held ORDER BY step_id LIMIT 1 OFFSET 1);
SELECT baton.release_step(step_id, lease_token) FROM held
 WHERE step_id = (SELECT step_id FROM held ORDER BY step_id LIMIT 1 OFFSET 2);
-- a stale token is still refused with BT001
SELECT public.try_sql(format('SELECT baton.complete_step(%s, gen_random_uuid())', (SELECT step_id FROM held ORDER BY step_id LIMIT 1 OFFSET 3)));
-- and the rest is refused
SELECT public.try_sql($$SELECT baton.enqueue_workflow('roles_flow')$$);
SELECT public.try_sql($$SELECT * FROM baton.workflow_runs$$);
SELECT public.try_sql($$SELECT * FROM baton.attempts$$);
SELECT public.try_sql($$SELECT baton.retry_from(gen_random_uuid(), 'a')$$);
RESET ROLE;

-- The client reads the value its run's worker published.
SET ROLE baton_t_client;
SELECT baton.get_event(:'client_run', 'k') AS value_seen_by_owner;
RESET ROLE;

-- An admin sees every run and operates on them.
SET ROLE baton_t_admin;
SELECT count(*) AS admin_sees FROM baton.workflow_runs WHERE workflow = 'roles_flow';
SELECT count(*) > 0 AS admin_sees_attempts FROM baton.step_attempts a JOIN baton.workflow_runs r ON r.id = a.workflow_id WHERE r.workflow = 'roles_flow';
SELECT baton.cancel_workflow(:'client_run') AS cancelled;
SELECT actor FROM baton.workflow_log WHERE workflow_id = :'client_run' AND action = 'cancelled';
SELECT public.try_sql($$SELECT baton.configure_queue('roles_q', 10)$$) AS configure_queue;
SELECT count(*) >= 0 AS stats FROM baton.queue_stats;
SELECT public.try_sql($$SELECT * FROM baton.runs$$);
SELECT public.try_sql($$SELECT * FROM baton.claim_steps('a', ARRAY['roles_q'])$$);
RESET ROLE;

-- Revoking takes it all back.
SELECT baton.revoke_client('baton_t_client');
SET ROLE baton_t_member;
SELECT public.try_sql($$SELECT * FROM baton.workflow_runs$$);
RESET ROLE;
SELECT baton.revoke_client('baton_t_other');
SELECT baton.revoke_worker('baton_t_worker');
SELECT baton.revoke_admin('baton_t_admin');
SELECT count(*) AS grants_left FROM baton.grants WHERE role::text LIKE 'baton_t_%';
SELECT count(*) AS acl_entries_left
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.pronamespace = 'baton'::regnamespace AND a.grantee::regrole::text LIKE 'baton_t_%';

\set QUIET on
SELECT count(baton.delete_workflow(id, true)) AS deleted FROM baton.runs WHERE workflow = 'roles_flow';
DROP TABLE held;
DROP FUNCTION public.try_sql(text);
DROP ROLE baton_t_client, baton_t_other, baton_t_worker, baton_t_admin, baton_t_member;
