-- A caller's search_path cannot slip its own objects into the protocol:
-- functions named like the built-ins pg_baton calls, and a table named like
-- one of its own, planted in a schema searched before pg_catalog. Each
-- planted function records that it was called; none may be.
\set QUIET on
SET client_min_messages = warning;
CREATE SCHEMA evil;
CREATE TABLE evil.called (what text);
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('now') RETURNING timestamptz '1999-01-01' $$;
CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('clock_timestamp') RETURNING timestamptz '1999-01-01' $$;
CREATE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('gen_random_uuid') RETURNING uuid '00000000-0000-0000-0000-000000000000' $$;
CREATE FUNCTION evil.jsonb_typeof(jsonb) RETURNS text LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('jsonb_typeof') RETURNING 'object' $$;
CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('pg_notify') $$;
CREATE FUNCTION evil.hashtext(text) RETURNS integer LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('hashtext') RETURNING 0 $$;
CREATE FUNCTION evil.pg_backend_pid() RETURNS integer LANGUAGE sql AS
  $$ INSERT INTO evil.called VALUES ('pg_backend_pid') RETURNING 0 $$;
CREATE TABLE evil.steps (step_id bigint, status text);
CREATE TEMP TABLE runs (id uuid, status text);
\set QUIET off
SET search_path = evil, pg_catalog, public;

SELECT baton.define_workflow('planted_flow', '{"queue": "planted_q", "steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.enqueue_workflow('planted_flow', '{"n": 1}', 'planted-1') IS NOT NULL AS enqueued;
SELECT baton.register_worker('planted-worker');
SELECT baton.heartbeat(c.step_id, c.lease_token) > pg_catalog.now() AS renewed,
       baton.complete_step(c.step_id, c.lease_token, '{"a": 1}') AS completed
  FROM baton.claim_steps('planted-worker', ARRAY['planted_q']) c;
SELECT count(*) AS completed
  FROM baton.complete_and_claim('{}', '{}', '{}', 'planted-worker', ARRAY['planted_q'], 1) c,
       LATERAL baton.complete_step(c.step_id, c.lease_token, '{"b": 2}');
SELECT status, output, created_at > timestamptz '2020-01-01' AS real_clock
  FROM baton.workflow_runs WHERE workflow = 'planted_flow';
SELECT baton.cancel_workflow(baton.enqueue_workflow('planted_flow', '{"n": 2}'));
SELECT (baton._tick() ->> 'at')::timestamptz > timestamptz '2020-01-01' AS ticked;
SELECT count(*) >= 0 AS stats FROM baton.queue_stats;
SELECT name, alive FROM baton.workers WHERE name = 'planted-worker';
SELECT pg_catalog.jsonb_typeof(baton.workflow_graph(id)) AS graph FROM baton.workflow_runs WHERE idempotency_key = 'planted-1';

-- nothing planted was called
SELECT what, count(*) FROM evil.called GROUP BY 1 ORDER BY 1;
RESET search_path;
DELETE FROM baton.worker_sessions WHERE worker = 'planted-worker';
DROP SCHEMA evil CASCADE;
